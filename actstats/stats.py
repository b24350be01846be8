"""Streaming, mergeable statistics of tensors.

A hook reduces each tensor it sees, on the tensor's own device, into a small
float64 vector (a *partial*); nothing leaves the device inside a hook. The
partials of many calls and batches are merged on the host once by adding
counts, sums and sums of squares in float64, so the result is the statistic of
all values seen together, never an average of per-batch figures. Within one
call the sums run in float32 (float64 for float64 tensors) on values shifted
by their first value and scaled by a power of two, which keeps them accurate
for large means and free of overflow; the shift and scale come back out once
per step (see :func:`_raw_moments`).

Conventions: standard deviations are population figures (divide by N),
``std = sqrt(E[x^2] - E[x]^2)`` from the merged sums; ``rms = sqrt(E[x^2])``;
a tensor holding NaN or Inf gives non-finite sums and counts those elements
in ``nonfinite``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Columns of an activation partial, after :func:`finalize_activations` (additive but for min/max).
A_N, A_SUM, A_SUMSQ, A_MIN, A_MAX, A_ZEROS, A_NONFINITE, A_SATURATED, A_IN_N, A_IN_SUMSQ = range(10)
ACT_WIDTH = 10
# Columns of a gradient partial, after :func:`finalize_gradients`.
G_N, G_SUM, G_SUMSQ, G_NONFINITE, G_MIN, G_MAX = range(6)

# What a hook stores per call (a "raw" row, float64): the sums of (x - c) / s with c and s,
# so that taking the shift and scale back out happens once per step over all calls. The
# element counts are Python integers kept beside the rows (exact, and no device work).
MOMENTS_WIDTH = 4  # c, s, sum, sum of squares
RAW_ACT_WIDTH = MOMENTS_WIDTH + 5 + MOMENTS_WIDTH  # moments, min, max, nonfinite, NaNs of x/x, saturated, input
RAW_GRAD_WIDTH = MOMENTS_WIDTH + 3  # moments, min, max, nonfinite


def as_float(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` in float32 or wider: statistics never accumulate in fp16/bf16."""
    x = x.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def input_partial(x: torch.Tensor) -> torch.Tensor:
    """The raw moments block (``MOMENTS_WIDTH`` float64 values) of a layer's input."""
    xf = as_float(x)
    if xf.numel() == 0:
        return torch.zeros(MOMENTS_WIDTH, dtype=torch.float64, device=xf.device)
    return torch.stack(_raw_moments(xf, nonfinite=False)[:MOMENTS_WIDTH]).double()


def input_summary(x: torch.Tensor) -> torch.Tensor:
    """The raw moments block of a model input followed by its non-finite count."""
    xf = as_float(x)
    if xf.numel() == 0:
        return torch.zeros(MOMENTS_WIDTH + 1, dtype=torch.float64, device=xf.device)
    raw = _raw_moments(xf)
    return torch.stack([*raw[:MOMENTS_WIDTH], raw[6]]).double()


def finalize_inputs(raw: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Merged ``[numel, sum of squares, non-finite count]`` of :func:`input_summary` rows."""
    total_n, _, sumsq = _undo(raw[:, :MOMENTS_WIDTH], numels)
    return torch.stack([total_n, sumsq, raw[:, MOMENTS_WIDTH].double()], dim=1).sum(0)


#: Elementwise work runs in chunks of at most this many values, inside one reused
#: scratch buffer per (device, dtype): no temporary as large as an activation is
#: allocated (on CPU a fresh buffer costs page faults, more than the arithmetic).
CHUNK = 1 << 20
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _buffer(like: torch.Tensor, n: int) -> torch.Tensor:
    key = (like.device, like.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(min(max(n, 1 << 16), CHUNK), dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf[:n]


def _chunks(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i:i + CHUNK] for i in range(0, flat.numel(), CHUNK)] if flat.numel() > CHUNK else [flat]


def sums(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares of a float32/64 tensor (0-d float64, on its device); see :func:`_raw_moments`."""
    raw = torch.stack(_raw_moments(xf, nonfinite=False)[:MOMENTS_WIDTH]).double()
    numels = torch.full((1,), float(xf.numel()), dtype=torch.float64, device=xf.device)
    _, total, sumsq = _undo(raw[None], numels)
    return total[0], sumsq[0]


def _raw_moments(xf: torch.Tensor, *, zeros: bool = False, nonfinite: bool = True) -> list[torch.Tensor]:
    """``[c, s, sum, sum of squares, min, max, non-finite count, NaNs of x / x]`` of a
    non-empty float32/64 tensor: 0-d tensors of its dtype on its device, no synchronisation.

    The sums run in the tensor's own precision (PyTorch's cascade summation and
    ``dot``; a float64 ``dtype=`` costs a full conversion copy on CPU) over
    ``(x - c) / s``: ``c`` the first value (zero if it is not finite), so that a
    large mean does not cancel the variance away, and ``s`` the power of two
    above the largest ``|x - c|``, so that a float32 sum of squares cannot
    overflow (the scaling is exact). :func:`_undo` takes the shift and scale back
    out, in float64, once per step for all calls. Non-finite values are counted
    as the NaNs of ``(x - c) * 0``; zeros (when asked) follow from the NaNs of
    ``x / x``. The elementwise work runs in chunks inside one reused scratch
    buffer, so the counts are exact float32 sums. Few operations per call: their
    number, not their size, is what a small layer pays.
    """
    low, high = torch.aminmax(xf)
    flat = xf.reshape(-1)
    center = flat[0].nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    _, exponent = torch.frexp(torch.maximum(high - center, center - low))
    scale = torch.exp2(exponent.to(xf.dtype))
    rows: list[list[torch.Tensor]] = []
    for part in _chunks(flat):
        buf = _buffer(part, part.numel())
        torch.sub(part, center, out=buf).div_(scale)
        row = [buf.sum(), torch.dot(buf, buf)]
        row.append(buf.mul_(0.0).nan_to_num_(nan=1.0).sum() if nonfinite else row[0] * 0)
        if zeros:
            torch.div(part, part, out=buf)  # 1 where x is finite and non-zero, else NaN
            row.append(part.numel() - buf.nan_to_num_(nan=0.0).sum())
        else:
            row.append(row[0] * 0)
        rows.append(row)
    if len(rows) == 1:
        shifted, squares, bad, nans = rows[0]
    else:  # tensors over CHUNK values only, where a few more operations do not matter
        shifted, squares, bad, nans = (torch.stack([r[k] for r in rows]).sum() for k in range(4))
    return [center, scale, shifted, squares, low, high, bad, nans]


def _undo(raw: torch.Tensor, numels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, sum, sum of squares)`` per row of raw moments blocks (float64 ``[k, 4]``)."""
    c, s = raw[:, 0], raw[:, 1]
    shifted = raw[:, 2] * s
    total = shifted + numels * c
    sumsq = raw[:, 3] * s * s + c * (2 * shifted + numels * c)
    return numels, total, sumsq


def activation_partial(
    x: torch.Tensor,
    inputs: torch.Tensor | None,
    saturation_bounds: tuple[float, float] | None,
    eps: float,
) -> torch.Tensor:
    """Reduce an output tensor into a raw activation row (``RAW_ACT_WIDTH`` float64 values).

    Args:
        x: the output of one layer call (any shape, any floating dtype).
        inputs: that call's :func:`input_partial`, or None when it had no tensor input.
        saturation_bounds: ``(low, high)`` asymptotes of a saturating activation;
            outputs within ``eps`` of either count as saturated. None: not counted.
        eps: the saturation tolerance.
    """
    xf = as_float(x)
    if xf.numel() == 0:
        row = torch.zeros(RAW_ACT_WIDTH, dtype=torch.float64, device=xf.device)
        row[MOMENTS_WIDTH:MOMENTS_WIDTH + 2] = math.nan
        return row
    raw = _raw_moments(xf, zeros=True)
    if saturation_bounds is None:
        saturated = raw[6] * 0
    else:
        lo, hi = saturation_bounds
        saturated = ((xf <= lo + eps) | (xf >= hi - eps)).sum().to(xf.dtype)
    head = torch.stack([*raw, saturated]).double()
    if inputs is None:
        inputs = torch.zeros(MOMENTS_WIDTH, dtype=torch.float64, device=xf.device)
    return torch.cat([head, inputs.to(head.device)])


def finalize_activations(raw: torch.Tensor, numels: torch.Tensor, in_numels: torch.Tensor) -> torch.Tensor:
    """Turn raw activation rows ``[k, RAW_ACT_WIDTH]`` into ``[k, ACT_WIDTH]`` partials."""
    n, total, sumsq = _undo(raw[:, :MOMENTS_WIDTH], numels)
    _, _, in_sumsq = _undo(raw[:, RAW_ACT_WIDTH - MOMENTS_WIDTH:], in_numels)
    low, high, bad, nans, saturated = (raw[:, MOMENTS_WIDTH + k] for k in range(5))
    in_sumsq = torch.where(in_numels > 0, in_sumsq, torch.full_like(in_sumsq, math.nan))
    return torch.stack([n, total, sumsq, low, high, nans - bad, bad, saturated, in_numels, in_sumsq], dim=1)


def gradient_partial(g: torch.Tensor) -> torch.Tensor:
    """Reduce a gradient tensor into a raw gradient row (``RAW_GRAD_WIDTH`` float64 values)."""
    gf = as_float(g)
    if gf.numel() == 0:
        row = torch.zeros(RAW_GRAD_WIDTH, dtype=torch.float64, device=gf.device)
        row[MOMENTS_WIDTH:MOMENTS_WIDTH + 2] = math.nan
        return row
    return torch.stack(_raw_moments(gf)[:RAW_GRAD_WIDTH]).double()


def finalize_gradients(raw: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Turn raw gradient rows ``[k, RAW_GRAD_WIDTH]`` into ``[k, GRAD_WIDTH]`` partials."""
    n, total, sumsq = _undo(raw[:, :MOMENTS_WIDTH], numels)
    low, high, bad = (raw[:, MOMENTS_WIDTH + k] for k in range(3))
    return torch.stack([n, total, sumsq, bad, low, high], dim=1)


def alive_units(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Return a bool vector over units along ``unit_dim``: True where any output is > 0."""
    xf = x.detach()
    if xf.dim() == 0:
        return (xf > 0).reshape(1)
    dims = [d for d in range(xf.dim()) if d != unit_dim % xf.dim()]
    if not dims:
        return xf > 0
    return xf.amax(dim=dims) > 0


def histogram_range(minmax: torch.Tensor) -> torch.Tensor:
    """A usable ``[low, high]`` from a measured ``[min, max]`` (float64, on the device).

    Non-finite bounds fall back to ``[-1, 1]``; a constant (``min == max``) is
    widened to ``[v - 0.5, v + 0.5]`` so that the bins have a width.
    """
    low, high = minmax[0], minmax[1]
    ok = torch.isfinite(low) & torch.isfinite(high)
    low = torch.where(ok, low, low.new_tensor(-1.0))
    high = torch.where(ok, high, high.new_tensor(1.0))
    flat = high <= low
    return torch.stack([torch.where(flat, low - 0.5, low), torch.where(flat, low + 0.5, high)])


def histogram_counts(x: torch.Tensor, bounds: torch.Tensor, bins: int) -> torch.Tensor:
    """Count the finite values of ``x`` into ``bins`` equal bins over ``bounds`` (float64 counts).

    Values below/above the range count in the first/last bin; NaN and Inf are
    not counted. Everything stays on the device: no data-dependent shapes, so
    no synchronisation (a scatter-add, not ``bincount`` or ``histc``).
    """
    xf = as_float(x).reshape(-1)
    low, high = bounds[0].to(xf.dtype), bounds[1].to(xf.dtype)
    finite = torch.isfinite(xf)
    position = ((xf - low) * (bins / (high - low))).nan_to_num(nan=0.0, posinf=bins - 1.0, neginf=0.0)
    index = position.floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.float64, device=xf.device)
    return counts.scatter_add_(0, index, finite.to(torch.float64))


@dataclass(frozen=True)
class Moments:
    """Merged count, mean, population std and rms (``nan`` when non-finite values were seen)."""

    n: float
    mean: float
    std: float
    rms: float


def merge_moments(n: np.ndarray, sums: np.ndarray, sumsq: np.ndarray) -> Moments:
    """Merge per-call counts, sums and sums of squares (float64) into mean and population std."""
    total = float(n.sum())
    if total == 0:
        return Moments(0.0, math.nan, math.nan, math.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(sums.sum() / total)
        mean_square = float(sumsq.sum() / total)
        var = mean_square - mean * mean
    std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
    rms = math.sqrt(mean_square) if math.isfinite(mean_square) else math.nan
    return Moments(total, mean, std, rms)


@dataclass(frozen=True)
class ActStats:
    """Statistics of a record's outputs over all probe batches (population std)."""

    mean: float
    std: float
    rms: float
    min: float
    max: float
    zero_frac: float
    numel: int
    nonfinite: int


@dataclass(frozen=True)
class GradStats:
    """Statistics of the gradient w.r.t. a record's outputs (population std)."""

    mean: float
    std: float
    rms: float
    nonfinite: int


def summarize_activations(parts: np.ndarray) -> tuple[ActStats, float, int, float]:
    """Merge activation partials (rows) into ``(ActStats, input_rms, input_numel, saturated_frac)``."""
    m = merge_moments(parts[:, A_N], parts[:, A_SUM], parts[:, A_SUMSQ])
    numel = int(m.n)
    nonfinite = int(parts[:, A_NONFINITE].sum())
    clean = nonfinite == 0
    in_n = parts[:, A_IN_N].sum()
    with np.errstate(invalid="ignore"):
        in_rms = math.sqrt(parts[:, A_IN_SUMSQ].sum() / in_n) if in_n > 0 else math.nan
    act = ActStats(
        mean=m.mean if clean else math.nan,
        std=m.std if clean else math.nan,
        rms=m.rms if clean else math.nan,
        min=float(np.nanmin(parts[:, A_MIN])) if numel and not np.all(np.isnan(parts[:, A_MIN])) else math.nan,
        max=float(np.nanmax(parts[:, A_MAX])) if numel and not np.all(np.isnan(parts[:, A_MAX])) else math.nan,
        zero_frac=float(parts[:, A_ZEROS].sum() / numel) if numel else math.nan,
        numel=numel,
        nonfinite=nonfinite,
    )
    saturated = float(parts[:, A_SATURATED].sum() / numel) if numel else math.nan
    return act, in_rms, int(in_n), saturated


def summarize_gradients(parts: np.ndarray) -> GradStats:
    """Merge gradient partials (rows) into :class:`GradStats`."""
    m = merge_moments(parts[:, G_N], parts[:, G_SUM], parts[:, G_SUMSQ])
    nonfinite = int(parts[:, G_NONFINITE].sum())
    if nonfinite:
        return GradStats(math.nan, math.nan, math.nan, nonfinite)
    return GradStats(m.mean, m.std, m.rms, nonfinite)
