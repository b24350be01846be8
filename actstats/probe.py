"""``actstats.probe``: run a few batches through a model with hooks and return a Report.

The model is left as it was found: hooks removed, every module's ``training``
flag restored, buffers (BatchNorm running statistics) restored bitwise, the
global RNG state untouched, the model moved back to its device, and no
parameter's ``.grad`` touched (gradients are taken with ``torch.autograd.grad``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from actstats import inputs as inputs_mod
from actstats import stats
from actstats.diagnose import Thresholds, diagnose, following_activations
from actstats.errors import ForwardError, InputError, NothingToHookError
from actstats.hooks import Recorder, RecordSummary, iter_tensors, modules_by_name, unwrap
from actstats.report import Flag, Histogram, InputInfo, LayerReport, Report
from actstats.schemes import InitSummary, SchemeSpec, init_weights, parse_scheme
from actstats.weights import WeightFigures, parametric_modules, weight_figures


def collect(recorder: Recorder, *, all_reduce: Any = None, extra: torch.Tensor | None = None) -> list[RecordSummary]:
    """Merge a recorder's statistics on the device and bring them to the host in one transfer."""
    vector, decode = recorder.gather(all_reduce=all_reduce, extra=extra)
    return decode(vector.cpu().numpy()) if vector is not None else []


@dataclass(frozen=True)
class Concluded:
    """What one probe or sampled step concluded, once its statistics reached the host."""

    summaries: list[RecordSummary]
    input: InputInfo
    layers: tuple[LayerReport, ...]
    flags: tuple[Flag, ...]
    figures: Mapping[nn.Module, WeightFigures]
    histograms: dict[str, tuple[Histogram | None, Histogram | None]]


def conclude(recorder: Recorder, root: nn.Module, *, thresholds: Thresholds, eps: float,
             all_reduce: Any = None) -> Concluded:
    """Merge a recorder's statistics (across processes with ``all_reduce``), bring them and the
    weight figures to the host in one transfer, and diagnose them: shared by probe and watch."""
    named = recorder.modules if recorder.root is root and recorder.modules else modules_by_name(root)
    vector, decode = weight_figures(parametric_modules(recorder.record_modules(), named), measured=recorder.weights)
    summaries = collect(recorder, all_reduce=all_reduce, extra=vector)
    figures = decode(recorder.extra_host) if vector is not None and summaries else {}
    shape, n, sumsq, nonfinite = recorder.input_info()
    info = InputInfo(shape=shape or (), rms=(sumsq / n) ** 0.5 if n else float("nan"), nonfinite=int(nonfinite))
    layers, flags = diagnose(summaries, named, info, batches=recorder.forward_calls,
                             thresholds=thresholds, eps=eps, figures=figures)
    histograms = {s.name: (s.act_hist, s.grad_hist) for s in summaries} if recorder.bins else {}
    return Concluded(summaries, info, layers, flags, figures, histograms)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``auto``/None: the model's own device (cuda for ``auto`` when the model has no parameters)."""
    if device is None or device == "auto":
        first = next(iter(model.parameters()), None)
        if first is not None and device is None:
            return first.device
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device {device!r} is not a torch device; expected auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return resolved


@contextlib.contextmanager
def preserved(model: nn.Module, device: torch.device, *, train: bool) -> Iterator[None]:
    """Put ``model`` in the probe's mode and device; restore everything on exit."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    home = params[0].device if params else None
    moved = home is not None and home != device
    try:
        if moved:
            model.to(device)
        model.train(train)
        yield
    finally:
        if moved:
            model.to(home)
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved.to(buf.device))


def _describe_module(module: nn.Module) -> str:
    extra = module.extra_repr()
    return f"{type(module).__name__}, {extra}" if extra else type(module).__name__


def _forward_error(err: Exception, recorder: Recorder, batch: Any, root: nn.Module) -> ForwardError:
    frame = recorder.failing_layer()
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if frame is None or frame.module is root:
        return ForwardError(
            f"forward of the model ({type(root).__name__}) failed on inputs "
            f"{inputs_mod.describe(batch)}: {reason}"
        )
    return ForwardError(
        f"forward failed in layer '{frame.name}' ({_describe_module(frame.module)}) "
        f"on an input of shape {frame.input_shapes}: {reason}"
    )


def probe(
    model: nn.Module,
    inputs: Any,
    *,
    batches: int | None = 4,
    batch_size: int = 32,
    backward: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    train: bool = True,
    eps: float = 0.01,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    init: str | None = None,
    histogram_bins: int = 0,
) -> Report:
    """Probe ``model`` on a few batches and return per-record statistics.

    Args:
        model: any ``nn.Module`` (a DDP/DataParallel wrapper is looked through).
        inputs: one batch (a tensor, a tuple of positional tensors, a dict of
            keyword tensors; ``batches > 1`` adds batches made like it), an
            iterable of batches (a list, a DataLoader: the first ``batches``),
            or a callable ``batch_size -> batch`` (called ``batches`` times).
        batches: number of probe batches (None: all of an iterable; 1 otherwise).
        batch_size: passed to an ``inputs`` callable.
        backward: back-propagate a standard-normal cotangent from every floating
            output that requires grad (unit-variance output gradient).
        device: ``None`` (the model's device), ``"auto"``, ``"cpu"``, ``"cuda:0"``...
        seed: seeds the made-alike batches, the cotangents and the model's own
            randomness (dropout) without disturbing the caller's RNG state.
        train: probe in train mode (what training sees); False for eval mode.
        eps: saturation tolerance.
        thresholds: flag thresholds, a :class:`~actstats.diagnose.Thresholds` or
            a dict of overrides such as ``{"dead_relu": 0.3}``.
        init: re-initialize the model first with a named scheme (SPEC 7; this
            changes its weights in place, on purpose). The nonlinearity after each
            layer is traced from one forward pass on the first batch, so functional
            activations count; ``lsuv`` uses that batch.
        histogram_bins: also compute activation and gradient histograms on the
            device with this many bins (``Report.histograms``, for TensorBoard).

    Returns:
        A :class:`~actstats.report.Report` with one layer per record, in
        execution order. Standard deviations are population figures.

    Example:
        >>> report = actstats.probe(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(8, 4))
        >>> [layer.name for layer in report.layers]
        ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    root = unwrap(model)
    try:
        limits = Thresholds.from_mapping(thresholds)
    except ValueError as err:
        raise InputError(str(err)) from err
    target = resolve_device(device, root)
    generator = torch.Generator().manual_seed(seed)
    made = inputs_mod.materialize(inputs, batches=batches, batch_size=batch_size, generator=generator)
    spec = parse_scheme(init) if init is not None else None  # validate before touching the model
    notices: list[str] = []
    recorder = Recorder(root, backward=backward, eps=eps, histogram_bins=histogram_bins)
    summary = None
    with preserved(root, target, train=train), torch.random.fork_rng(devices=_cuda_devices(target)):
        torch.manual_seed(seed)
        if spec is not None:
            summary = _initialize(root, spec, inputs_mod.to_device(made[0], target), target, seed)
            if summary.untouched:
                notices.append(f"init {spec.text!r} left {len(summary.untouched)} parameter(s) of "
                               f"unknown module types alone: {', '.join(summary.untouched)}")
        with recorder:
            for index, cpu_batch in enumerate(made):
                batch = inputs_mod.to_device(cpu_batch, target)
                with torch.enable_grad():
                    try:
                        output = inputs_mod.call(root, batch)
                    except Exception as err:
                        raise _forward_error(err, recorder, batch, root) from err
                    if index == 0 and not recorder.records:
                        raise NothingToHookError(
                            f"model {type(root).__name__} has nothing to hook: no module with "
                            "parameters, no leaf module besides the root, and no functional "
                            "activation was called in its forward"
                        )
                    if backward:
                        note = _backpropagate(root, output, generator, target)
                        if note and note not in notices:
                            notices.append(note)
        step = conclude(recorder, root, thresholds=limits, eps=eps)
    return Report(
        model=type(root).__name__,
        device=str(target),
        batches=len(made),
        batch_size=step.input.shape[0] if step.input.shape else None,
        input=step.input,
        layers=step.layers,
        flags=step.flags,
        init=summary.scheme if summary is not None else "default",
        untouched=summary.untouched if summary is not None else (),
        notices=tuple(notices),
        histograms=step.histograms,
    )


def trace_following(root: nn.Module, batch: Any) -> dict[nn.Module, Any]:
    """Run one forward pass (no grad) and map each module to the activation after it."""
    with Recorder(root, backward=False, read_weights=False) as recorder, torch.no_grad():
        try:
            inputs_mod.call(root, batch)
        except Exception as err:
            raise _forward_error(err, recorder, batch, root) from err
    return following_activations(collect(recorder), modules_by_name(root))


def _initialize(root: nn.Module, spec: SchemeSpec, batch: Any, device: torch.device, seed: int) -> InitSummary:
    following = trace_following(root, batch)
    generator = torch.Generator(device=device).manual_seed(seed)
    return init_weights(root, spec, generator=generator, nonlinearities=following, inputs=batch)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _backpropagate(root: nn.Module, output: Any, generator: torch.Generator, device: torch.device) -> str | None:
    """Back-propagate a standard-normal cotangent from every differentiable output.

    Uses ``torch.autograd.grad`` w.r.t. the parameters (and any input that
    requires grad) so that no ``.grad`` attribute is written.
    """
    outs = [t for t in iter_tensors(output) if t.is_floating_point() and t.requires_grad]
    if not outs:
        return "the model's output has nothing differentiable; probed forward only (no gradient statistics)"
    leaves = [p for p in root.parameters() if p.requires_grad]
    if not leaves:
        return "no parameter requires grad; probed forward only (no gradient statistics)"
    cotangents = [
        stats.host_to_device(torch.randn(t.shape, generator=generator, dtype=torch.float32), t.device).to(t.dtype)
        for t in outs
    ]
    try:
        torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    except RuntimeError as err:
        raise ForwardError(f"backward failed: {str(err).strip().splitlines()[0]}") from err
    return None
