"""Register and remove the hooks that observe every layer call; one record per call.

What is recorded (SPEC 4): every leaf module, every module that owns
parameters directly (the root only then), and the functional activations
(``F.relu``, ``torch.sigmoid``, ``Tensor.relu_``, ...) called inside the
``forward`` of the root or of a module that has children. A functional
activation inside a leaf module's own implementation (``nn.ReLU`` calls
``F.relu``) belongs to that leaf's record.

Mechanisms:

* a forward pre-hook on every module keeps the stack of modules currently in
  ``forward`` (for naming functional calls, and for naming the layer that was
  running when a forward fails) and, for recorded modules, reduces the first
  tensor input before the call can modify it in place;
* a forward hook on recorded modules reduces the output;
* a ``TorchFunctionMode``, entered by the root's forward pre-hook and left by
  its forward hook (also when the forward raises), intercepts the functional
  activations;
* gradients come from a tensor hook registered on each record's output in the
  forward hook. Unlike ``register_full_backward_hook``, a tensor hook stays
  correct when an in-place op (``nn.ReLU(inplace=True)``) later modifies that
  output: autograd hands it the gradient w.r.t. the value the record produced.
  It also sees a gradient that ``torch.autograd.grad`` captures at that output,
  and the gradient before any tensor hook the user registers on it afterwards
  (a pre-hook on the output's ``grad_fn`` would miss the first, being on a node
  that is not run, and see the second's changes).

Hooks never keep a tensor beyond the call that produced it: each one reduces
its tensor into raw rows of the recorder's :class:`~actstats.stats.RowStore`
on the tensor's device and notes which record owns them (the stack of running
modules refers to their arguments only until they return; the rows of each
output are found again by a weak reference, so that a layer whose input is an
earlier output does not reduce it twice). Nothing is moved to the host here:
:meth:`Recorder.gather` merges (on the device; in numpy for a CPU model, whose
rows are already on the host) and the caller makes the one transfer.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from actstats import stats
from actstats.report import Histogram, make_histograms
from actstats.theory import FUNCTIONAL_ACTIVATIONS, Activation, functional_activation, is_parametric, module_activation
from actstats.weights import WeightMeasure

_CHANNEL_LAYERS = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel / DataParallel wrappers and
    ``torch.compile`` (whose original module is probed eagerly)."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def owns_parameters(module: nn.Module) -> bool:
    """True when ``module`` has parameters of its own (not only through children)."""
    return next(iter(module.parameters(recurse=False)), None) is not None


def is_leaf(module: nn.Module) -> bool:
    """True when ``module`` has no child modules."""
    return next(iter(module.children()), None) is None


def modules_by_name(root: nn.Module) -> dict[str, nn.Module]:
    """``dict(root.named_modules())``: every module once, under its first name, in pre-order;
    walked with a stack rather than nested generators (a sampled step walks the model)."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found[name] = module
        prefix = name + "." if name else ""
        stack.extend(reversed([(prefix + key, child) for key, child in module._modules.items() if child is not None]))
    return found


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
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj
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


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The first tensor of a call's arguments (fast path: a tensor as first positional argument)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return next(iter_tensors((args, kwargs)), None)


def shapes(args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> str:
    """Describe the shapes of the tensors in a call's arguments, e.g. ``(32, 256)``."""
    found = [tuple(t.shape) for t in iter_tensors((args, dict(kwargs or {})))]
    if not found:
        return "no tensor"
    text = ", ".join("(" + ", ".join(str(s) for s in shape) + ")" for shape in found)
    return text


@dataclass(slots=True)
class RecordState:
    """Everything accumulated on the device for one record (one call site of a module or function)."""

    name: str
    type: str
    index: int
    module_name: str | None
    activation: Activation | None
    unit_dim: int
    grad_calls: int = 0  # gradients received
    unit_max: torch.Tensor | None = None  # per unit, the largest output seen (fmax: NaN ignored)
    act_hist: torch.Tensor | None = None
    act_range: torch.Tensor | tuple[float, float] | None = None
    grad_hist: torch.Tensor | None = None
    grad_range: torch.Tensor | tuple[float, float] | None = None


@dataclass(slots=True)  # not frozen: built once per record and step, and frozen fields cost a call each
class RecordSummary:
    """A record's merged statistics, on the host (read, never changed)."""

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
    act_hist: Histogram | None = None
    grad_hist: Histogram | None = None


@dataclass(slots=True)
class _Frame:
    module: nn.Module
    name: str
    args: tuple[Any, ...]  # the call's own arguments, alive anyway while it runs
    kwargs: dict[str, Any]
    inputs: list[int] | None  # raw rows (stats.RowStore) of the first tensor input
    mode_off: bool = False  # the function mode was taken off the stack for this (leaf) call
    mode_back: bool = False  # ... and put back for this call of a module with children inside a leaf

    @property
    def input_shapes(self) -> str:
        return shapes(self.args, self.kwargs)


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


#: Range hints for histograms: record name -> ((act low, act high) | None, (grad low, grad high) | None).
RangeHints = Mapping[str, tuple[tuple[float, float] | None, tuple[float, float] | None]]


def _usable_hints(hints: RangeHints, bins: int) -> dict[str, tuple[tuple[float, float] | None, ...]]:
    """``hints`` as Python floats, with each range :func:`stats.usable_ranges` refuses (not finite,
    or too narrow for ``bins`` float32 bins) made None: checked together, once per step."""
    if not bins or not hints:
        return {}
    ranges = [r for pair in hints.values() for r in pair if r is not None]
    # a numpy array of Python floats' verdicts, read on the host when a step opens (no tensor)
    usable = iter(stats.usable_ranges([r[0] for r in ranges], [r[1] for r in ranges], bins).tolist())
    return {name: tuple((float(r[0]), float(r[1])) if r is not None and next(usable) else None for r in pair)
            for name, pair in hints.items()}


class Recorder:
    """Observe a model's layer calls; a context manager that removes every hook on exit.

    Args:
        model: the model (a DDP/DataParallel wrapper is looked through).
        backward: register gradient hooks on outputs that require grad.
        eps: saturation tolerance (outputs within ``eps`` of an asymptote).
        histogram_bins: also count values into this many equal bins per record
            (0: no histograms). A record's range is its ``range_hints`` entry
            when given, else the min/max of its first call; later values outside
            it count in the end bins.
        range_hints: histogram ranges from statistics gathered earlier.
        record_no_grad: also record forward passes run without autograd (a
            ``torch.no_grad()`` evaluation); ``watch`` leaves them out.
        read_weights: read each recorded parametric module's weights at its first
            call of a step (into :attr:`weights`, for :func:`actstats.weights.weight_figures`).
        not_symmetric: modules found not symmetric before (``watch`` keeps them): their
            symmetry is not checked again; read, never changed.

    Example:
        >>> with Recorder(model) as rec:
        ...     model(x).sum().backward()
        >>> from actstats.probe import collect
        >>> summaries = collect(rec)  # merged on the device, one transfer
    """

    _COUNTS_BLOCK = 64  # histograms' counts allocated together (see _zero_counts)

    def __init__(
        self,
        model: nn.Module,
        *,
        backward: bool = True,
        eps: float = 0.01,
        histogram_bins: int = 0,
        range_hints: RangeHints | None = None,
        record_no_grad: bool = True,
        read_weights: bool = True,
        not_symmetric: Collection[nn.Module] = (),
    ) -> None:
        self.root = unwrap(model)
        self.read_weights = read_weights
        self.not_symmetric = not_symmetric
        self.backward = backward
        self.eps = eps
        self.record_no_grad = record_no_grad
        self._handles: list[RemovableHandle] = []
        self._leaf_hooks: list[RemovableHandle] = []  # gradient hooks on leaf outputs (they outlive a step)
        self._hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._leaf: dict[int, bool] = {}
        self._mode: _FunctionalActivations | None = None
        self._mode_off = False  # the mode is off the stack while a leaf runs
        #: the root's modules by name, as of the latest look for new ones
        self.modules: dict[str, nn.Module] = {}
        self.active = False
        self.generation = -1  # counts resets: gradient hooks of an earlier generation do nothing
        self.reset(histogram_bins=histogram_bins, range_hints=range_hints)

    def reset(self, *, histogram_bins: int = 0, range_hints: RangeHints | None = None) -> None:
        """Forget everything recorded; the hooks stay (``watch`` keeps them from one sampled
        step to the next), and modules added to the model are hooked at the next forward. A
        gradient that reaches a hook registered before the reset is ignored."""
        self.bins = histogram_bins
        self._spare_counts: list[torch.Tensor] = []
        #: the usable histogram ranges among ``range_hints`` (an unusable one is left out)
        self.range_hints = _usable_hints(range_hints or {}, histogram_bins)
        self.generation += 1
        self._remove_leaf_hooks()
        self.records: dict[str, RecordState] = {}
        self.stack: list[_Frame] = []
        self._calls: dict[str, int] = {}
        self._channel_units = False
        self._skipping = False
        self._check_modules = self.active  # hooks kept from an earlier step: look for new modules
        # The rows of every tensor reduced in this forward pass, by id (a weak reference and
        # the version make sure it is the same tensor, unchanged): a layer whose input is an
        # earlier output (or the model input) reuses its rows instead of reducing it again.
        self._seen: dict[int, tuple[Any, int, list[int]]] = {}
        #: every tensor reduced on this recorder, one raw row per (chunk of a) tensor
        self.store = stats.RowStore()
        #: the weights of the recorded parametric modules, read at their first call
        self.weights = WeightMeasure(self.not_symmetric)
        # Which rows belong to what: (row, record index) for outputs, inputs and gradients;
        # rows of the model's own input.
        self._act_rows: list[tuple[int, int]] = []
        self._input_rows: list[tuple[int, int]] = []
        self._grad_rows: list[tuple[int, int]] = []
        self._root_rows: list[int] = []
        self._device: torch.device | None = None
        #: shape of the first tensor given to the root in the first recorded forward
        self.input_shape: tuple[int, ...] | None = None
        #: recorded forward passes of the root (not counting skipped no-grad passes)
        self.forward_calls = 0

    # --- lifetime ------------------------------------------------------------

    def attach(self) -> Recorder:
        """Register the hooks; idempotent. Functional activations are intercepted
        from the root's forward pre-hook to its forward hook."""
        if self.active:
            return self
        self._hook_new_modules()
        self.active = True
        return self

    def _hook_new_modules(self) -> None:
        """Hook every module of the root not hooked yet: all of them on :meth:`attach`; after a
        :meth:`reset`, the modules added to the model since (checked at its next forward)."""
        modules, hooked = modules_by_name(self.root), self.modules
        if self._handles and len(modules) == len(hooked) \
                and all(hooked.get(name) is module for name, module in modules.items()):
            return  # hooks live on the same modules, under the same names (a new child is a new name)
        self.modules = modules
        for name, module in modules.items():
            # Functional calls inside a leaf's own implementation belong to that leaf,
            # except in the root, whose forward is the model's own code.
            self._leaf[id(module)] = is_leaf(module) and module is not self.root
            if module in self._hooked:
                continue
            self._hooked.add(module)
            is_root = module is self.root
            record = is_recorded(module, root=is_root)
            self._handles.append(module.register_forward_pre_hook(
                self._pre_hook(name, record, is_root, self.read_weights and record and is_parametric(module)),
                with_kwargs=True))
            # What a recorded module's call tells about the unit dimension of the layers after it.
            channels = True if isinstance(module, _CHANNEL_LAYERS) else False if owns_parameters(module) else None
            activation = module_activation(module) if record else None
            self._handles.append(module.register_forward_hook(
                self._post_hook(name, record, is_root, channels, activation, type(module).__name__),
                with_kwargs=True, always_call=is_root))

    def detach(self) -> None:
        """Remove every hook and leave the function mode; safe to call twice."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_leaf_hooks()
        self._hooked = weakref.WeakSet()
        self.stack.clear()
        self._exit_mode()

    def _remove_leaf_hooks(self) -> None:
        """Remove the gradient hooks put on leaf tensors that a module returned as they are (a
        parameter): unlike the graph's intermediate tensors, those outlive the step."""
        for handle in self._leaf_hooks:
            handle.remove()
        self._leaf_hooks.clear()

    def _exit_mode(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            if not self._mode_off:  # else a leaf's forward raised while the mode stood aside
                mode.__exit__(None, None, None)
            self._mode_off = False

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"Recorder({len(self._handles)} hooks live, {len(self.records)} records)"

    # --- hooks -----------------------------------------------------------------

    # Hooks run with __torch_function__ handling off: their own tensor calls (is_floating_point,
    # dim, shape, the reductions) are neither intercepted by the function mode nor dispatched
    # to tensor subclasses' Python overrides.

    def _pre_hook(self, name: str, record: bool, is_root: bool, parametric: bool):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            with torch._C.DisableTorchFunction():
                if is_root:
                    self._start_forward(args, kwargs)
                if self._skipping:
                    return
                if parametric:  # its weights, once a step, just before the layer reads them too
                    self.weights.add(module)
                inputs = None
                if record:
                    x = _first_input(args, kwargs)
                    if x is not None:
                        inputs = self._rows_of_input(x)
                frame = _Frame(module, name, args, kwargs, inputs)
                if not is_root:
                    if self._leaf.get(id(module)):
                        if self._mode_on_top():
                            # Functional calls inside a leaf belong to the leaf: the mode steps aside while
                            # it runs, so that its own operations (conv2d, batch_norm, ...) are not intercepted.
                            torch._C._pop_torch_function_stack()
                            frame.mode_off = self._mode_off = True
                    elif self._mode is not None and self._mode_off:
                        # a module with children called from inside a leaf's forward: its functional
                        # calls are its own, so the mode comes back while it runs
                        torch._C._push_on_torch_function_stack(self._mode)
                        frame.mode_back = True
                        self._mode_off = False
                self.stack.append(frame)
        return hook

    def _start_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The root's forward begins: hook modules added since the last step, reduce the model's
        input, enter the function mode (unless the pass is skipped: ``torch.no_grad()`` with
        ``record_no_grad`` off)."""
        if self._check_modules:
            self._check_modules = False
            self._hook_new_modules()
        self._calls.clear()
        self.stack.clear()
        self._seen.clear()
        self._skipping = not self.record_no_grad and not torch.is_grad_enabled()
        if self._skipping:
            return
        self.forward_calls += 1
        x = _first_input(args, kwargs)
        if x is not None:
            if self.input_shape is None:
                self.input_shape = tuple(x.shape)
            self._root_rows += self._rows_of_input(x) or []  # also the first layer's input
        if self._mode is not None and self._mode_off:  # an earlier forward was interrupted
            self._mode, self._mode_off = None, False  # inside a leaf: that mode is off the stack
        if self._mode is None:
            self._mode = _FunctionalActivations(self)
            self._mode.__enter__()

    def _mode_on_top(self) -> bool:
        """True when our function mode is the innermost one (other modes may have been entered
        inside the model's forward: those are left as they are)."""
        if self._mode is None or self._mode_off:
            return False
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is self._mode

    def _post_hook(self, name: str, record: bool, is_root: bool, channels: bool | None,
                   activation: Activation | None, kind: str):
        key = name or kind

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            with torch._C.DisableTorchFunction():
                try:
                    if self._skipping or not self.stack or self.stack[-1].module is not module:
                        return  # forward raised below this module (always_call), or skipped pass
                    frame = self.stack.pop()
                    if frame.mode_off:
                        torch._C._push_on_torch_function_stack(self._mode)
                        self._mode_off = False
                    elif frame.mode_back:
                        torch._C._pop_torch_function_stack()
                        self._mode_off = True
                    if not record:
                        return
                    self._observe(key, kind, name, activation, output, frame.inputs)
                    if channels is not None:
                        self._channel_units = channels
                finally:
                    if is_root:
                        self._exit_mode()
        return hook

    def _rows_of_input(self, x: torch.Tensor) -> list[int] | None:
        """The input's raw rows; when an earlier record produced it, unchanged since
        (same object, same version), that record's rows. Called with ``__torch_function__``
        handling off, as :meth:`_observe` is."""
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] == x._version:
            return seen[2]
        if not x.is_floating_point():
            return None
        rows = self.store.reduce(x, extremes=False)  # an input's min and max are not reported
        self._seen[id(x)] = (weakref.ref(x), x._version, rows)
        return rows

    def _functional_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        owner = self.stack[-1] if self.stack else None
        if owner is None or self._leaf.get(id(owner.module), True) or not self.active:
            return func(*args, **kwargs)
        type_name = FUNCTIONAL_ACTIVATIONS[func][0]
        x = args[0] if args else None
        with torch._C.DisableTorchFunction():  # as in the hooks
            inputs = self._rows_of_input(x) if isinstance(x, torch.Tensor) else None
        output = func(*args, **kwargs)
        short = type_name.split(".", 1)[1]
        key = f"{owner.name}.{short}()" if owner.name else f"{short}()"
        with torch._C.DisableTorchFunction():
            self._observe(key, type_name, None, functional_activation(func, args, kwargs), output, inputs)
        return output

    def _observe(
        self,
        key: str,
        type_name: str,
        module_name: str | None,
        activation: Activation | None,
        output: Any,
        inputs: list[int] | None,
    ) -> None:
        """Reduce a call's output into the store under its record (created on the record's first
        call this step) and register its gradient hook. The caller has turned ``__torch_function__``
        handling off (the hooks, and :meth:`_functional_call`, enter ``DisableTorchFunction``)."""
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
        binning = None
        if self.bins:
            state.act_range, state.act_hist, binning = self._binning(name, 0, state.act_range, state.act_hist, y)
        family = activation.family if activation is not None else None
        if family == "relu":  # also the alive units
            rows, state.unit_max = self.store.reduce_units(y, state.unit_max, state.unit_dim, zeros=True,
                                                           histogram=binning)
        elif family == "saturating":
            bounds = (activation.low, activation.high)  # type: ignore[union-attr]
            rows = self.store.reduce(y, zeros=True, saturation=bounds, eps=self.eps, histogram=binning)
        else:
            rows = self.store.reduce(y, zeros=True, histogram=binning)
        record = state.index
        _own(self._act_rows, rows, record)
        if inputs:
            _own(self._input_rows, inputs, record)
        if self._device is None:
            self._device = y.device
        # This output's rows, for a later record that receives it unchanged.
        self._seen[id(y)] = (weakref.ref(y), y._version, rows)
        if self.bins and binning is None:
            state.act_range, state.act_hist = self._bin_apart(state.act_range, state.act_hist, y, rows)
        if self.backward and y.requires_grad and torch.is_grad_enabled():
            hook = self._grad_hook(state)
            if y.grad_fn is None:  # a leaf (a parameter returned as it is) outlives the step:
                self._leaf_hooks.append(y.register_hook(hook))  # its hook is removed at the next reset
            else:
                _hook_graph_output(y, hook)

    def _binning(self, name: str, which: int, bounds: Any, counts: torch.Tensor | None, x: torch.Tensor
                 ) -> tuple[Any, torch.Tensor | None, stats.Binning | None]:
        """A record's histogram range and counts for ``x``, its output (``which`` 0) or its gradient
        (1), and what to bin ``x`` into in the reduction's own pass: with a range known before the
        read (the record's hint; a range measured on its first call is a tensor) and a CPU
        tensor (unless :data:`stats.bins_in_reduction_on_cpu` is off); else None, and
        :meth:`_bin_apart` bins it after the reduction."""
        if bounds is None:
            bounds = self.range_hints.get(name, (None, None))[which]
        if not (isinstance(bounds, tuple) and x.is_cpu and stats.bins_in_reduction_on_cpu):
            return bounds, counts, None
        counts = self._zero_counts() if counts is None else counts
        return bounds, counts, (bounds, self.bins, counts)

    def _bin_apart(self, bounds: Any, counts: torch.Tensor | None, x: torch.Tensor, rows: list[int]
                   ) -> tuple[Any, torch.Tensor]:
        """Bin ``x`` after its reduction (off the CPU, or without a range before it: then the
        min/max of its ``rows``); the range and the counts."""
        if bounds is None:
            bounds = stats.histogram_range(self.store.extremes(rows, x.device))
        return bounds, stats.add_histogram(counts, x, bounds, self.bins)

    def _zero_counts(self) -> torch.Tensor:
        """A histogram's zero float64 CPU counts: a row of a block of them (one allocation for
        many records); ``list.pop`` hands each row out once, whatever thread asks."""
        try:
            return self._spare_counts.pop()
        except IndexError:
            self._spare_counts = list(torch.zeros(self._COUNTS_BLOCK, self.bins, dtype=torch.float64).unbind())
            return self._spare_counts.pop()

    def _grad_hook(self, state: RecordState):
        generation = self.generation

        def hook(grad: torch.Tensor | None) -> None:
            if not self.active or self.generation != generation:
                return
            if grad is None:  # no gradient reached this output (autograd calls the hook with None)
                return
            with torch._C.DisableTorchFunction():
                binning = None
                if self.bins:
                    state.grad_range, state.grad_hist, binning = self._binning(
                        state.name, 1, state.grad_range, state.grad_hist, grad)
                rows = self.store.reduce(grad, extremes=bool(self.bins), histogram=binning)  # extremes: a range
                state.grad_calls += 1
                _own(self._grad_rows, rows, state.index)
                if self.bins and binning is None:
                    state.grad_range, state.grad_hist = self._bin_apart(state.grad_range, state.grad_hist, grad, rows)
        return hook

    # --- results ---------------------------------------------------------------

    def failing_layer(self) -> _Frame | None:
        """The innermost module whose forward had started but not finished."""
        return self.stack[-1] if self.stack else None

    def input_info(self) -> tuple[tuple[int, ...] | None, float, float, float]:
        """``(shape, numel, sum of squares, non-finite count)`` of the root's first input;
        valid after the ``decode`` of :meth:`gather`."""
        return (self.input_shape, *self._input_totals)

    def gather(self, *, all_reduce: Any = None, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor | None, Callable[[np.ndarray], list[RecordSummary]]]:
        """Merge every record's partials on the device into one float64 vector.

        The caller moves the vector to the host, once, as a numpy array and
        passes it to the returned ``decode``, which gives the summaries in
        execution order. Nothing here synchronises with the device.

        Args:
            all_reduce: a function ``(sum_tensor, max_tensor) -> None`` reducing
                both in place across processes (``watch`` passes one for
                ``torch.distributed``); every process must hold the same records.
            extra: a float64 vector to bring along in the same transfer (the
                weight figures); ``decode`` leaves its host copy in :attr:`extra_host`.
        """
        self.extra_host = None
        states = sorted(self.records.values(), key=lambda s: s.index)
        self._input_totals = (0.0, 0.0, 0.0)
        if not states:
            return None, lambda host: []
        device = self._device if self._device is not None else torch.device("cpu")
        # All rows are finalized together, then reduced per record with index_add /
        # scatter_reduce: a fixed number of operations per step, whatever the number of layers.
        # Row counts and owners (Python integers) reach the device in one copy that does not
        # wait for it (stats.finalize_store). On the CPU the same arithmetic runs in numpy.
        host = stats.merges_on_host(device)
        xp: Any = np if host else torch
        cat = np.concatenate if host else torch.cat
        n_rec = len(states)
        act_rows, act_owner = _columns(self._act_rows)
        in_rows, in_owner = _columns(self._input_rows)
        grad_rows, grad_owner = _columns(self._grad_rows)
        final, (act_rows_i, act_owner_i, in_rows_i, in_owner_i, grad_rows_i, grad_owner_i, root_rows_i) = \
            stats.finalize_store(self.store, device, act_rows, act_owner, in_rows, in_owner, grad_rows, grad_owner,
                                 self._root_rows)
        act = stats.take_rows(final, act_rows_i)
        act_sums = cat([
            stats.sum_by_owner(act, act_owner_i, n_rec, _ROW_ACT),
            stats.sum_by_owner(stats.take_rows(final, in_rows_i), in_owner_i, n_rec, _ROW_INPUT),
        ], 1)
        act_high, act_low = stats.extremes_by_owner(act, act_owner_i, n_rec)
        grad = stats.take_rows(final, grad_rows_i)
        grad_sums = stats.sum_by_owner(grad, grad_owner_i, n_rec, _ROW_GRAD)
        grad_high, grad_low = stats.extremes_by_owner(grad, grad_owner_i, n_rec)
        inputs = stats.select_columns(stats.take_rows(final, root_rows_i), _ROW_ROOT).sum(0)
        sums = [inputs, act_sums.reshape(-1), grad_sums.reshape(-1)]
        maxes = [xp.stack([act_high, -act_low, grad_high, -grad_low], 1).reshape(-1)]
        # Per-record extras, tensors on the device: alive-unit masks and histograms.
        extra_sums: list[torch.Tensor] = []
        extra_maxes: list[torch.Tensor] = []
        maxima = [s.unit_max for s in states if s.unit_max is not None]
        alive = (stats.join(maxima, device) > 0).double() if maxima else None  # every record's, in order
        if not self.bins:  # the masks are all the extras
            extra_maxes += [alive] if alive is not None else []
        else:  # each record's mask, then its histograms (and their ranges when measured)
            masks = iter(alive.split([m.numel() for m in maxima]) if alive is not None else ())
            for s in states:
                if s.unit_max is not None:
                    extra_maxes.append(next(masks))
                for hist, edges in ((s.act_hist, s.act_range), (s.grad_hist, s.grad_range)):
                    if hist is not None:
                        extra_sums.append(hist)
                        if isinstance(edges, torch.Tensor):  # measured on the device; a hint stays on the host
                            extra_maxes.append(edges)
        if host:
            sums += [stats.join(extra_sums, device).numpy()] if extra_sums else []
            maxes += [stats.join(extra_maxes, device).numpy()] if extra_maxes else []
            sum_vec, max_vec = torch.from_numpy(np.concatenate(sums)), torch.from_numpy(np.concatenate(maxes))
        else:
            sum_vec, max_vec = stats.join(sums + extra_sums, device), stats.join(maxes + extra_maxes, device)
        if all_reduce is not None:
            all_reduce(sum_vec, max_vec)
        tail = [] if extra is None else [extra.to(device=device, dtype=torch.float64)]
        n_sum, end = sum_vec.numel(), sum_vec.numel() + max_vec.numel()

        def decode(host: np.ndarray) -> list[RecordSummary]:
            self._input_totals = tuple(float(v) for v in host[:3])  # type: ignore[assignment]
            self.extra_host = host[end:] if extra is not None else None
            return self._parse(states, host[3:n_sum], host[n_sum:end])

        return torch.cat([sum_vec, max_vec, *tail]), decode

    def record_modules(self) -> list[str]:
        """Module names of the records so far, in execution order (for :func:`weight_figures`)."""
        ordered = sorted(self.records.values(), key=lambda s: s.index)
        return [s.module_name for s in ordered if s.module_name is not None]

    def _parse(self, states: list[RecordState], sums: np.ndarray, maxes: np.ndarray) -> list[RecordSummary]:
        """Build the summaries on the host, from numpy slices of the step's single transfer."""
        n_rec, n_act = len(states), len(_ACT_ADDITIVE)
        act_sums = sums[:n_rec * n_act].reshape(n_rec, n_act)
        grad_sums = sums[n_rec * n_act:n_rec * (n_act + _GRAD_ADDITIVE)].reshape(n_rec, _GRAD_ADDITIVE)
        extremes = maxes[:n_rec * 4].reshape(n_rec, 4)
        i, j = n_rec * (n_act + _GRAD_ADDITIVE), n_rec * 4  # where the per-record extras start
        rows = np.zeros((n_rec, stats.ACT_WIDTH))
        rows[:, _ACT_ADDITIVE] = act_sums
        act_high, act_low = extremes[:, 0], -extremes[:, 1]
        ordered = act_low <= act_high  # else no finite value was seen
        rows[:, stats.A_MIN] = np.where(ordered, act_low, math.nan)
        rows[:, stats.A_MAX] = np.where(ordered, act_high, math.nan)
        acts = stats.summarize_activation_rows(rows)
        grads = stats.summarize_gradient_rows(grad_sums)
        # numpy arrays on the host (after the step's one transfer), read as Python floats
        rows_host, grad_host, extremes_host = rows.tolist(), grad_sums.tolist(), extremes.tolist()
        out: list[RecordSummary] = []
        histograms: list[tuple[Any, ...]] = []  # (record, attribute, low, high, min, max, num, sum, sum of squares)
        for r, s in enumerate(states):
            row, grad_row = rows_host[r], grad_host[r]
            _, _, g_high, g_neg_low = extremes_host[r]
            dead_frac = None
            if s.unit_max is not None:
                alive = maxes[j:j + s.unit_max.numel()]
                j += s.unit_max.numel()
                if row[stats.A_N] > 0:  # no value seen (empty batches): no unit is known dead
                    # masks hold 0 or 1: the same quotient as (alive == 0).sum() / size, as a Python float
                    dead_frac = (alive.size - int(np.count_nonzero(alive))) / alive.size if alive.size else math.nan
            act, input_rms, input_numel, saturated = acts[r]
            grad = grads[r] if s.grad_calls else None
            if s.act_hist is not None:
                (low, top), j = _edges(s.act_range, maxes, j)
                histograms.append((r, "act_hist", low, top, act.min, act.max,
                                   row[stats.A_N] - row[stats.A_NONFINITE], row[stats.A_SUM], row[stats.A_SUMSQ]))
            if s.grad_hist is not None:
                (low, top), j = _edges(s.grad_range, maxes, j)
                histograms.append((r, "grad_hist", low, top, -g_neg_low, g_high,
                                   grad_row[stats.G_N] - grad_row[stats.G_NONFINITE],
                                   grad_row[stats.G_SUM], grad_row[stats.G_SUMSQ]))
            family = s.activation.family if s.activation else None
            out.append(RecordSummary(
                name=s.name, type=s.type, index=s.index, module_name=s.module_name,
                activation=s.activation, act=act, input_rms=input_rms, input_numel=input_numel,
                grad=grad, dead_frac=dead_frac,
                saturation=saturated if family == "saturating" else None,
            ))
        if histograms:  # their counts follow the records' sums, in the same order
            counts = sums[i:i + len(histograms) * self.bins].reshape(len(histograms), self.bins)
            records, which, *figures = zip(*histograms)
            for r, attribute, hist in zip(records, which, make_histograms(counts, *figures)):
                setattr(out[r], attribute, hist)
        return out


def _hook_graph_output(y: torch.Tensor, hook: Callable[[torch.Tensor | None], None]) -> None:
    """``y.register_hook(hook)`` for an output of the graph (``y.grad_fn`` set), without the handle.

    ``Tensor.register_hook`` puts the hook in the tensor's hook dict, which its
    ``grad_fn`` calls for that output; then it builds a ``RemovableHandle``,
    which costs about seven times the rest in a loop (7.4 against 0.9 µs) and
    about 20 µs per output in a cnn step, where the hooks run with the cache
    swept by the layers between them.
    Nobody removes a graph output's hook: it goes with the graph. So this does
    the first part only, as ``register_hook`` does it, keyed by the hook itself
    (the handles' keys are integers). Hooks run in the dict's order, so ours
    sees the gradient before any hook the user adds to ``y`` afterwards.
    """
    hooks = y._backward_hooks
    if hooks is None:
        hooks = y._backward_hooks = OrderedDict()
        y.grad_fn._register_hook_dict(y)  # type: ignore[union-attr]
    hooks[hook] = hook


def _edges(bounds: torch.Tensor | tuple[float, float] | None, maxes: np.ndarray, j: int
           ) -> tuple[tuple[float, float], int]:
    """A histogram's ``(low, high)``: a host hint as it is, a measured range from ``maxes[j:j + 2]``;
    and the position after what was read."""
    if isinstance(bounds, tuple):
        return bounds, j
    return (float(maxes[j]), float(maxes[j + 1])), j + 2


def _own(pairs: list[tuple[int, int]], rows: list[int], record: int) -> None:
    """Note ``record`` as the owner of ``rows`` (usually one: a tensor the kernel read)."""
    if len(rows) == 1:
        pairs.append((rows[0], record))
    else:
        pairs.extend([(r, record) for r in rows])


def _columns(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Split ``(row, record)`` pairs into a list of rows and a list of records."""
    return [p[0] for p in pairs], [p[1] for p in pairs]


# Finalized-row columns summed per record, in the order of the record's additive
# activation columns (stats.A_*, min and max left out) and gradient columns (stats.G_*).
_ROW_ACT = [stats.F_N, stats.F_SUM, stats.F_SUMSQ, stats.F_ZEROS, stats.F_NONFINITE, stats.F_SATURATED]
_ROW_INPUT = [stats.F_N, stats.F_SUMSQ]
_ROW_GRAD = [stats.F_N, stats.F_SUM, stats.F_SUMSQ, stats.F_NONFINITE]
_ROW_ROOT = [stats.F_N, stats.F_SUMSQ, stats.F_NONFINITE]
_ACT_ADDITIVE = [c for c in range(stats.ACT_WIDTH) if c not in (stats.A_MIN, stats.A_MAX)]
_GRAD_ADDITIVE = stats.G_NONFINITE + 1  # count, sum, sum of squares, non-finite

