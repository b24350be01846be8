"""Register and remove the hooks that observe every layer call; one record per call.

What is recorded (SPEC 4): every leaf module, every module that owns
parameters directly, and the functional activations (``F.relu``,
``torch.sigmoid``, ``Tensor.relu_``, ...) called inside the ``forward`` of a
module that has children. A functional activation inside a leaf module's own
implementation (``nn.ReLU`` calls ``F.relu``) belongs to that leaf's record.

Mechanisms:

* a forward pre-hook on every module keeps the stack of modules currently in
  ``forward`` (for naming functional calls, and for naming the layer that was
  running when a forward fails) and, for recorded modules, reduces the first
  tensor input before the call can modify it in place;
* a forward hook on recorded modules reduces the output;
* a ``TorchFunctionMode`` intercepts the functional activations;
* gradients come from a tensor hook registered on each record's output in the
  forward hook. Unlike ``register_full_backward_hook``, a tensor hook stays
  correct when an in-place op (``nn.ReLU(inplace=True)``) later modifies that
  output: autograd hands it the gradient w.r.t. the value the record produced.

Hooks never keep a tensor: each one reduces ``tensor.detach()`` into a small
partial on the tensor's device (:mod:`actstats.stats`) and appends it to the
record's state. Nothing is moved to the host until :meth:`Recorder.collect`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from actstats import stats
from actstats.theory import FUNCTIONAL_ACTIVATIONS, Activation, functional_activation, module_activation

_CHANNEL_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DistributedDataParallel / DataParallel wrapper."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def owns_parameters(module: nn.Module) -> bool:
    """True when ``module`` has parameters of its own (not only through children)."""
    return next(iter(module.parameters(recurse=False)), None) is not None


def is_leaf(module: nn.Module) -> bool:
    """True when ``module`` has no child modules."""
    return next(iter(module.children()), None) is None


def is_recorded(module: nn.Module, *, root: bool = False) -> bool:
    """True for a module that gets a record of its own.

    Every leaf module and every module owning parameters directly; the root
    only when it owns parameters (a bare ``nn.Linear``), since a root without
    parameters is the model itself, not one of its layers.
    """
    if root:
        return owns_parameters(module)
    return is_leaf(module) or owns_parameters(module)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """Return the first floating tensor in a nested output (tuple, list, dict, dataclass)."""
    for t in iter_tensors(obj):
        if t.is_floating_point():
            return t
    return None


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor of a nested structure, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from iter_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name))


def shapes(args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> str:
    """Describe the shapes of the tensors in a call's arguments, e.g. ``(32, 256)``."""
    found = [tuple(t.shape) for t in iter_tensors((args, dict(kwargs or {})))]
    if not found:
        return "no tensor"
    text = ", ".join("(" + ", ".join(str(s) for s in shape) + ")" for shape in found)
    return text


@dataclass
class RecordState:
    """Everything accumulated for one record (one call site of one module or function)."""

    name: str
    type: str
    index: int
    module_name: str | None
    activation: Activation | None
    unit_dim: int
    act_parts: list[torch.Tensor] = field(default_factory=list)
    grad_parts: list[torch.Tensor] = field(default_factory=list)
    alive: torch.Tensor | None = None


@dataclass(frozen=True)
class RecordSummary:
    """A record's merged statistics, on the host."""

    name: str
    type: str
    index: int
    module_name: str | None
    activation: Activation | None
    act: stats.ActStats
    input_rms: float
    input_numel: int
    grad: stats.GradStats | None
    dead_frac: float | None
    saturation: float | None


@dataclass
class _Frame:
    module: nn.Module
    name: str
    input_shapes: str
    inputs: torch.Tensor | None


class _FunctionalActivations(TorchFunctionMode):
    """Intercepts functional activations and hands them to the recorder."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = weakref.ref(recorder)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        recorder = self._recorder()
        try:
            known = func in FUNCTIONAL_ACTIVATIONS
        except TypeError:  # an unhashable callable
            known = False
        if not known or recorder is None:
            return func(*args, **kwargs)
        return recorder._functional_call(func, args, kwargs)


class Recorder:
    """Observe a model's layer calls; a context manager that removes every hook on exit.

    Args:
        model: the model (a DDP/DataParallel wrapper is looked through).
        backward: register gradient hooks on outputs that require grad.
        eps: saturation tolerance (outputs within ``eps`` of an asymptote).

    Example:
        >>> with Recorder(model) as rec:
        ...     model(x).sum().backward()
        >>> summaries = rec.collect()
    """

    def __init__(self, model: nn.Module, *, backward: bool = True, eps: float = 0.01) -> None:
        self.root = unwrap(model)
        self.backward = backward
        self.eps = eps
        self.records: dict[str, RecordState] = {}
        self.stack: list[_Frame] = []
        self.last_failed: _Frame | None = None
        self._handles: list[RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._leaf: dict[int, bool] = {}
        self._channel_units = False
        self._mode: _FunctionalActivations | None = None
        self.active = False

    # --- lifetime ------------------------------------------------------------

    def attach(self) -> Recorder:
        """Register the hooks; idempotent."""
        if self.active:
            return self
        for name, module in self.root.named_modules():
            self._names[id(module)] = name or type(module).__name__
            # Functional calls inside a leaf's own implementation belong to that leaf,
            # except in the root, whose forward is the model's own code.
            self._leaf[id(module)] = is_leaf(module) and module is not self.root
            record = is_recorded(module, root=module is self.root)
            self._handles.append(module.register_forward_pre_hook(
                self._pre_hook(name, record, module is self.root), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                self._post_hook(name, record), with_kwargs=True))
        self.active = True
        return self

    def detach(self) -> None:
        """Remove every hook and leave the function mode; safe to call twice."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()
        self.exit_mode()

    def enter_mode(self) -> None:
        """Start intercepting functional activations (call around a forward pass)."""
        if self._mode is None:
            self._mode = _FunctionalActivations(self)
            self._mode.__enter__()

    def exit_mode(self) -> None:
        """Stop intercepting functional activations."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def __enter__(self) -> Recorder:
        self.attach()
        self.enter_mode()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"Recorder({len(self._handles)} hooks live, {len(self.records)} records)"

    # --- hooks -----------------------------------------------------------------

    def _pre_hook(self, name: str, record: bool, is_root: bool):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if is_root:
                self._calls.clear()
                self.stack.clear()
            inputs = None
            if record:
                x = next(iter_tensors((args, kwargs)), None)
                if x is not None:
                    with torch._C.DisableTorchFunction():
                        inputs = stats.input_partial(x)
            self.stack.append(_Frame(module, name, shapes(args, kwargs), inputs))
        return hook

    def _post_hook(self, name: str, record: bool):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            frame = self.stack.pop() if self.stack else None
            if not record:
                return
            inputs = frame.inputs if frame is not None and frame.module is module else None
            key = name or type(module).__name__
            self._observe(key, type(module).__name__, name, module_activation(module), output, inputs)
            if isinstance(module, _CHANNEL_LAYERS):
                self._channel_units = True
            elif owns_parameters(module):
                self._channel_units = False
        return hook

    def _functional_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        owner = self.stack[-1] if self.stack else None
        if owner is None or self._leaf.get(id(owner.module), True) or not self.active:
            return func(*args, **kwargs)
        type_name = FUNCTIONAL_ACTIVATIONS[func][0]
        x = args[0] if args else None
        inputs = stats.input_partial(x) if isinstance(x, torch.Tensor) else None
        output = func(*args, **kwargs)
        short = type_name.split(".", 1)[1]
        key = f"{owner.name}.{short}()" if owner.name else f"{short}()"
        self._observe(key, type_name, None, functional_activation(func, args, kwargs), output, inputs)
        return output

    def _observe(
        self,
        key: str,
        type_name: str,
        module_name: str | None,
        activation: Activation | None,
        output: Any,
        inputs: torch.Tensor | None,
    ) -> None:
        count = self._calls.get(key, 0)
        self._calls[key] = count + 1
        name = key if count == 0 else f"{key}#{count}"
        y = first_tensor(output)
        if y is None:
            return
        state = self.records.get(name)
        if state is None:
            unit_dim = 1 if self._channel_units and y.dim() >= 2 else -1
            state = RecordState(name, type_name, len(self.records), module_name, activation, unit_dim)
            self.records[name] = state
        bounds = None
        if activation is not None and activation.family == "saturating":
            bounds = (activation.low, activation.high)
        with torch._C.DisableTorchFunction():
            state.act_parts.append(stats.activation_partial(y, inputs, bounds, self.eps))
            if activation is not None and activation.family == "relu":
                alive = stats.alive_units(y, state.unit_dim)
                if state.alive is None:
                    state.alive = alive
                elif state.alive.shape == alive.shape:
                    state.alive |= alive
        if self.backward and y.requires_grad and torch.is_grad_enabled():
            y.register_hook(self._grad_hook(state))

    def _grad_hook(self, state: RecordState):
        def hook(grad: torch.Tensor) -> None:
            if self.active:
                with torch._C.DisableTorchFunction():
                    state.grad_parts.append(stats.gradient_partial(grad))
        return hook

    # --- results ---------------------------------------------------------------

    def failing_layer(self) -> _Frame | None:
        """The innermost module whose forward had started but not finished."""
        return self.stack[-1] if self.stack else None

    def collect(self) -> list[RecordSummary]:
        """Move every partial to the host in one transfer and merge them per record."""
        states = sorted(self.records.values(), key=lambda s: s.index)
        pieces: list[torch.Tensor] = []
        layout: list[tuple[int, int, int]] = []
        for s in states:
            n_alive = 0 if s.alive is None else 1
            layout.append((len(s.act_parts), len(s.grad_parts), n_alive))
            pieces.extend(s.act_parts)
            pieces.extend(s.grad_parts)
            if s.alive is not None:
                units = s.alive.numel()
                pieces.append(torch.stack([units - s.alive.sum(), s.alive.new_tensor(units, dtype=torch.long)]).double())
        if not pieces:
            return []
        device = pieces[0].device
        flat = torch.cat([p.to(device) for p in pieces]).cpu().numpy()
        out: list[RecordSummary] = []
        pos = 0
        for s, (n_act, n_grad, n_alive) in zip(states, layout):
            act_rows = flat[pos:pos + n_act * stats.ACT_WIDTH].reshape(n_act, stats.ACT_WIDTH)
            pos += n_act * stats.ACT_WIDTH
            grad_rows = flat[pos:pos + n_grad * stats.GRAD_WIDTH].reshape(n_grad, stats.GRAD_WIDTH)
            pos += n_grad * stats.GRAD_WIDTH
            dead_frac = None
            if n_alive:
                dead, units = flat[pos:pos + 2]
                pos += 2
                dead_frac = float(dead / units)
            act, input_rms, input_numel, saturated = stats.summarize_activations(act_rows)
            grad = stats.summarize_gradients(grad_rows) if n_grad else None
            family = s.activation.family if s.activation else None
            out.append(RecordSummary(
                name=s.name, type=s.type, index=s.index, module_name=s.module_name,
                activation=s.activation, act=act, input_rms=input_rms, input_numel=input_numel, grad=grad,
                dead_frac=dead_frac, saturation=saturated if family == "saturating" else None,
            ))
        return out

    def clear(self) -> None:
        """Forget every record (keep the hooks)."""
        self.records.clear()
        self._calls.clear()
