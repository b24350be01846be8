"""Streaming, mergeable statistics of tensors.

A hook reduces each tensor it sees, on the tensor's own device, into a *raw
row* of a :class:`RowStore`: one pass of a compiled kernel for a float32 CPU
tensor (:mod:`actstats.native`), else a dozen reductions whose 0-d results
stay where they are; nothing synchronised, nothing moved to the host. Once per step all
rows are stacked and finalized together in float64 (:func:`finalize`) and
merged per record by adding counts, sums and sums of squares, so the result is
the statistic of all values seen together, never an average of per-batch
figures. Within one tensor the sums run in float32 (float64 for float64
tensors) on values shifted by their first value, which keeps the variance of a
tensor with a large mean, and scaled into ``[-1, 1]``, which keeps the sum of
squares from overflowing or underflowing.

Conventions: standard deviations are population figures (divide by N),
``std = sqrt(E[x^2] - E[x]^2)`` from the merged sums; ``rms = sqrt(E[x^2])``;
a tensor holding NaN or Inf gives non-finite (NaN) sums and counts those
elements in ``nonfinite``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstats import native

# Columns of an activation partial, as merged per record (additive but for min/max).
A_N, A_SUM, A_SUMSQ, A_MIN, A_MAX, A_ZEROS, A_NONFINITE, A_SATURATED, A_IN_N, A_IN_SUMSQ = range(10)
ACT_WIDTH = 10
# Columns of a gradient partial, as merged per record (min and max travel separately).
G_N, G_SUM, G_SUMSQ, G_NONFINITE = range(4)

# What a hook writes per tensor (a "raw" row): a shift c, a scale k, the sums of (x - c) * k
# and of its square, min, max, the zero count and the saturated count. Element counts are
# Python integers kept beside the rows (exact, and no device work); :func:`finalize` takes
# shift and scale out and decodes the non-finite count. Two kinds of rows share the layout:
# the compiled kernels' (c the first value, k >= 0) and the PyTorch operations' "Welford"
# rows (k = WELFORD < 0: c the mean, the sum of x - c zero, the sum of squares the squared
# deviations from the mean, and the count of values that are not zero in the zeros column).
R_SHIFT, R_SCALE, R_SUM, R_SUMSQ, R_MIN, R_MAX, R_ZEROS, R_SATURATED = range(8)
RAW_WIDTH = 8
# Columns of a finalized row (float64), see :func:`finalize`.
F_N, F_SUM, F_SUMSQ, F_ZEROS, F_NONFINITE, F_SATURATED, F_MIN, F_MAX = range(8)
FINAL_WIDTH = 8

#: Non-finite values are replaced by this mark before summing (``2**100``, exact in float32):
#: a row whose min or max is not finite has its finite values scaled to zero, so its sum is
#: ``MARK * count``, from which :func:`finalize` reads the count back.
MARK = 2.0 ** 100
#: The scale of a Welford row (kernels' scales are >= 0), and of one whose min and max were
#: not read (:func:`finalize` then tells a row that held NaN or Inf by its marks alone).
WELFORD, WELFORD_NO_EXTREMES = -1.0, -2.0
#: Welford rows (float32 values only) replace non-finite values by this mark (in float64)
#: before taking the mean: finite float32 values sum to less than 2**150 per chunk, so
#: ``round(n * mean / MARK64)`` is the non-finite count.
MARK64 = 2.0 ** 200
_ROW_BYTES = RAW_WIDTH * 8  # one float64 raw row


def as_float(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` in float32 or wider: statistics never accumulate in fp16/bf16."""
    x = x.detach()
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _for_reading(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as a reduction reads it, and whether a compiled kernel can read it in place.

    A plain contiguous float32 CPU tensor, the hooks' common case, comes back as
    it is (a kernel reads its memory: no detached view to make); anything else as
    :func:`as_float` gives it, readable by a kernel when :func:`native.dense_float32_cpu`
    holds (channels-last, permuted), else left to PyTorch operations.
    """
    if native.row_major_float32_cpu(x):
        return x, True
    xf = as_float(x)
    return xf, native.dense_float32_cpu(xf)


#: Elementwise work runs in chunks of at most this many values on the CPU, inside one
#: reused scratch buffer per (device, dtype): no temporary as large as an activation is
#: allocated (on CPU a fresh buffer costs page faults, more than the arithmetic), and
#: float32 counts of one chunk stay exact (below 2**24).
CHUNK = 1 << 20
#: The same on other devices: larger, since there every chunk costs kernel launches (the
#: scratch buffers then hold up to 48 MB: 4M float32 and 4M float64 values).
DEVICE_CHUNK = 1 << 22
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def to_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Python numbers as a 1-D tensor on ``device``, without waiting for the device.

    A plain copy from pageable host memory to a CUDA device synchronises with the
    host; this one goes through pinned memory, non-blocking (PyTorch's pinned-memory
    cache keeps the host copy until the transfer is done).
    """
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor copied to ``device`` without waiting for it (pinned and non-blocking on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def chunk_size(device: torch.device) -> int:
    """Values per chunk on ``device``: :data:`CHUNK` on the CPU, :data:`DEVICE_CHUNK` elsewhere."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def chunks(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` flattened, in pieces of at most :func:`chunk_size` values (one view when it fits; none when empty)."""
    flat = x.reshape(-1)
    n, size = flat.numel(), chunk_size(x.device)
    return [flat] if 0 < n <= size else [flat[i:i + size] for i in range(0, n, size)]


def scratch(like: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reused 1-D buffer of ``n <= chunk_size`` values on ``like``'s device, in ``dtype``
    (default ``like``'s; contents undefined)."""
    key = (like.device, dtype or like.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.empty(min(max(n, 1 << 16), chunk_size(like.device)), dtype=key[1], device=like.device)
        _scratch[key] = buf
    return buf[:n]


#: Tensors on the CPU take shifted rows unless this is set (the tests set it to run
#: the Welford rows, which CUDA tensors take, on the CPU).
welford_on_cpu = False


def takes_welford_rows(x: torch.Tensor) -> bool:
    """Whether a tensor the PyTorch operations reduce takes Welford rows (few operations: float32
    off the CPU), whose shift is a mean, rather than shifted rows (float64 values can reach
    :data:`MARK64` on their own). fp16/bf16 count as float32: they are read as float32.
    :data:`welford_on_cpu` is a test switch, used with the kernels off."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and (x.device.type != "cpu" or welford_on_cpu)


#: A CPU tensor whose histogram range is known before its read is binned by its reduction (in
#: the kernel's pass, or right after it, into float64 CPU counts). Unset, CPU tensors are binned
#: apart, into counts on their device, as CUDA tensors are: a switch for the tests and for
#: ``benchmarks/launches.py``, which count a CUDA step's operations on the CPU.
bins_in_reduction_on_cpu = True

_constants: dict[tuple[torch.device, torch.dtype, float], torch.Tensor] = {}


def constant(value: float, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A cached 0-d tensor on ``device`` (rows' constant entries: no device work per row).

    The cache holds a few entries per device (0, 1, :data:`WELFORD` and one
    element count per tensor size); it is emptied past 4096 entries.
    """
    key = (device, dtype, value)
    found = _constants.get(key)
    if found is None:
        if len(_constants) >= 4096:
            _constants.clear()
        found = _constants[key] = torch.full((), value, dtype=dtype, device=device)
    return found


#: A histogram to fill while reducing: ``(bounds, bins, counts)``, host bounds ``(low, high)`` as
#: :func:`add_histogram` takes them and float64 CPU ``counts`` (contiguous), added to in place.
Binning = tuple[tuple[float, float], int, torch.Tensor]


def _check_binning(histogram: Binning | None) -> None:
    """Refuse counts a kernel cannot add to in place (it writes ``bins`` float64 values there)."""
    if histogram is not None:
        bounds, bins, counts = histogram
        if not (isinstance(bounds, tuple) and _float64_cpu(counts) and counts.shape == (bins,)):
            raise ValueError(f"histogram= needs host bounds and {bins} contiguous float64 CPU counts; got "
                             f"{type(bounds).__name__} bounds and {counts.dtype} counts of shape "
                             f"{tuple(counts.shape)} on {counts.device}")


class RowStore:
    """Raw rows of many tensors: 0-d results on their device, stacked into one matrix per step.

    A hook calls :meth:`reduce` on a tensor; nothing is moved to the host and
    nothing waited for. Rows are numbered in the order they are written;
    :meth:`numels` holds each row's element count (Python integers) and
    :meth:`collect` stacks every row into a float64 matrix on the device for
    :func:`finalize`.

    A float32 CPU tensor whose values fill a block of memory is read once by
    ``actstats._native.moments``, which writes one float64 row (shift ``c`` the
    first value, scale 1, shifted sums, min, max, counts) straight into the open
    block of kernel rows. Any other tensor goes, per chunk of at most
    :func:`chunk_size` values, through PyTorch operations, in one of two ways:

    * Float32 off the CPU (CUDA), where a small step is bound by kernel launches, five
      operations: ``aminmax``; a copy into a float64 scratch buffer with its
      non-finite values replaced by :data:`MARK64`; ``var_mean`` of that copy
      (float64: squares of float32 values neither overflow nor underflow, and the
      mean does not cancel the variance away); and ``count_nonzero`` for the
      zero count. A "Welford" row: scale :data:`WELFORD`, shift the mean, the sum
      of squared deviations in the sum-of-squares column (``correction = n - 1``
      divides it by one).
    * On the CPU (float64, strided views, or kernels not built), where passes
      over memory cost more than operations, and for float64 anywhere, a dozen
      operations in the tensor's precision:
      ``aminmax``; ``(x - c) * k`` into a scratch buffer, with ``c`` the first
      value (zero when not finite), so that a large mean does not cancel the
      variance away in the float32 sum of squares, and ``k = 1 / (max - min)``,
      so that ``|x - c| * k <= 1`` and the sum of squares can neither overflow
      nor underflow (``k = 1`` for a constant tensor, which stays exact: ``x - c``
      is zero; ``k = 0`` when min or max is not finite, so that the row's sum
      holds the marks alone); its non-finite values replaced by :data:`MARK`;
      then ``sum`` and ``dot`` (PyTorch's cascade summation). The zero count is
      the sum of ``x == 0``.

    The saturated count, for sigmoid and tanh, is the sum of ``|x - mid| >= half - eps``.
    """

    #: Rows are stacked into one tensor every ``BLOCK`` rows, so that a model with
    #: thousands of records holds a few tensors, not eight small ones per row.
    BLOCK = 256

    def __init__(self) -> None:
        self._blocks: list[torch.Tensor] = []  # [BLOCK, RAW_WIDTH] each, rows in order
        self._rows: list[tuple[torch.Tensor, ...] | None] = []  # rows not in a block yet, after the blocks
        self._native: torch.Tensor | None = None  # [BLOCK, RAW_WIDTH] float64 on the CPU, kernels' rows
        self._native_address = 0  # its data_ptr()
        self._numels: list[int] = []
        # Held while a row is reserved and written: autograd runs a CUDA tensor's gradient hooks on
        # the device's thread and a CPU tensor's on the caller's, and the kernels let other threads
        # run while they read (a block must not be closed, nor a row given twice, meanwhile).
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy of a recorder or watch: a lock is not copied
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return len(self._numels)

    def numels(self) -> list[int]:
        """Element count of each row, in row order."""
        return self._numels

    def reduce(self, x: torch.Tensor, *, zeros: bool = False, saturation: tuple[float, float] | None = None,
               eps: float = 0.0, extremes: bool = True, histogram: Binning | None = None) -> list[int]:
        """Write the raw rows of ``x`` (one per chunk; none when it is empty); return their numbers.

        A float32 CPU tensor whose values fill a block of memory is read once by
        the compiled kernel (one row, whatever its size; see :mod:`actstats.native`);
        anything else goes through the PyTorch operations described above.

        Args:
            x: any floating tensor, on any device (fp16/bf16 are reduced in float32).
            zeros: also count the values equal to zero.
            saturation: ``(low, high)`` asymptotes; also count the values within ``eps`` of either.
            eps: the saturation tolerance.
            extremes: False when min and max will not be read: Welford rows then skip
                ``aminmax`` and hold zeros (kernels and shifted rows take them anyway).
            histogram: ``(bounds, bins, counts)``: also add ``x``'s values to ``counts`` as
                :func:`add_histogram` does (in the kernel's pass when it reads ``x``).
        """
        _check_binning(histogram)
        with self._lock:
            return self._write_rows(*_for_reading(x), zeros, saturation, eps, extremes, histogram)

    def _write_rows(self, xf: torch.Tensor, readable: bool, zeros: bool, saturation: tuple[float, float] | None,
                    eps: float, extremes: bool = True, histogram: Binning | None = None) -> list[int]:
        """The rows of ``xf`` (:func:`_for_reading`), its values binned into ``histogram`` too: one
        kernel row when ``readable`` (binning in the same pass), else one per chunk (then
        :func:`add_histogram`, which adds to float64 CPU counts in place)."""
        if readable:
            return [self._kernel_row(xf, xf.numel(), zeros, saturation, eps, histogram=histogram)] if xf.numel() \
                else []
        rows = [self._reduce(part, zeros, saturation, eps, extremes) for part in chunks(xf)]
        if histogram is not None:
            bounds, bins, counts = histogram
            add_histogram(counts, xf, bounds, bins)
        return rows

    def reduce_units(self, x: torch.Tensor, maxima: torch.Tensor | None, unit_dim: int, *, zeros: bool = False,
                     saturation: tuple[float, float] | None = None, eps: float = 0.0,
                     histogram: Binning | None = None) -> tuple[list[int], torch.Tensor]:
        """:meth:`reduce`, and ``maxima`` merged with the largest value per unit of ``x``
        (:func:`merge_unit_maxima`): in the compiled kernel's call when it reads ``x`` (its own
        pass, or a second one in cache for planes smaller than a block)."""
        _check_binning(histogram)
        with self._lock:
            xf, readable = _for_reading(x)
            view = xf.reshape(1) if xf.dim() == 0 else xf
            dim = unit_dim % view.dim()
            layout = _unit_layout(view, dim) if readable else None
            units = view.shape[dim]
            writable = maxima is None or (maxima.shape == (units,) and native.row_major_float32_cpu(maxima))
            if layout is not None and writable:
                out = maxima if maxima is not None else torch.empty(units, dtype=torch.float32)
                arguments = (out.data_ptr(), *layout, maxima is not None)
                row = self._kernel_row(view, view.numel(), zeros, saturation, eps, arguments, histogram)
                return [row], out
            rows = self._write_rows(xf, readable, zeros, saturation, eps, histogram=histogram)
            return rows, merge_unit_maxima(maxima, xf, unit_dim)

    def _kernel_row(self, x: torch.Tensor, n: int, zeros: bool, saturation: tuple[float, float] | None,
                    eps: float, units: tuple[int, int, int, int, bool] | tuple[()] = (),
                    histogram: Binning | None = None) -> int:
        """Have the kernel write ``x``'s moments (``n`` float32 values read in place) into the next
        row of the open native block (:meth:`_native_row`), and bin them into ``histogram`` in
        the same pass; return the row's number."""
        row, address = self._native_row(n)
        if saturation is None:
            mid, threshold = 0.0, 0.0
        else:
            low, high = saturation
            mid, threshold = (low + high) / 2, (high - low) / 2 - eps
        if histogram is None:
            native.kernels.moments(x.data_ptr(), n, address, torch.get_num_threads(), zeros, saturation is not None,
                                   mid, threshold, *units)
        else:
            bounds, bins, counts = histogram
            native.kernels.moments_binned(x.data_ptr(), n, address, torch.get_num_threads(), zeros,
                                          saturation is not None, mid, threshold, _host_bounds(bounds).data_ptr(),
                                          bins, counts.data_ptr(), *units)
        return row

    def _native_row(self, n: int) -> tuple[int, int]:
        """Reserve the next row of the open native block for a kernel: its number and address
        (the caller holds the store's lock until the kernel has written it)."""
        self._close_full_block()
        if self._native is None:
            self._native = torch.empty(self.BLOCK, RAW_WIDTH, dtype=torch.float64)
            self._native_address = self._native.data_ptr()
        address = self._native_address + len(self._rows) * _ROW_BYTES
        self._rows.append(None)
        self._numels.append(n)
        return len(self._numels) - 1, address

    def _reduce(self, flat: torch.Tensor, zeros: bool, saturation: tuple[float, float] | None, eps: float,
                extremes: bool = True) -> int:
        """One chunk's row: a Welford row off the CPU, a shifted row on it (see the class docstring)."""
        n, device = flat.numel(), flat.device
        zero = constant(0.0, device, flat.dtype)  # each column keeps one dtype: see _stack_rows
        if takes_welford_rows(flat):
            blind = not extremes
            low, high = (zero, zero) if blind else torch.aminmax(flat)
            wide = scratch(flat, n, torch.float64).copy_(flat).nan_to_num_(MARK64, MARK64, MARK64)
            squares, mean = torch.var_mean(wide, correction=n - 1)  # the sum of squared deviations
            nonzero = torch.count_nonzero(flat) if zeros else constant(n, device, torch.int64)
            scale = constant(WELFORD_NO_EXTREMES if blind else WELFORD, device)
            head = (mean, scale, constant(0.0, device), squares, low, high, nonzero)
        else:
            low, high = torch.aminmax(flat)
            shift = flat[0].nan_to_num(0.0, 0.0, 0.0)
            scale = torch.sub(high, low).reciprocal_().nan_to_num_(0.0, 1.0, 1.0)  # NaN range: 0, zero range: 1
            buf = scratch(flat, n)
            torch.sub(flat, shift, out=buf).mul_(scale).nan_to_num_(MARK, MARK, MARK)
            total, squares = buf.sum(), torch.dot(buf, buf)
            zero_count = torch.eq(flat, 0, out=buf).sum() if zeros else zero
            head = (shift, scale, total, squares, low, high, zero_count)
        if saturation is None:
            saturated = zero
        else:
            lo, hi = saturation
            buf = scratch(flat, n)
            torch.sub(flat, (lo + hi) / 2, out=buf).abs_()
            saturated = torch.ge(buf, (hi - lo) / 2 - eps, out=buf).sum()
        return self._append((*head, saturated), n)

    def _append(self, row: tuple[torch.Tensor, ...] | None, n: int) -> int:
        """Note a row (None: written by a kernel into the open native block), after closing a full block."""
        self._close_full_block()
        self._rows.append(row)
        self._numels.append(n)
        return len(self._numels) - 1

    def _close_full_block(self) -> None:
        """Stack a full block of rows, when the next row needs room (not before: the block's
        last row may have just been reserved for a kernel)."""
        if len(self._rows) == self.BLOCK:
            self._blocks.append(self._open_block())
            self._rows, self._native = [], None

    def _open_block(self) -> torch.Tensor:
        """The rows not in a closed block yet, as one ``[rows, RAW_WIDTH]`` tensor."""
        rows, block = self._rows, self._native
        if block is None:
            return _stack_rows(rows)
        block = block[:len(rows)]
        written = [i for i, row in enumerate(rows) if row is not None]  # by PyTorch operations
        if not written:
            return block
        stacked = _stack_rows([rows[i] for i in written])
        block = block.to(stacked.device)  # a model split across devices; a copy
        index = to_device(written, torch.long, stacked.device)
        return block.index_copy(0, index, stacked.to(torch.float64))

    def moments(self, x: torch.Tensor) -> list[int]:
        """Rows of ``x``'s sums: for weights; min, max and counts left zero, and NaN or Inf
        make the sums NaN or Inf. The compiled kernel sums in float64, one vectorised pass.
        With PyTorch operations, off the CPU a Welford row of a float64 copy (two device
        operations); on the CPU shifted by the first value and not scaled (weights are
        finite and far from float32 overflow)."""
        with self._lock:
            xf, readable = _for_reading(x)
            if readable:
                n = xf.numel()
                if not n:
                    return []
                row, address = self._native_row(n)
                native.kernels.sums(xf.data_ptr(), n, address, torch.get_num_threads())
                return [row]
            numbers = []
            for part in chunks(xf):
                n, device = part.numel(), part.device
                zero = constant(0.0, device, part.dtype)
                if takes_welford_rows(part):
                    squares, mean = torch.var_mean(scratch(part, n, torch.float64).copy_(part), correction=n - 1)
                    row = (mean, constant(WELFORD, device), constant(0.0, device), squares, zero, zero,
                           constant(n, device, torch.int64), zero)
                else:
                    shift = part[0].clone()  # not a view: the weight may change before the row is read
                    buf = torch.sub(part, shift, out=scratch(part, n))
                    row = (shift, constant(1.0, device, part.dtype), buf.sum(), torch.dot(buf, buf),
                           zero, zero, zero, zero)
                numbers.append(self._append(row, n))
            return numbers

    def extremes(self, rows: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """``[min, max]`` over ``rows`` (float64, on their device; ``[nan, nan]`` on ``device`` for no rows)."""
        if not rows:
            return torch.full((2,), math.nan, dtype=torch.float64, device=device)
        with self._lock:  # a block may be closing on another thread
            both = torch.stack([self._extremes(r) for r in rows])
        return torch.stack([both[:, 0].amin(), both[:, 1].amax()])

    def _extremes(self, r: int) -> torch.Tensor:
        closed = len(self._blocks) * self.BLOCK
        if r < closed:
            return self._blocks[r // self.BLOCK][r % self.BLOCK, R_MIN:R_MAX + 1].double()
        row = self._rows[r - closed]
        if row is None:
            return self._native[r - closed, R_MIN:R_MAX + 1]  # type: ignore[index]
        return torch.stack(row[R_MIN:R_MAX + 1]).double()

    def kernel_rows_only(self) -> bool:
        """True when every row so far was written by a kernel (float64 on the CPU, in one
        block): :meth:`collect` then returns a view of that block."""
        return not self._blocks and all(row is None for row in self._rows)

    def collect(self, device: torch.device) -> torch.Tensor:
        """Every row so far as one float64 ``[rows, RAW_WIDTH]`` matrix on ``device``, in row order
        (a view of the rows when they are one block there already: read it before adding rows)."""
        blocks = self._blocks + ([self._open_block()] if self._rows else [])
        if not blocks:
            return torch.zeros(0, RAW_WIDTH, dtype=torch.float64, device=device)
        if len(blocks) == 1 and blocks[0].device == device:  # blocks are float64
            return blocks[0]
        return join(blocks, device)


def _stack_rows(rows: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Stack rows of 0-d tensors into one float64 ``[len(rows), RAW_WIDTH]`` tensor, column by column.

    A column's entries share a dtype (rows of tensors of one dtype are built so), and
    stacking tensors of one dtype is one kernel on CUDA; tensors of mixed dtypes are
    copied one by one (a ``cudaMemcpyAsync`` each: 800 for a ResNet step's rows).
    """
    device = rows[0][0].device
    return torch.stack([join(list(column), device, stack=True) for column in zip(*rows)], dim=1)


def join(tensors: list[torch.Tensor], device: torch.device, *, stack: bool = False) -> torch.Tensor:
    """``tensors`` concatenated (or stacked) into one float64 tensor on ``device``: one ``cat``
    (one kernel when they also share a dtype; PyTorch copies mixed dtypes one by one) and one
    conversion when they share a device; one copy each when they do not (a model split
    across devices)."""
    combine = torch.stack if stack else torch.cat
    try:
        joined = combine(tensors)
    except RuntimeError:  # several devices: gather them on ``device``
        return combine([t.to(device=device, dtype=torch.float64) for t in tensors])
    return joined.to(device=device, dtype=torch.float64)


def finalize(raw: Any, numels: Any, xp: Any = torch) -> Any:
    """Turn raw rows ``[k, RAW_WIDTH]`` (float64) into ``[k, FINAL_WIDTH]`` figures, on their device.

    Columns ``F_*``: count, sum, sum of squares, zeros, non-finite count,
    saturated count, min, max. Scale and shift come out in float64
    (``sum(x) = sum(x - c) + n c``, ``sum(x^2) = sum((x - c)^2) + c (2 sum(x - c) + n c)``).
    A row that held NaN or Inf (one whose min or max is not finite; a Welford
    row whose min and max were not read, when ``round(n c / MARK64)`` is not zero)
    has its sums made NaN and its non-finite count read from its marks:
    ``round(sum / MARK)`` for a kernel or shifted row (exact: its finite values
    were scaled to zero), ``round(n c / MARK64)`` for a Welford row. A Welford
    row's zero count is ``n`` minus its count of values that are not zero.

    ``xp`` is the array library of ``raw`` and ``numels``: ``torch`` (tensors), or ``numpy``
    for rows already on the host (the same operations, in the same order).
    """
    with np.errstate(all="ignore") if xp is np else contextlib.nullcontext():  # NaN/Inf rows are expected
        c, k = raw[:, R_SHIFT], raw[:, R_SCALE]
        welford = k < 0
        low, high = raw[:, R_MIN], raw[:, R_MAX]
        marks = xp.round(xp.where(welford, numels * c / MARK64, raw[:, R_SUM] / MARK))
        blind = k == WELFORD_NO_EXTREMES
        bad = xp.where(blind, marks > 0, ~(xp.isfinite(low) & xp.isfinite(high)))
        nonfinite = xp.where(bad, marks, xp.zeros_like(c))
        k = xp.where(welford, 1.0, k)  # a Welford row is shifted (by its mean) but not scaled
        shifted = raw[:, R_SUM] / k  # zero for Welford rows
        nan = xp.full_like(shifted, math.nan)
        total = xp.where(bad, nan, shifted + numels * c)
        sumsq = xp.where(bad, nan, raw[:, R_SUMSQ] / (k * k) + c * (2 * shifted + numels * c))
        zeros = xp.where(welford, numels - raw[:, R_ZEROS], raw[:, R_ZEROS])
        return xp.stack([numels, total, sumsq, zeros, nonfinite, raw[:, R_SATURATED], low, high], 1)


#: Merge the rows of a CPU recorder in numpy, on the host where they already are; off, a CPU
#: recorder merges with the PyTorch operations that other devices use (the tests run both).
host_merge_on_cpu = True


def merges_on_host(device: torch.device) -> bool:
    """True when rows on ``device`` are merged in numpy (:data:`host_merge_on_cpu`, CPU only):
    a few dozen operations on arrays of a few hundred values cost a microsecond or two each
    there, against several for the same operations on tensors."""
    return host_merge_on_cpu and device.type == "cpu"


def finalize_store(store: RowStore, device: torch.device, *indices: list[int]) -> tuple[Any, list[Any]]:
    """Every row of ``store`` finalized on ``device`` (:func:`finalize`), and each list of Python
    integers in ``indices`` (row numbers, owners) as int64 there: all of them reach the device
    with the element counts in one copy that does not wait for it (:func:`to_device`). On the
    host (:func:`merges_on_host`), numpy arrays."""
    if merges_on_host(device):
        numels = np.asarray(store.numels(), dtype=np.float64)
        final = finalize(store.collect(device).numpy(), numels, np)
        return final, [np.asarray(v, dtype=np.int64) for v in indices]
    meta = to_device(store.numels() + [i for values in indices for i in values], torch.long, device)
    numels, *tensors = meta.split([len(store), *map(len, indices)])
    return finalize(store.collect(device), numels.double()), tensors


def take_rows(rows: Any, index: Any) -> Any:
    """``rows[index]`` for an int64 index: ``index_select`` on a tensor (an index tensor on the
    device, no synchronisation), fancy indexing on a numpy array."""
    return rows[index] if isinstance(rows, np.ndarray) else rows.index_select(0, index)


def select_columns(rows: Any, columns: list[int]) -> Any:
    """``rows[:, columns]`` without copying the list to the device (which synchronises on CUDA)."""
    if isinstance(rows, np.ndarray):
        return rows[:, columns]
    return torch.stack([rows[:, c] for c in columns], dim=1)


def sum_by_owner(rows: Any, owner: Any, n_owners: int, columns: list[int]) -> Any:
    """Sum ``columns`` of finalized ``rows`` per owner (``owner[i]`` owns row ``i``): ``[n_owners, len(columns)]``
    (tensors, or numpy arrays on the host)."""
    if isinstance(rows, np.ndarray):
        out = np.zeros((n_owners, len(columns)))
        np.add.at(out, owner, rows[:, columns])
        return out
    return rows.new_zeros(n_owners, len(columns)).index_add_(0, owner, select_columns(rows, columns))


def extremes_by_owner(rows: Any, owner: Any, n_owners: int) -> tuple[Any, Any]:
    """Per owner, the max of the finalized rows' maxima and the min of their minima (NaN
    ignored; ``-inf``/``+inf`` for an owner without a number), as tensors or numpy arrays."""
    high_in, low_in = rows[:, F_MAX], rows[:, F_MIN]
    if isinstance(rows, np.ndarray):
        high, low = np.full(n_owners, -math.inf), np.full(n_owners, math.inf)
        np.maximum.at(high, owner, np.where(np.isnan(high_in), -math.inf, high_in))
        np.minimum.at(low, owner, np.where(np.isnan(low_in), math.inf, low_in))
        return high, low
    high = rows.new_full((n_owners,), -math.inf).scatter_reduce_(
        0, owner, high_in.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf), "amax")
    low = rows.new_full((n_owners,), math.inf).scatter_reduce_(
        0, owner, low_in.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf), "amin")
    return high, low


def merge_unit_maxima(current: torch.Tensor | None, x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``current`` merged with the largest value per unit of ``x`` along ``unit_dim``.

    A unit is alive when its maximum is > 0. A call's maximum is NaN for a unit
    that saw a NaN (as ``amax`` gives); calls merge with ``fmax`` (a NaN does not
    erase an earlier maximum). ``current`` None starts a new vector; a vector of
    another length (a layer called with another width) is left as it is.
    (PyTorch operations; :meth:`RowStore.reduce_units` uses the kernel where it can.)
    """
    xf = x.detach()
    if xf.dim() == 0:
        xf = xf.reshape(1)
    dim = unit_dim % xf.dim()
    if current is not None and current.shape != (xf.shape[dim],):
        return current
    if not xf.numel():  # an empty batch: no unit was seen alive (and amax has nothing to reduce)
        empty = torch.full((xf.shape[dim],), -math.inf, dtype=xf.dtype, device=xf.device)
        return empty if current is None else current
    dims = [d for d in range(xf.dim()) if d != dim]
    maxima = xf.amax(dim=dims) if dims else xf.clone()
    return maxima if current is None else torch.fmax(current, maxima, out=current)


def _unit_layout(x: torch.Tensor, dim: int) -> tuple[int, int, int] | None:
    """``(outer, units, inner)`` when a kernel that can read ``x`` (:func:`_for_reading`) can read
    it as ``[outer, units, inner]``: contiguous, or channels-last with units in dimension 1."""
    if x.numel() == 0:
        return None
    shape = x.shape
    if x.is_contiguous():
        return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    if dim == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.numel() // shape[1], shape[1], 1  # [N, C, H, W] lies in memory as [N, H, W, C]
    return None


def histogram_range(minmax: torch.Tensor) -> torch.Tensor:
    """A usable ``[low, high]`` from a measured ``[min, max]`` (float64, on the device).

    Non-finite bounds fall back to ``[-1, 1]``; a constant (``min == max``) is
    widened to ``[v - 0.5, v + 0.5]`` so that the bins have a width.
    """
    low, high = minmax[0], minmax[1]
    ok = torch.isfinite(low) & torch.isfinite(high)
    low = torch.where(ok, low, -1.0)  # a Python number: no host-to-device copy
    high = torch.where(ok, high, 1.0)
    flat = high <= low
    return torch.stack([torch.where(flat, low - 0.5, low), torch.where(flat, low + 0.5, high)])


def add_histogram(counts: torch.Tensor | None, x: torch.Tensor, bounds: torch.Tensor | tuple[float, float],
                  bins: int) -> torch.Tensor:
    """``counts`` plus the histogram of ``x``'s finite values in ``bins`` equal bins over ``bounds``.

    ``counts`` None starts a histogram (zeros from an empty tensor, so that every
    record has its bins). ``bounds`` is ``(low, high)``: a float64 tensor measured on the device,
    or two Python floats known on the host (a range hint: no device work to
    prepare). Values below/above the range count in the first/last bin; NaN and
    Inf are not counted. Positions are ``(x - low) * (bins / (high - low))`` in
    float32 (float64 for float64 tensors), floored.

    A dense float32 CPU tensor is counted by the compiled kernel, in one pass,
    into float64 counts. Otherwise positions are computed in chunks inside the
    scratch buffer (non-finite ones made NaN, the others clamped and floored),
    and counted (:func:`_bin_counts`): off the CPU by ``histc`` over ``[0, bins]``,
    which drops NaN and is exact on whole numbers: six device operations per chunk,
    none of which synchronises.
    Counts come back in the positions' dtype for one chunk and in float64 once
    chunks or calls are added together.
    """
    host_bounds = isinstance(bounds, tuple)
    xf, readable = _for_reading(x)
    if counts is None and not xf.numel():  # every record gets its bins: vectors match across processes
        return torch.zeros(bins, dtype=torch.float64, device=xf.device)
    if readable and (counts is None or _float64_cpu(counts)) \
            and (host_bounds or _float64_cpu(bounds)):  # type: ignore[arg-type]
        if not xf.numel():
            return counts
        counts = torch.zeros(bins, dtype=torch.float64) if counts is None else counts
        edges = _host_bounds(bounds) if host_bounds else bounds  # type: ignore[arg-type]
        native.kernels.histogram(xf.data_ptr(), xf.numel(), edges.data_ptr(), bins, counts.data_ptr(),
                                 torch.get_num_threads())
        return counts
    if host_bounds:
        low, per_unit = _host_affine(bounds, bins, xf.dtype)  # type: ignore[arg-type]
    else:
        low = bounds[0].to(xf.dtype)  # type: ignore[index]
        per_unit = torch.div(bins, bounds[1].to(xf.dtype) - low)  # type: ignore[index]
    for part in chunks(xf):
        position = torch.sub(part, low, out=scratch(part, part.numel())).mul_(per_unit)
        position.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan).clamp_(0, bins - 1).floor_()
        found = _bin_counts(position, bins)
        counts = found if counts is None else counts.to(torch.float64).add_(found)
    return counts


@functools.lru_cache(maxsize=1 << 12)  # a record's range hint stays the same for a whole step
def _host_bounds(bounds: tuple[float, float]) -> torch.Tensor:
    """``bounds`` as the float64 CPU tensor the histogram kernel reads (never written)."""
    return torch.tensor(bounds, dtype=torch.float64)


def _bin_counts(position: torch.Tensor, bins: int) -> torch.Tensor:
    """How many of ``position`` (whole numbers in ``[0, bins)``, or NaN: not counted) fall in each bin.

    On the CPU ``bincount`` (``histc`` is several times slower there); elsewhere ``histc``
    (one kernel), unless PyTorch's deterministic mode is on, in which CUDA's ``histc``
    refuses to run: then ``index_add_``, which has a deterministic CUDA implementation.
    """
    if position.device.type == "cpu":
        return count_by_bincount(position, bins)
    if torch.are_deterministic_algorithms_enabled():
        return count_by_index_add(position, bins)
    return count_by_histc(position, bins)


def _whole_indices(position: torch.Tensor, bins: int) -> torch.Tensor:
    """``position`` as int64 indices in the scratch buffer, NaN as ``bins`` (an extra bin, dropped)."""
    return scratch(position, position.numel(), torch.int64).copy_(position.nan_to_num_(nan=bins))


def count_by_histc(position: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`_bin_counts` with ``histc`` over ``[-0.5, bins - 0.5]``: a whole number ``p`` falls
    in bin ``p`` however CUDA rounds ``(p + 0.5) * bins / bins`` in float32 (over ``[0, bins]``
    it can fall one below past 4096 bins)."""
    return torch.histc(position, bins, -0.5, bins - 0.5)


def count_by_bincount(position: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`_bin_counts` with ``bincount`` (its output size depends on the data: CPU only)."""
    return torch.bincount(_whole_indices(position, bins), minlength=bins + 1)[:bins]


def count_by_index_add(position: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`_bin_counts` with ``index_add_`` of int64 ones (deterministic on CUDA)."""
    index = _whole_indices(position, bins)
    tally = torch.zeros(bins + 1, dtype=torch.int64, device=position.device)
    return tally.index_add_(0, index, tally.new_ones(()).expand(index.numel()))[:bins]


def _float64_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64 and t.is_cpu and t.is_contiguous()


def usable_ranges(lows: Sequence[float], highs: Sequence[float], bins: int) -> np.ndarray:
    """Whether each ``(low, high)`` gives ``bins`` bins of a finite, non-zero width in float32 (a
    float64 range can collapse or overflow there), for many ranges in one numpy pass: a watched
    step checks the hints of every record when it opens, not one by one in the hooks."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        lo, hi = np.asarray(lows, dtype=np.float32), np.asarray(highs, dtype=np.float32)
        return np.isfinite(lo) & np.isfinite(hi) & (hi > lo) & np.isfinite(np.float32(bins) / (hi - lo))


def _host_affine(bounds: tuple[float, float], bins: int, dtype: torch.dtype) -> tuple[float, float]:
    """``low`` and ``bins / (high - low)`` rounded as a tensor of ``dtype`` computes them from
    float64 bounds (so that host and device ranges bin alike)."""
    if dtype == torch.float64:
        return bounds[0], bins / (bounds[1] - bounds[0])
    low, high = np.float32(bounds[0]), np.float32(bounds[1])
    return float(low), float(np.float32(bins) / (high - low))


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


def _moment_columns(n: np.ndarray, total: np.ndarray, sumsq: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std and rms per row from merged counts, sums and sums of squares
    (float64): ``std = sqrt(max(E[x^2] - mean^2, 0))``, ``rms = sqrt(E[x^2])``. All three are NaN
    where the count is 0; std is NaN where the variance is not finite, rms where ``E[x^2]`` is not
    finite or negative (the mean is left as it comes: callers blank rows that held NaN or Inf)."""
    with np.errstate(all="ignore"):
        mean = total / n
        mean_square = sumsq / n
        var = mean_square - mean * mean
        std = np.where(np.isfinite(var), np.sqrt(np.maximum(var, 0.0)), math.nan)
        rms = np.where(np.isfinite(mean_square) & (mean_square >= 0), np.sqrt(np.maximum(mean_square, 0.0)), math.nan)
    empty = n == 0
    return np.where(empty, math.nan, mean), np.where(empty, math.nan, std), np.where(empty, math.nan, rms)


def summarize_activation_rows(rows: np.ndarray) -> list[tuple[ActStats, float, int, float]]:
    """Records' merged activation rows (``[records, ACT_WIDTH]``, ``A_*`` columns), each as
    ``(ActStats, input_rms, input_numel, saturated_frac)``; the arithmetic is done for all rows at once.
    ``rows`` is a host numpy array (a slice of the step's single transfer), never a tensor."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, ACT_WIDTH)
    n, nonfinite = rows[:, A_N], rows[:, A_NONFINITE]
    mean, std, rms = _moment_columns(n, rows[:, A_SUM], rows[:, A_SUMSQ])
    dirty = nonfinite != 0
    mean, std, rms = (np.where(dirty, math.nan, c) for c in (mean, std, rms))
    numel = np.trunc(n)
    seen = numel != 0
    in_n, in_sumsq = rows[:, A_IN_N], rows[:, A_IN_SUMSQ]
    with np.errstate(all="ignore"):
        in_rms = np.where((in_n > 0) & np.isfinite(in_sumsq) & (in_sumsq >= 0), np.sqrt(in_sumsq / in_n), math.nan)
        zero_frac = np.where(seen, rows[:, A_ZEROS] / numel, math.nan)
        saturated = np.where(seen, rows[:, A_SATURATED] / numel, math.nan)
    low, high = np.where(seen, rows[:, A_MIN], math.nan), np.where(seen, rows[:, A_MAX], math.nan)
    columns = (mean, std, rms, low, high, zero_frac, numel, nonfinite, in_rms, in_n, saturated)
    return [
        (ActStats(mean=m, std=sd, rms=r, min=lo, max=hi, zero_frac=z, numel=int(k), nonfinite=int(bad)),
         i_rms, int(i_n), sat)
        for m, sd, r, lo, hi, z, k, bad, i_rms, i_n, sat in zip(*(c.tolist() for c in columns))  # numpy, host
    ]


def summarize_gradient_rows(rows: np.ndarray) -> list[GradStats]:
    """Records' merged gradient rows (``[records, 4]``, ``G_*`` columns, a host numpy array) as
    :class:`GradStats`."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, G_NONFINITE + 1)
    nonfinite = rows[:, G_NONFINITE]
    mean, std, rms = _moment_columns(rows[:, G_N], rows[:, G_SUM], rows[:, G_SUMSQ])
    dirty = nonfinite != 0
    columns = [np.where(dirty, math.nan, c) for c in (mean, std, rms)] + [nonfinite]
    return [GradStats(m, sd, r, int(bad)) for m, sd, r, bad in zip(*(c.tolist() for c in columns))]  # numpy, host

