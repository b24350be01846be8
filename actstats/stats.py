"""Streaming, mergeable statistics of tensors.

A hook reduces each tensor it sees, on the tensor's own device, into a *raw
row* of a :class:`RowStore`: a few reductions written in place into a
preallocated block, nothing leaving the device. Once per step all rows are
finalized together in float64 (:func:`finalize`) and merged per record by
adding counts, sums and sums of squares, so the result is the statistic of all
values seen together, never an average of per-batch figures. Within one tensor
the sums run in float32 (float64 for float64 tensors) on values shifted by
their first value, which keeps the variance of a tensor with a large mean.

Conventions: standard deviations are population figures (divide by N),
``std = sqrt(E[x^2] - E[x]^2)`` from the merged sums; ``rms = sqrt(E[x^2])``;
a tensor holding NaN or Inf gives non-finite (NaN) sums and counts those
elements in ``nonfinite``. Limit: float32 values beyond about ``1e18`` in
magnitude overflow the float32 sum of squares (std and rms become Inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Columns of an activation partial, as merged per record (additive but for min/max).
A_N, A_SUM, A_SUMSQ, A_MIN, A_MAX, A_ZEROS, A_NONFINITE, A_SATURATED, A_IN_N, A_IN_SUMSQ = range(10)
ACT_WIDTH = 10
# Columns of a gradient partial, as merged per record.
G_N, G_SUM, G_SUMSQ, G_NONFINITE, G_MIN, G_MAX = range(6)

# What a hook writes per tensor (a "raw" row, in the tensor's float dtype): its first value
# c (the shift), a power of two k (the scale), the sums of (x - c) * k and of its square,
# min, max, the zero count and the saturated count. Element counts are Python integers kept
# beside the rows (exact, and no device work); :func:`finalize` takes shift and scale out
# and decodes the non-finite count.
R_SHIFT, R_SCALE, R_SUM, R_SUMSQ, R_MIN, R_MAX, R_ZEROS, R_SATURATED = range(8)
RAW_WIDTH = 8
# Columns of a finalized row (float64), see :func:`finalize`.
F_N, F_SUM, F_SUMSQ, F_ZEROS, F_NONFINITE, F_SATURATED, F_MIN, F_MAX = range(8)
FINAL_WIDTH = 8

#: Non-finite values are replaced by this mark before summing (``2**100``, exact in float16
#: and up): a row's sum is then ``sum(finite x - c) + MARK * count``, from which
#: :func:`finalize` reads the count back whenever the row's min or max is not finite.
MARK = 2.0 ** 100


def as_float(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` in float32 or wider: statistics never accumulate in fp16/bf16."""
    x = x.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


#: Elementwise work runs in chunks of at most this many values, inside one reused
#: scratch buffer per (device, dtype): no temporary as large as an activation is
#: allocated (on CPU a fresh buffer costs page faults, more than the arithmetic), and
#: float32 counts of one chunk stay exact (below 2**24).
CHUNK = 1 << 20
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _buffer(like: torch.Tensor, n: int) -> torch.Tensor:
    key = (like.device, like.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(min(max(n, 1 << 16), CHUNK), dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf[:n]


class RowStore:
    """Raw rows of many tensors, written in place into preallocated blocks on their device.

    A hook calls :meth:`reduce` on a tensor: a handful of reductions written with
    ``out=`` into the next free row, nothing allocated per call, nothing moved to
    the host. Rows are numbered in the order they are written; :meth:`numels`
    holds each row's element count (Python integers) and :meth:`collect` returns
    every row as one float64 matrix on the device, for :func:`finalize`.

    Per chunk of at most :data:`CHUNK` values: ``aminmax``; ``(x - c) * k`` into
    a scratch buffer (``c`` the first value, zero when not finite, so that a
    large mean does not cancel the variance away in the float32 sum of squares;
    ``k`` the power of two that brings ``max |x|`` near 1, so that the sum of
    squares neither overflows nor underflows; both exact), its non-finite values
    replaced by :data:`MARK`, then ``sum`` and ``dot``; the
    zero count as the sum of ``x == 0``; the saturated count as the sum of
    ``|x - mid| >= half - eps``. Sums run in the tensor's own float precision
    (PyTorch's cascade summation; a float64 ``dtype=`` would cost a conversion
    copy on CPU).
    """

    BLOCK = 256

    def __init__(self) -> None:
        self._blocks: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._used: dict[tuple[torch.device, torch.dtype], int] = {}
        self._ids: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self._numels: list[int] = []
        self._views: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._numels)

    def numels(self) -> list[int]:
        """Element count of each row, in row order."""
        return self._numels

    def reduce(self, x: torch.Tensor, *, zeros: bool = False,
               saturation: tuple[float, float] | None = None, eps: float = 0.0) -> list[int]:
        """Write the raw rows of ``x`` (one per chunk; none when it is empty); return their numbers.

        Args:
            x: any floating tensor, on any device (fp16/bf16 are reduced in float32).
            zeros: also count the values equal to zero.
            saturation: ``(low, high)`` asymptotes; also count the values within ``eps`` of either.
            eps: the saturation tolerance.
        """
        xf = x.detach()
        if xf.dtype is not torch.float32 and xf.dtype is not torch.float64:
            xf = xf.float()
        n = xf.numel()
        if n == 0:
            return []
        flat = xf.reshape(-1)
        if n <= CHUNK:
            return [self._reduce(flat, n, zeros, saturation, eps)]
        return [self._reduce(flat[i:i + CHUNK], min(CHUNK, n - i), zeros, saturation, eps)
                for i in range(0, n, CHUNK)]

    def _row(self, flat: torch.Tensor, n: int) -> tuple[int, torch.Tensor]:
        key = (flat.device, flat.dtype)
        used = self._used.get(key, 0)
        blocks = self._blocks.setdefault(key, [])
        if used == len(blocks) * self.BLOCK:
            blocks.append(torch.zeros(self.BLOCK, RAW_WIDTH, dtype=flat.dtype, device=flat.device))
            self._ids.setdefault(key, [])
        self._used[key] = used + 1
        number = len(self._numels)
        self._numels.append(n)
        self._ids[key].append(number)
        row = blocks[used // self.BLOCK][used % self.BLOCK]
        self._views.append(row)
        return number, row

    def _reduce(self, flat: torch.Tensor, n: int, zeros: bool,
                saturation: tuple[float, float] | None, eps: float) -> int:
        number, row = self._row(flat, n)
        shift, scale, total, squares, low, high, zero_count, saturated = row.unbind()
        torch.aminmax(flat, out=(low, high))
        torch.nan_to_num(flat[0], 0.0, 0.0, 0.0, out=shift)
        exponent = torch.frexp(row[R_MIN:R_MAX + 1]).exponent.amax().clamp_(-120, 120)
        torch.pow(0.5, exponent, out=scale)  # |x - c| * scale < 2 (0 and non-finite: exponent 0)
        buf = _buffer(flat, n)
        torch.sub(flat, shift, out=buf).mul_(scale)
        buf.nan_to_num_(MARK, MARK, MARK)
        torch.sum(buf, 0, out=total)
        torch.dot(buf, buf, out=squares)
        if zeros:
            torch.eq(flat, 0, out=buf)
            torch.sum(buf, 0, out=zero_count)
        if saturation is not None:
            lo, hi = saturation
            torch.sub(flat, (lo + hi) / 2, out=buf).abs_()
            torch.ge(buf, (hi - lo) / 2 - eps, out=buf)
            torch.sum(buf, 0, out=saturated)
        return number

    def extremes(self, rows: list[int]) -> torch.Tensor:
        """``[min, max]`` over ``rows`` (float64, on their device; ``[nan, nan]`` for no rows)."""
        if not rows:
            return torch.tensor([math.nan, math.nan], dtype=torch.float64)
        if len(rows) == 1:
            return self._views[rows[0]][R_MIN:R_MAX + 1].double()
        both = torch.stack([self._views[r][R_MIN:R_MAX + 1] for r in rows]).double()
        return torch.stack([both[:, 0].amin(), both[:, 1].amax()])

    def collect(self, device: torch.device) -> torch.Tensor:
        """Every row so far as one float64 ``[rows, RAW_WIDTH]`` matrix on ``device``, in row order."""
        parts, order = [], []
        for key, blocks in self._blocks.items():
            used = self._used[key]
            rows = torch.cat(blocks)[:used] if len(blocks) > 1 else blocks[0][:used]
            parts.append(rows.to(device=device, dtype=torch.float64))
            order += self._ids[key]
        if not parts:
            return torch.zeros(0, RAW_WIDTH, dtype=torch.float64, device=device)
        if len(parts) == 1:
            return parts[0]
        out = torch.empty(len(order), RAW_WIDTH, dtype=torch.float64, device=device)
        return out.index_copy_(0, torch.tensor(order, device=device), torch.cat(parts))


def finalize(raw: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Turn raw rows ``[k, RAW_WIDTH]`` (float64) into ``[k, FINAL_WIDTH]`` figures, on their device.

    Columns ``F_*``: count, sum, sum of squares, zeros, non-finite count,
    saturated count, min, max. Scale and shift come out in float64
    (``sum(x) = sum(x - c) + n c``, ``sum(x^2) = sum((x - c)^2) + c (2 sum(x - c) + n c)``).
    A row whose min or max is not finite held NaN or Inf: its non-finite count is
    ``round(sum / MARK)`` (exact while the finite values sum to well under
    :data:`MARK`) and its sums become NaN.
    """
    c = raw[:, R_SHIFT]
    low, high = raw[:, R_MIN], raw[:, R_MAX]
    bad = ~(torch.isfinite(low) & torch.isfinite(high))
    nonfinite = torch.where(bad, torch.round(raw[:, R_SUM] / MARK), torch.zeros_like(c))
    shifted = raw[:, R_SUM] / raw[:, R_SCALE]
    nan = torch.full_like(shifted, math.nan)
    total = torch.where(bad, nan, shifted + numels * c)
    sumsq = torch.where(bad, nan, raw[:, R_SUMSQ] / raw[:, R_SCALE].square() + c * (2 * shifted + numels * c))
    return torch.stack([numels, total, sumsq, raw[:, R_ZEROS], nonfinite, raw[:, R_SATURATED], low, high], dim=1)


def unit_maxima(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """The largest value per unit along ``unit_dim`` (a unit is alive when it is > 0)."""
    xf = x.detach()
    if xf.dim() == 0:
        return xf.reshape(1)
    dims = [d for d in range(xf.dim()) if d != unit_dim % xf.dim()]
    if not dims:
        return xf.clone()
    return xf.amax(dim=dims)


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
