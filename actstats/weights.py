"""Weights held against theory: figures measured on the device, and the report's ``weight`` block.

:func:`weight_figures` measures every parametric module's weights (per gate or
projection part) into one float64 vector on the device, so that a probe or a
watched step moves them to the host in its single transfer; :func:`weight_info`
turns those figures, the fans and the nonlinearity that follows a layer into
the ``weight`` block (SPEC 5).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from actstats import native, stats, theory
from actstats.report import WeightInfo

if TYPE_CHECKING:
    from actstats.hooks import RecordSummary


@dataclass(frozen=True)
class WeightFigures:
    """A parametric module's weight figures, measured on its device and read in one transfer.

    Attributes:
        parts: ``(std, rms)`` of each :func:`theory.weight_parts` part (population std).
        symmetric: every output unit has the same weights and the same bias.
        first: the first weight value (what a constant init filled in).
        sources: the parts measured (views of the weights, for the step that measured them).
    """

    parts: tuple[tuple[float, float], ...]
    symmetric: bool
    first: float
    sources: tuple[theory.WeightPart, ...] = field(default=(), compare=False, repr=False)


def unit_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output units: 1 for ConvTranspose (``[in, out, *k]``), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def _units_equal(rows: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: are all rows of ``rows`` (units x inputs) identical?

    A contiguous float32 CPU matrix is compared by the compiled kernel. Otherwise
    each row minus the first, into the scratch buffer (chunks of whole rows),
    then ``aminmax``: identical exactly when every difference is zero. Fast
    full reductions only (a per-column ``aminmax(dim=0)`` is several times
    slower on CPU), and no mask as large as the weight.
    """
    if native.row_major_float32_cpu(rows):  # the kernel stops at the first row that differs
        return torch.tensor(native.kernels.rows_equal(rows.data_ptr(), rows.shape[0], rows.shape[1]))
    first = rows[:1]
    size = stats.chunk_size(rows.device)
    per_chunk = max(1, size // max(1, rows.shape[1]))
    extremes = []
    for start in range(0, rows.shape[0], per_chunk):
        part = rows[start:start + per_chunk]
        if part.numel() <= size:
            diff = torch.sub(part, first, out=stats.scratch(part, part.numel()).view(part.shape))
        else:  # a single row wider than the scratch buffer
            diff = part - first
        extremes.append(torch.stack(torch.aminmax(diff)))
    both = torch.stack(extremes)  # [chunks, (min, max)]
    return (both[:, 0].amin() == 0) & (both[:, 1].amax() == 0)


def _all_units_equal(module: nn.Module, parts: Sequence[theory.WeightPart]) -> torch.Tensor:
    """A 0-d bool tensor on the weights' device (no synchronisation); False for a module with an
    empty weight part (no weights: nothing makes its units alike)."""
    verdict = torch.ones((), dtype=torch.bool, device=parts[0].tensor.device)
    for part in parts:
        if not part.tensor.numel():
            return torch.zeros((), dtype=torch.bool, device=part.tensor.device)
        w = part.tensor.detach().float()
        if isinstance(module, nn.Embedding):  # units are columns; symmetric when all values are equal
            low, high = torch.aminmax(w)
            verdict = verdict & (low == high)
            continue
        rows = w.transpose(0, unit_dim(module)).reshape(w.shape[unit_dim(module)], -1)
        if rows.shape[0] < 2:
            return torch.zeros((), dtype=torch.bool, device=w.device)
        verdict = verdict & _units_equal(rows)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() > 1:
        low, high = torch.aminmax(bias.detach())
        verdict = verdict & (low == high).to(verdict.device)
    return verdict


class WeightMeasure:
    """The weights of parametric modules read into one :class:`stats.RowStore` on their device
    (nothing reaches the host), module by module: the recorder reads a module's weights in
    its forward pre-hook, on its first call of a step, while they are about to be read by
    the layer itself (in cache then, and the weights that produce the step's activations,
    before an optimizer changes them); :func:`weight_figures` finishes the figures.

    Everything a module's figures need is taken when it is read: its parts' sums, its
    first value (the shift of its first row, or a copy where that row's shift is a mean),
    and the symmetric verdict of a module not in ``not_symmetric`` (a 0-d bool on its device).
    """

    def __init__(self, not_symmetric: Collection[nn.Module] = ()) -> None:
        self.store = stats.RowStore()
        self.owners: list[int] = []  # the part each row of the store belongs to
        self.parts: dict[nn.Module, list[theory.WeightPart]] = {}  # measured modules, in order
        self.n_parts = 0
        #: modules found not symmetric before (a watch keeps them); the others' verdicts are measured here
        self.not_symmetric = not_symmetric
        self.verdicts: dict[nn.Module, torch.Tensor] = {}
        #: each module's first row, and a copy of its first value where that row's shift is not
        self.lead_rows: dict[nn.Module, int] = {}
        self.firsts: dict[nn.Module, torch.Tensor] = {}

    def add(self, module: nn.Module) -> None:
        """Read ``module``'s weight parts (:func:`theory.weight_parts`), unless already read."""
        if module in self.parts:
            return
        with torch.no_grad():
            parts = self.parts[module] = theory.weight_parts(module)
            for part in parts:
                rows = self.store.moments(part.tensor)
                if part is parts[0] and rows:
                    self.lead_rows[module] = rows[0]
                    if stats.takes_welford_rows(part.tensor):  # its shift is the mean: keep the value itself
                        self.firsts[module] = part.tensor.reshape(-1)[0].clone()
                self.owners += [self.n_parts] * len(rows)
                self.n_parts += 1
            if parts and module not in self.not_symmetric:
                self.verdicts[module] = _all_units_equal(module, parts)


def weight_figures(modules: Sequence[nn.Module], *,
                   measured: WeightMeasure | None = None) -> tuple[torch.Tensor | None, Any]:
    """Measure the weights of ``modules`` on their device into one float64 vector.

    Every part's sum and sum of squares come from one :class:`stats.RowStore`
    (:meth:`~stats.RowStore.moments`: float32 sums shifted by the first value,
    exact for a constant weight), finalized together; the population std and
    rms follow on the device. ``measured`` holds weights read earlier (the
    recorder's, read in the forward pass): modules of ``modules`` it lacks are
    read now, and it gives figures for all its modules. Its ``not_symmetric``
    modules skip the symmetry check: training cannot make distinct units
    identical, so ``watch`` remembers the modules found not symmetric and checks
    the others again at each sampled step (identical units separate when the
    layer after them sends them different gradients).
    Returns the vector (None when there is nothing to measure) and a function
    turning its host copy into ``{module: WeightFigures}``, so that a probe or a
    watched step moves weight figures to the host in the same single transfer as
    its statistics.
    """
    measure = measured if measured is not None else WeightMeasure()
    for module in modules:
        measure.add(module)
    store, owners, n_parts = measure.store, measure.owners, measure.n_parts
    verdicts = [measure.verdicts[m] for m in measure.parts if m in measure.verdicts]
    layout: list[tuple[nn.Module, list[theory.WeightPart], bool | None]] = [  # module, parts, verdict if known
        (module, parts, None if module in measure.verdicts else False)
        for module, parts in measure.parts.items() if parts
    ]
    if not layout:
        return None, lambda host: {}
    device = layout[0][1][0].tensor.device
    final, (owner,) = stats.finalize_store(store, device, owners)  # numpy arrays on the CPU
    n, total, sumsq = stats.sum_by_owner(final, owner, n_parts, [stats.F_N, stats.F_SUM, stats.F_SUMSQ]).T
    on_host = isinstance(final, np.ndarray)
    xp: Any = np if on_host else torch
    std, rms = _std_rms(n, total, sumsq, xp)
    # Each module's first value: the shift of its first row (kernel and shifted rows), a copy where
    # that shift is a mean (Welford rows), NaN for an empty weight.
    lead_rows = [measure.lead_rows.get(module) for module, _, _ in layout]
    if on_host and not measure.firsts and None not in lead_rows:  # no operation per module
        firsts = store.collect(device).numpy()[lead_rows, stats.R_SHIFT]
    else:
        shifts = store.collect(device)[:, stats.R_SHIFT]
        nan = torch.full((), math.nan, dtype=torch.float64, device=device)
        firsts = stats.join([measure.firsts[m].double() if m in measure.firsts else nan if r is None else shifts[r]
                             for (m, _, _), r in zip(layout, lead_rows)], device, stack=True)
        firsts = firsts.numpy() if on_host else firsts
    pieces = [xp.stack([std, rms], 1).reshape(-1), firsts]
    if verdicts:
        pieces.append(stats.join(verdicts, device, stack=True))
    if on_host:
        vector = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.float64) for p in pieces]))
    else:
        vector = torch.cat(pieces)

    def decode(host: Any) -> dict[nn.Module, WeightFigures]:
        out: dict[nn.Module, WeightFigures] = {}
        part, verdict = 0, 2 * n_parts + len(layout)
        for m, (module, parts, symmetric) in enumerate(layout):
            figures = tuple((float(host[2 * k]), float(host[2 * k + 1])) for k in range(part, part + len(parts)))
            part += len(parts)
            if symmetric is None:
                symmetric = bool(host[verdict])
                verdict += 1
            out[module] = WeightFigures(figures, symmetric, float(host[2 * n_parts + m]), tuple(parts))
        return out

    return vector, decode


def _std_rms(n: Any, total: Any, sumsq: Any, xp: Any) -> tuple[Any, Any]:
    """Population std and rms from counts, sums and sums of squares (``xp``: torch or numpy)."""
    with np.errstate(all="ignore") if xp is np else contextlib.nullcontext():  # NaN/Inf weights: NaN figures
        mean, mean_square = total / n, sumsq / n
        variance = mean_square - mean * mean
        variance = variance.clamp_min(0.0) if xp is torch else np.maximum(variance, 0.0)  # NaN stays NaN
        return xp.sqrt(variance), xp.sqrt(mean_square)


def parametric_modules(names: Sequence[str | None], modules: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The distinct parametric modules with these names (records' ``module_name``), in order."""
    found: dict[int, nn.Module] = {}
    for name in names:
        module = modules.get(name) if name is not None else None
        if module is not None and theory.is_parametric(module):
            found.setdefault(id(module), module)
    return list(found.values())


def _part_info(part: theory.WeightPart, figures: tuple[float, float],
               following: theory.Activation | None) -> dict[str, object]:
    std, rms = figures
    if part.nonlinearity is not None:
        nonlinearity, param = part.nonlinearity, None
    elif following is not None:
        nonlinearity, param = following.nonlinearity, following.param
    else:
        nonlinearity, param = "linear", None
    static = _theory_of(part.tensor.shape, nonlinearity, param)
    return {"name": part.name, "std": std, **static, "predicted_gain": math.sqrt(static["fan_in"]) * rms}


@functools.lru_cache(maxsize=1 << 12)  # a watched model asks again every sampled step
def _theory_of(shape: torch.Size, nonlinearity: str, param: float | None) -> dict[str, Any]:
    """What theory says of a weight part of this shape followed by this nonlinearity: fans,
    the three schemes' stds, the reference scheme and its std (no measured figure)."""
    fan_in, fan_out = theory.fans(torch.empty(shape, device="meta"))  # fans depend on the shape alone
    gain = theory.gain(nonlinearity, param)
    reference = theory.reference_scheme(nonlinearity)
    return {
        "fan_in": fan_in,
        "fan_out": fan_out,
        "xavier_std": theory.xavier_std(fan_in, fan_out),
        "he_std": theory.he_std(fan_in, gain),
        "lecun_std": theory.lecun_std(fan_in),
        "expected_std": theory.expected_std(reference, fan_in, fan_out, gain),
        "reference": reference,
        "nonlinearity": nonlinearity,
    }


def weight_info(module: nn.Module | None, following: theory.Activation | None, summary: RecordSummary,
                figures: Mapping[nn.Module, WeightFigures]) -> WeightInfo | None:
    """The ``weight`` block of a parametric record (None for anything else).

    ``following`` is the activation after the layer (it sets the gain);
    ``summary`` gives the measured gain ``act.rms / input_rms``.
    """
    if module is None or module not in figures:
        return None
    fig = figures[module]
    parts = [_part_info(p, f, following) for p, f in zip(fig.sources or theory.weight_parts(module), fig.parts)]
    main = parts[0]
    act, input_rms = summary.act.rms, summary.input_rms
    measured = act / input_rms if input_rms and math.isfinite(input_rms) and not isinstance(module, nn.Embedding) else None
    return WeightInfo(
        std=main["std"], fan_in=main["fan_in"], fan_out=main["fan_out"],  # type: ignore[arg-type]
        xavier_std=main["xavier_std"], he_std=main["he_std"], lecun_std=main["lecun_std"],  # type: ignore[arg-type]
        expected_std=main["expected_std"], reference=main["reference"],  # type: ignore[arg-type]
        nonlinearity=main["nonlinearity"], predicted_gain=main["predicted_gain"],  # type: ignore[arg-type]
        measured_gain=measured,
        parts=tuple(parts) if len(parts) > 1 else (),
    )
