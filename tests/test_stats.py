"""Streaming statistics: partials on the device, exact merge on the host."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actstats import native, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from launches import CountOperations, take_the_device_path  # noqa: E402  (what benchmarks/launches.py counts with)

# every test here runs on each reduction path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("reduction_path")


def _finalized(chunks, **kw):
    """Reduce each tensor into a fresh store, finalize; return the store's rows (float64 numpy)."""
    store = stats.RowStore()
    for c in chunks:
        store.reduce(c, **kw)
    numels = torch.tensor(store.numels(), dtype=torch.float64)
    return stats.finalize(store.collect(torch.device("cpu")), numels).numpy()


def _merge_rows(parts):
    """Merge activation rows as the recorder does: columns summed, min of minima, max of maxima."""
    merged = parts.sum(axis=0).tolist()
    lows, highs = parts[:, stats.A_MIN], parts[:, stats.A_MAX]
    merged[stats.A_MIN] = math.nan if np.isnan(lows).all() else float(np.nanmin(lows))
    merged[stats.A_MAX] = math.nan if np.isnan(highs).all() else float(np.nanmax(highs))
    return merged


def _merge_act(chunks, bounds=None, eps=0.01):
    rows = _finalized(chunks, zeros=True, saturation=bounds, eps=eps)
    parts = np.zeros((len(rows), stats.ACT_WIDTH))
    for a, f in [(stats.A_N, stats.F_N), (stats.A_SUM, stats.F_SUM), (stats.A_SUMSQ, stats.F_SUMSQ),
                 (stats.A_MIN, stats.F_MIN), (stats.A_MAX, stats.F_MAX), (stats.A_ZEROS, stats.F_ZEROS),
                 (stats.A_NONFINITE, stats.F_NONFINITE), (stats.A_SATURATED, stats.F_SATURATED)]:
        parts[:, a] = rows[:, f]
    return stats.summarize_activation_rows(np.asarray(_merge_rows(parts)))[0]


def test_merge_equals_statistics_of_the_union():
    gen = torch.Generator().manual_seed(0)
    # Chunks of different sizes and very different means: a naive average of stds would be wrong.
    chunks = [torch.randn(n, generator=gen) * s + m for n, s, m in [(10, 1.0, 5.0), (1000, 3.0, -2.0), (37, 0.1, 0.0)]]
    act, *_ = _merge_act(chunks)
    union = torch.cat(chunks).double()
    assert act.numel == 1047
    assert act.mean == pytest.approx(float(union.mean()), rel=1e-6)
    assert act.std == pytest.approx(float(union.std(correction=0)), rel=1e-6)  # population std
    assert act.rms == pytest.approx(float(union.square().mean().sqrt()), rel=1e-6)
    assert act.min == float(union.min()) and act.max == float(union.max())


def test_merge_is_stable_for_a_large_offset():
    # Values 1e4 + N(0, 1): E[x^2] - E[x]^2 in float32 would lose every digit of the variance.
    gen = torch.Generator().manual_seed(1)
    chunks = [1e4 + torch.randn(5000, generator=gen) for _ in range(4)]
    act, *_ = _merge_act(chunks)
    union = torch.cat(chunks).double()
    assert act.std == pytest.approx(float(union.std(correction=0)), rel=1e-3)


def test_counts_zeros_nonfinite_and_saturation():
    x = torch.tensor([0.0, 0.0, 0.005, 0.5, 0.995, 1.0, float("nan"), float("inf")])
    act, _, _, saturated = _merge_act([x], bounds=(0.0, 1.0), eps=0.01)
    assert act.zero_frac == 2 / 8
    assert act.nonfinite == 2
    assert math.isnan(act.mean) and math.isnan(act.std)
    # within 0.01 of 0 or 1: 0, 0, 0.005, 0.995, 1.0 (and inf >= 0.99) -> 6 of 8
    assert saturated == 6 / 8


def test_half_precision_is_accumulated_in_float32():
    x = torch.full((70000,), 1.0, dtype=torch.float16)  # an fp16 sum would overflow at 65504
    act, *_ = _merge_act([x])
    assert act.mean == 1.0 and act.numel == 70000
    assert act.std == pytest.approx(0.0, abs=1e-7)  # sqrt of a float64 rounding error


def test_gradient_rows_merge():
    g1, g2 = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 3.0, 3.0])
    rows = _finalized([g1, g2])
    parts = rows[:, [stats.F_N, stats.F_SUM, stats.F_SUMSQ, stats.F_NONFINITE]]
    grad, = stats.summarize_gradient_rows(parts.sum(axis=0))
    assert (rows[:, stats.F_MIN].min(), rows[:, stats.F_MAX].max()) == (-1.0, 3.0)
    union = np.array([1.0, -1.0, 3.0, 3.0, 3.0])
    assert grad.mean == pytest.approx(union.mean())
    assert grad.std == pytest.approx(union.std())
    assert grad.rms == pytest.approx(math.sqrt((union**2).mean()))
    assert grad.nonfinite == 0


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_huge_and_tiny_values_neither_overflow_nor_underflow(magnitude):
    # x * 8^30 in the matrix-product experiment: a float32 sum of squares of unscaled
    # values would be Inf (or 0 for tiny values); the 1 / (max - min) scale prevents both.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * magnitude
    act, *_ = _merge_act([x])
    union = x.double()
    assert act.rms == pytest.approx(float(union.square().mean().sqrt()), rel=1e-5)
    assert act.std == pytest.approx(float(union.std(correction=0)), rel=1e-5)
    assert act.nonfinite == 0


def test_nonfinite_count_is_exact_wherever_the_values_sit():
    # NaN first (the shift falls back to 0), Inf of both signs, in a tensor split into chunks.
    x = torch.randn(stats.CHUNK + 1000, generator=torch.Generator().manual_seed(4)) * 1e20
    bad = [0, 5, stats.CHUNK - 1, stats.CHUNK, stats.CHUNK + 999]
    x[bad[0]], x[bad[1]], x[bad[2]] = float("nan"), float("inf"), float("-inf")
    x[bad[3]], x[bad[4]] = float("nan"), float("inf")
    x[10:30] = 0.0
    act, *_ = _merge_act([x])
    assert act.nonfinite == 5
    assert act.zero_frac == 20 / x.numel()
    assert act.numel == x.numel()
    assert math.isnan(act.mean) and math.isnan(act.rms)


def test_rows_of_several_dtypes_come_back_in_the_order_they_were_written():
    store = stats.RowStore()
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([5.0], dtype=torch.float64),
          torch.tensor([-3.0, 3.0, 0.5], dtype=torch.bfloat16), torch.tensor([7.0, 9.0], dtype=torch.float64)]
    numbers = [store.reduce(x) for x in xs]
    assert numbers == [[0], [1], [2], [3]]
    raw = store.collect(torch.device("cpu"))
    rows = stats.finalize(raw, torch.tensor(store.numels(), dtype=torch.float64))
    assert rows[:, stats.F_SUM].tolist() == pytest.approx([3.0, 5.0, 0.5, 16.0], rel=1e-6)
    assert rows[:, stats.F_SUMSQ].tolist() == pytest.approx([5.0, 25.0, 18.25, 130.0], rel=1e-6)
    assert store.extremes([0, 3]).tolist() == [1.0, 9.0]


def test_a_large_tensor_is_reduced_in_chunks_with_exact_counts(reduction_path):
    x = torch.zeros(3 * stats.CHUNK + 7)
    x[::3] = 2.0
    store = stats.RowStore()
    rows = store.reduce(x, zeros=True)
    assert len(rows) == (1 if reduction_path == "kernels" else 4)  # the kernel needs no chunks
    assert sum(store.numels()) == x.numel()
    act, *_ = _merge_act([x])
    ones = (x.numel() + 2) // 3
    assert act.zero_frac == (x.numel() - ones) / x.numel()
    assert act.mean == pytest.approx(2.0 * ones / x.numel(), rel=1e-12)


def test_unit_maxima_along_the_last_dim():
    x = -torch.ones(2, 3)
    x[:, 0] = 1.0
    x[1, 2] = 0.5  # one positive value in one sample keeps a unit alive
    assert (stats.RowStore().reduce_units(x, None, -1)[1] > 0).tolist() == [True, False, True]


def test_unit_maxima_along_channels():
    x = -torch.ones(2, 3, 4, 4)
    x[:, 0] = 1.0
    x[0, 2, 3, 1] = 0.5
    assert (stats.RowStore().reduce_units(x, None, 1)[1] > 0).tolist() == [True, False, True]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_unit_maxima_match_amax_and_merge_with_fmax(layout):
    gen = torch.Generator().manual_seed(6)
    first, second = torch.randn(2, 5, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen)
    first[1, 2, 0, 0] = float("nan")  # unit 2: NaN in the first call, numbers in the second
    second[0, 4, 1, 1] = float("nan")  # unit 4: numbers first, NaN after
    if layout == "channels_last":
        first, second = (t.contiguous(memory_format=torch.channels_last) for t in (first, second))
    elif layout == "transposed":
        first, second = (t.transpose(2, 3) for t in (first, second))
    store = stats.RowStore()
    rows, once = store.reduce_units(first, None, 1, zeros=True)
    assert math.isnan(once[2])  # as amax: a NaN shows
    once = once.clone()
    more, merged = store.reduce_units(second, once.clone(), 1, zeros=True)
    expected = torch.fmax(first.amax(dim=(0, 2, 3)), second.amax(dim=(0, 2, 3)))
    assert torch.equal(merged, expected)
    assert torch.equal(stats.merge_unit_maxima(stats.merge_unit_maxima(None, first, 1), second, 1), expected)
    act, *_ = _merge_act([first])  # the same rows as reduce gives
    final = stats.finalize(store.collect(torch.device("cpu")), torch.tensor(store.numels(), dtype=torch.float64))
    assert final[rows[0], stats.F_ZEROS] == act.zero_frac * act.numel
    assert final[rows[0], stats.F_NONFINITE] == 1 and final[more[0], stats.F_NONFINITE] == 1
    assert final[more[0], stats.F_MAX] != final[more[0], stats.F_MAX]  # NaN


def test_unit_maxima_of_another_width_leave_the_merged_vector_as_it_is():
    store = stats.RowStore()
    _, current = store.reduce_units(torch.tensor([[1.0, -1.0]]), None, -1)
    rows, after = store.reduce_units(torch.ones(4, 3), current, -1)
    assert after.tolist() == [1.0, -1.0] and store.numels()[rows[0]] == 12


def test_unit_maxima_of_planes_of_several_blocks_with_non_finite_values():
    # the kernel takes a plane's maximum from its blocks' own maxima, and sweeps again a block
    # holding NaN or Inf: each kind of value in a block other than the first
    x = -torch.rand(2, 5, 1100, generator=torch.Generator().manual_seed(9)) - 1.0
    x[1, 0, 1050] = math.inf
    x[0, 1, 600] = -math.inf
    x[1, 2, 1099] = math.nan
    x[:, 3] = -math.inf
    x[0, 4, 513] = 7.0
    _, maxima = stats.RowStore().reduce_units(x, None, 1)
    torch.testing.assert_close(maxima, x.amax(dim=(0, 2)), rtol=0, atol=0, equal_nan=True)
    assert math.isnan(maxima[2]) and maxima[0] == math.inf and maxima[3] == -math.inf and maxima[4] == 7.0


@pytest.mark.parametrize("shape, dim", [((3, 1030), -1), ((2, 3, 700), 1), ((5,), 0), ((), 0), ((3, 4, 5, 8), 1),
                                        ((2, 6, 2, 2), 1)])
def test_unit_maxima_of_wide_and_odd_shapes(shape, dim):
    # rows wider than the kernel's block, planes of several blocks, one unit per value, a scalar,
    # planes smaller than a block (of a few values), a NaN in one of them
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    if x.dim() == 4:
        x[1, 2, 1, 1] = float("nan")
    _, maxima = stats.RowStore().reduce_units(x, None, dim)
    view = x.reshape(1) if x.dim() == 0 else x
    dims = [d for d in range(view.dim()) if d != dim % view.dim()]
    torch.testing.assert_close(maxima, view.amax(dim=dims) if dims else view, rtol=0, atol=0, equal_nan=True)


def _numpy_histogram(values, low, high, bins):
    """Independent reference: finite values only, out-of-range ones in the end bins; positions
    in the values' precision like the tensors' own (a float64 position of float32 values can fall
    on the other side of an edge)."""
    v = values[np.isfinite(values)]
    f = values.dtype.type
    per_unit = f(bins) / (f(high) - f(low))
    index = np.clip(np.floor((v - f(low)) * per_unit), 0, bins - 1).astype(int)
    return np.bincount(index, minlength=bins).astype(float)


@pytest.mark.parametrize("n", [1000, stats.CHUNK + 12345])
def test_histogram_counts_match_numpy_with_end_bins_and_no_nonfinite(n):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=gen) * 2.0
    x[:7] = torch.tensor([float("nan"), float("inf"), float("-inf"), 100.0, -100.0, 1.5, -1.5])
    counts = torch.ones(16, dtype=torch.float64)  # counts are added to what is there
    counts = stats.add_histogram(counts, x, torch.tensor([-1.5, 1.5], dtype=torch.float64), 16)
    expected = _numpy_histogram(x.numpy(), -1.5, 1.5, 16)
    assert counts.tolist() == (expected + 1).tolist()
    assert counts.sum().item() == n - 3 + 16


@pytest.mark.parametrize("bins", [30, 64])
def test_histograms_from_host_and_device_bounds_count_alike(bins):
    """A range hint (Python floats) and a measured range (a tensor) give the same counts; counts
    start from None and add up over calls; a bin count that is not a power of two is exact too."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(8)) * 3.0
    x[:3] = torch.tensor([float("nan"), float("inf"), 7.5])
    low, high = -2.2, 1.9
    on_host = stats.add_histogram(None, x, (low, high), bins)
    measured = stats.add_histogram(None, x, torch.tensor([low, high], dtype=torch.float64), bins)
    expected = _numpy_histogram(x.numpy(), low, high, bins)
    assert on_host.tolist() == measured.tolist() == expected.tolist()
    twice = stats.add_histogram(on_host, x[::2], (low, high), bins)
    assert twice.dtype == torch.float64
    assert twice.tolist() == (expected + _numpy_histogram(x[::2].numpy(), low, high, bins)).tolist()
    assert stats.add_histogram(None, x[:0], (low, high), bins).tolist() == [0.0] * bins  # every record has bins


@pytest.mark.parametrize("layout", ["flat", "channels", "small_planes", "float64", "strided", "empty"])
@pytest.mark.parametrize("entry", ["reduce", "reduce_units", "saturation"])
def test_binning_while_reducing_equals_reducing_then_binning(layout, entry):
    """``histogram=`` adds the values to the counts as add_histogram does (in the kernel's pass when
    a kernel reads the tensor), and leaves the rows and unit maxima as they are without it."""
    gen = torch.Generator().manual_seed(11)
    shape = {"flat": (3000,), "channels": (3, 4, 40, 20), "small_planes": (6, 5, 3, 3), "float64": (2, 5, 30),
             "strided": (40, 30), "empty": (0, 4)}[layout]
    x = torch.randn(shape, generator=gen, dtype=torch.float64 if layout == "float64" else torch.float32).relu()
    if x.numel():  # NaN and Inf are not counted; a value past the range counts in the last bin
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 50.0], dtype=x.dtype)
    if layout == "strided":  # not dense: PyTorch operations
        x = x.t()
    bins, bounds = 32, (-0.25, 1.75)
    binned, plain = stats.RowStore(), stats.RowStore()
    counts = torch.ones(bins, dtype=torch.float64)  # added to what is there, in place
    if entry == "reduce_units":
        rows, maxima = binned.reduce_units(x, None, 1, zeros=True, histogram=(bounds, bins, counts))
        rows_plain, maxima_plain = plain.reduce_units(x, None, 1, zeros=True)
        torch.testing.assert_close(maxima, maxima_plain, rtol=0, atol=0, equal_nan=True)
    else:
        saturation = (0.0, 1.0) if entry == "saturation" else None
        rows = binned.reduce(x, zeros=True, saturation=saturation, eps=0.01, histogram=(bounds, bins, counts))
        rows_plain = plain.reduce(x, zeros=True, saturation=saturation, eps=0.01)
    assert len(rows) == len(rows_plain)
    if rows:
        cpu = torch.device("cpu")
        assert torch.equal(binned.collect(cpu).nan_to_num(), plain.collect(cpu).nan_to_num())
    assert counts.tolist() == stats.add_histogram(torch.ones(bins, dtype=torch.float64), x, bounds, bins).tolist()
    assert counts.tolist() == (_numpy_histogram(x.contiguous().numpy().ravel(), *bounds, bins) + 1).tolist()


def test_binning_while_reducing_refuses_counts_it_cannot_add_to_in_place():
    x = torch.randn(100)
    for counts in (torch.zeros(16), torch.zeros(8, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)[::2]):
        with pytest.raises(ValueError, match="16 contiguous float64 CPU counts"):
            stats.RowStore().reduce(x, histogram=((-1.0, 1.0), 16, counts))
        with pytest.raises(ValueError, match="16 contiguous float64 CPU counts"):
            stats.RowStore().reduce_units(x, None, -1, histogram=((-1.0, 1.0), 16, counts))
    with pytest.raises(ValueError, match="host bounds"):  # a measured range is binned by add_histogram
        stats.RowStore().reduce(x, histogram=(torch.tensor([-1.0, 1.0], dtype=torch.float64), 16,
                                              torch.zeros(16, dtype=torch.float64)))


@pytest.mark.parametrize("bins", [20, 4099, 5000])
def test_the_three_ways_of_counting_bins_agree(bins):
    """bincount (CPU), histc (CUDA) and index_add_ (CUDA in deterministic mode: histc refuses to
    run there) count the same whole-number positions, every bin of thousands included; NaN is
    not counted."""
    position = torch.cat([torch.arange(bins), torch.randint(0, bins, (3000,), generator=torch.Generator().manual_seed(9))])
    position = position.float()
    position[bins:bins + 4] = float("nan")
    expected = np.bincount(position[~position.isnan()].long().numpy(), minlength=bins).tolist()
    assert stats.count_by_bincount(position.clone(), bins).tolist() == expected
    assert stats.count_by_index_add(position.clone(), bins).tolist() == expected
    assert stats.count_by_histc(position.clone(), bins).tolist() == expected


def test_ranges_that_collapse_in_float32_are_not_usable():
    lows, highs = [-1.5, 1.0, 0.0, -1e39, 2.0, math.nan, 0.0], [2.0, 1.000000001, 1e-46, 1e39, 1.0, 1.0, 3.0]
    # usable; one float32; below the float32 spacing at zero; beyond float32; reversed; NaN; usable
    assert stats.usable_ranges(lows, highs, 64).tolist() == [True, False, False, False, False, False, True]


def test_rows_stacked_in_blocks_keep_their_order_and_extremes():
    store = stats.RowStore()
    n_rows = 2 * stats.RowStore.BLOCK + 3
    xs = [torch.tensor([float(i), -float(i)], dtype=torch.float64 if i % 7 == 0 else torch.float32)
          for i in range(n_rows)]
    for x in xs:
        store.reduce(x, zeros=True)
    raw = store.collect(torch.device("cpu"))
    rows = stats.finalize(raw, torch.tensor(store.numels(), dtype=torch.float64))
    assert rows.shape == (n_rows, stats.FINAL_WIDTH)
    assert rows[:, stats.F_MAX].tolist() == [float(i) for i in range(n_rows)]
    assert rows[:, stats.F_SUMSQ].tolist() == pytest.approx([2.0 * i * i for i in range(n_rows)], rel=1e-6)
    assert rows[:, stats.F_ZEROS].tolist() == [2.0] + [0.0] * (n_rows - 1)
    last = n_rows - 1
    assert store.extremes([3, stats.RowStore.BLOCK + 1, last]).tolist() == [-float(last), float(last)]


def test_the_kernels_read_dense_float32_cpu_tensors_only(reduction_path):
    dense = torch.ones(2, 3, 4, 4)
    takes = reduction_path == "kernels"
    assert native.dense_float32_cpu(dense) is takes
    assert native.dense_float32_cpu(dense.contiguous(memory_format=torch.channels_last)) is takes
    assert native.dense_float32_cpu(dense.permute(3, 1, 0, 2)) is takes  # every value, in another order
    assert not native.dense_float32_cpu(dense[:, :, ::2])  # gaps
    assert not native.dense_float32_cpu(dense[:, :1].expand(2, 3, 4, 4))  # overlaps
    assert not native.dense_float32_cpu(torch.ones(3, 1).expand(3, 3).t())
    assert not native.dense_float32_cpu(dense.double())
    assert not native.dense_float32_cpu(dense.half())


@pytest.mark.parametrize("layout", ["plain", "strided", "channels_last", "transposed"])
def test_sums_of_any_layout_match_float64(layout):
    # strided: a copy is reduced; channels-last and transposed: read in memory order
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(7, 5, 6, 66, generator=gen) * 3 + 1
    x = {"plain": x, "strided": x[..., ::2], "transposed": x.transpose(0, 3),
         "channels_last": x.contiguous(memory_format=torch.channels_last)}[layout]
    act, *_ = _merge_act([x])
    union = x.double().reshape(-1)
    assert act.numel == union.numel()
    assert act.mean == pytest.approx(float(union.mean()), rel=1e-6)
    assert act.std == pytest.approx(float(union.std(correction=0)), rel=1e-6)


@pytest.mark.parametrize("layout", ["one-huge-value", "all-huge"])
def test_values_just_below_the_float64_fallback_do_not_overflow(layout):
    # 512 squares of about 2**59 exceed float32's range: such a block must be summed in float64
    if layout == "one-huge-value":
        x = torch.zeros(600)
        x[0] = 1e18
    else:
        x = torch.full((512,), 1e18)
        x[0] = 0.0
    act, *_ = _merge_act([x])
    union = x.double()
    assert act.nonfinite == 0
    assert act.rms == pytest.approx(float(union.square().mean().sqrt()), rel=1e-6)
    assert act.std == pytest.approx(float(union.std(correction=0)), rel=1e-6)


def _rows_on(path_enabled, tensors, monkeypatch, **kw):
    monkeypatch.setattr(native, "enabled", path_enabled)
    store = stats.RowStore()
    numbers = [store.reduce(t, **kw) for t in tensors]
    rows = stats.finalize(store.collect(torch.device("cpu")), torch.tensor(store.numels(), dtype=torch.float64))
    return [rows[n].sum(0) if len(n) > 1 else rows[n[0]] for n in numbers]  # chunks of the torch path added


@pytest.mark.parametrize("saturation", [None, (0.0, 1.0)])
def test_kernel_rows_equal_the_pytorch_rows(monkeypatch, saturation):
    # both paths on the same tensors (blocks of 512 and their edges, zeros, NaN, Inf, saturation)
    if native.kernels is None:
        pytest.fail("the compiled kernels are not built")
    gen = torch.Generator().manual_seed(9)
    tensors = []
    for n in [1, 2, 7, 511, 512, 513, 1025, 5000]:
        x = torch.randn(n, generator=gen) * 3 + 0.5
        x[torch.rand(n, generator=gen) < 0.2] = 0.0
        tensors.append(x)
    specials = torch.randn(2000, generator=gen)
    specials[[3, 700, 1999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    tensors += [specials, torch.full((600,), float("inf")), torch.zeros(1000), torch.sigmoid(torch.randn(3000))]
    kw = {"zeros": True, "saturation": saturation, "eps": 0.01}
    kernel, reference = _rows_on(True, tensors, monkeypatch, **kw), _rows_on(False, tensors, monkeypatch, **kw)
    for x, k, r in zip(tensors, kernel, reference):
        exact = [stats.F_N, stats.F_ZEROS, stats.F_NONFINITE, stats.F_SATURATED, stats.F_MIN, stats.F_MAX]
        assert torch.allclose(k[exact], r[exact], rtol=0.0, atol=0.0, equal_nan=True)  # counts and extremes
        values = x.double()
        for column, truth in ((stats.F_SUM, values.sum()), (stats.F_SUMSQ, values.square().sum())):
            if torch.isfinite(values).all():  # both within float32 summation error of the float64 sums
                assert float(k[column]) == pytest.approx(float(truth), rel=1e-5, abs=1e-9)
                assert float(r[column]) == pytest.approx(float(truth), rel=1e-5, abs=1e-9)
            else:
                assert math.isnan(k[column]) and math.isnan(r[column])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_column_of_a_block_keeps_one_dtype(dtype, monkeypatch):
    """Rows are stacked column by column; a column of one dtype is one CUDA kernel (mixed dtypes
    are copied value by value). Activations, gradients without extremes, saturation, weights."""
    monkeypatch.setattr(native, "enabled", False)
    columns: list[list[set[torch.dtype]]] = []
    real = stats._stack_rows

    def spy(rows):
        columns.append([{row[i].dtype for row in rows} for i in range(stats.RAW_WIDTH)])
        return real(rows)

    monkeypatch.setattr(stats, "_stack_rows", spy)
    x = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=dtype)
    for welford in (True, False):
        monkeypatch.setattr(stats, "welford_on_cpu", welford)
        store = stats.RowStore()
        store.reduce(x, zeros=True)
        store.reduce(x.tanh(), zeros=True, saturation=(-1.0, 1.0), eps=0.01)
        store.reduce(x, extremes=False)
        store.moments(x.reshape(30, 10))
        collected = store.collect(torch.device("cpu"))
        assert collected.dtype == torch.float64 and collected.shape == (4, stats.RAW_WIDTH)
    assert len(columns) == 2
    assert all(len(kinds) == 1 for block in columns for kinds in block), columns


def test_rows_without_extremes_keep_exact_sums_and_non_finite_counts():
    """``extremes=False`` (gradients without histograms, inputs): the same sums and counts;
    float64 values beyond the float32 range are not mistaken for non-finite marks."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(6))
    dirty = x.clone()
    dirty[[3, 700, 4999]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    huge = torch.full((64,), 1e300, dtype=torch.float64)
    store = stats.RowStore()
    for t in (x, dirty, huge):
        store.reduce(t, extremes=False)
    rows = stats.finalize(store.collect(torch.device("cpu")), torch.tensor(store.numels(), dtype=torch.float64))
    reference = x.double()
    assert rows[0, stats.F_N] == 5000 and rows[0, stats.F_NONFINITE] == 0
    # float32 paths: an error of float32 rounding relative to the sum of magnitudes
    assert rows[0, stats.F_SUM].item() == pytest.approx(reference.sum().item(), abs=1e-6 * reference.abs().sum().item())
    assert rows[0, stats.F_SUMSQ].item() == pytest.approx(reference.square().sum().item(), rel=1e-6)
    assert rows[1, stats.F_NONFINITE] == 3 and math.isnan(rows[1, stats.F_SUM]) and math.isnan(rows[1, stats.F_SUMSQ])
    assert rows[2, stats.F_NONFINITE] == 0 and rows[2, stats.F_SUM].item() == pytest.approx(64e300, rel=1e-12)


@pytest.mark.parametrize("values", [[1e60, math.nan], [-1e61, math.nan, 3.0], [1e308, math.inf, 1e308]])
def test_float64_values_beyond_float32_count_their_non_finite_values(values):
    x = torch.tensor(values, dtype=torch.float64)
    store = stats.RowStore()
    store.reduce(x, zeros=True)
    store.reduce(x, extremes=False)
    rows = stats.finalize(store.collect(torch.device("cpu")), torch.tensor(store.numels(), dtype=torch.float64))
    expected = sum(not math.isfinite(v) for v in values)
    assert rows[:, stats.F_NONFINITE].tolist() == [expected, expected]


def test_the_cuda_path_launches_few_operations(monkeypatch):
    """What a GPU step's cost rests on (launches, not values): five operations per activation,
    three per gradient without histograms, two per weight, six per histogram chunk with a
    range hint, and a fixed number per block of rows, whatever their count."""
    take_the_device_path(monkeypatch.setattr)  # what a CUDA tensor takes, as benchmarks/launches.py counts it
    x = torch.randn(4, 8, 16)
    store = stats.RowStore()
    store.reduce(x, zeros=True)  # warm the constants and scratch buffers, as a previous step would have
    store.reduce(x, extremes=False)
    store.moments(x)
    stats.add_histogram(None, x, (-1.0, 1.0), 16)
    for call, expected in [
        (lambda: store.reduce(x, zeros=True), ["aminmax", "copy_", "nan_to_num_", "var_mean", "count_nonzero"]),
        (lambda: store.reduce(x, extremes=False), ["copy_", "nan_to_num_", "var_mean"]),
        (lambda: store.moments(x), ["copy_", "var_mean"]),
        (lambda: stats.add_histogram(None, x, (-1.0, 1.0), 16),
         ["sub", "mul_", "nan_to_num_", "clamp_", "floor_", "histc"]),
    ]:
        with CountOperations() as counted:
            call()
        assert counted.names == expected
    for n_rows in (10, 200):
        rows = stats.RowStore()
        for _ in range(n_rows):
            rows.reduce(x, zeros=True)
        with CountOperations() as counted:
            rows.collect(torch.device("cpu"))
        assert len(counted.names) <= 2 * stats.RAW_WIDTH + 2, counted.names


def test_summaries_of_several_rows_at_once_match_each_row_alone():
    # rows summarized together: an empty record, one that saw NaN/Inf, clean ones, no input seen,
    # a zero variance; each figure computed here from the row alone, in Python floats
    act = np.zeros((5, stats.ACT_WIDTH))
    act[1, [stats.A_N, stats.A_SUM, stats.A_SUMSQ, stats.A_MIN, stats.A_MAX, stats.A_ZEROS, stats.A_NONFINITE,
            stats.A_SATURATED, stats.A_IN_N, stats.A_IN_SUMSQ]] = [10, 3.0, 7.0, -1.5, 2.0, 4, 0, 1, 10, 12.0]
    act[2, [stats.A_N, stats.A_SUM, stats.A_SUMSQ, stats.A_MIN, stats.A_MAX, stats.A_NONFINITE]] = [
        8, math.nan, math.nan, -3.0, 5.0, 2]
    act[3, [stats.A_N, stats.A_SUM, stats.A_SUMSQ, stats.A_MIN, stats.A_MAX]] = [4, 8.0, 16.0, 2.0, 2.0]
    act[4, [stats.A_N, stats.A_SUM, stats.A_SUMSQ, stats.A_MIN, stats.A_MAX, stats.A_IN_N, stats.A_IN_SUMSQ]] = [
        2, 1.0, 5.0, -1.0, 2.0, 3, math.inf]
    summaries = stats.summarize_activation_rows(act)
    for row, (a, in_rms, in_n, saturated) in zip(act.tolist(), summaries):
        n = row[stats.A_N]
        if n == 0:
            assert a.numel == 0 and all(math.isnan(v) for v in (a.mean, a.std, a.rms, a.min, a.max, a.zero_frac))
            assert math.isnan(saturated) and math.isnan(in_rms) and in_n == 0
            continue
        mean, mean_square = row[stats.A_SUM] / n, row[stats.A_SUMSQ] / n
        clean = row[stats.A_NONFINITE] == 0
        assert a.numel == int(n) and a.nonfinite == int(row[stats.A_NONFINITE])
        assert (a.min, a.max) == (row[stats.A_MIN], row[stats.A_MAX])
        assert a.zero_frac == row[stats.A_ZEROS] / n and saturated == row[stats.A_SATURATED] / n
        if clean:
            assert a.mean == mean and a.rms == math.sqrt(mean_square)
            assert a.std == math.sqrt(max(mean_square - mean * mean, 0.0))
        else:
            assert math.isnan(a.mean) and math.isnan(a.std) and math.isnan(a.rms)
        in_sumsq = row[stats.A_IN_SUMSQ]
        expected_in = math.sqrt(in_sumsq / row[stats.A_IN_N]) if row[stats.A_IN_N] > 0 and math.isfinite(in_sumsq) \
            else math.nan
        assert in_n == int(row[stats.A_IN_N])
        assert in_rms == expected_in or (math.isnan(in_rms) and math.isnan(expected_in))
    assert summaries[3][0].std == 0.0  # a constant: no variance, not a negative one
    grads = stats.summarize_gradient_rows(np.array([[0, 0, 0, 0], [4, 2.0, 6.0, 0], [3, math.inf, math.inf, 1]]))
    assert math.isnan(grads[0].mean) and grads[0].nonfinite == 0
    assert (grads[1].mean, grads[1].rms, grads[1].std) == (0.5, math.sqrt(1.5), math.sqrt(1.25))
    assert math.isnan(grads[2].rms) and grads[2].nonfinite == 1



@pytest.mark.parametrize("path", ["kernels", "shifted", "welford"])
def test_finalize_in_numpy_equals_finalize_in_torch(monkeypatch, path):
    # The host merge (numpy) and the device merge (PyTorch) take the same rows to the same
    # figures, bit for bit: kernel, shifted and Welford rows (with and without extremes), with
    # zeros, NaN, +Inf and -Inf, a constant and an empty-looking all-zero tensor.
    monkeypatch.setattr(native, "enabled", path == "kernels")
    monkeypatch.setattr(stats, "welford_on_cpu", path == "welford")
    gen = torch.Generator().manual_seed(4)
    specials = torch.randn(3000, generator=gen) * 5 + 2
    specials[[0, 10, 2999]] = torch.tensor([math.inf, math.nan, -math.inf])
    tensors = [torch.randn(700, generator=gen), specials, torch.full((64,), math.inf), torch.zeros(300),
               torch.full((33,), -2.5), torch.sigmoid(torch.randn(900, generator=gen))]
    store = stats.RowStore()
    for x in tensors:
        store.reduce(x, zeros=True)
        store.reduce(x, extremes=False)
        store.reduce(x, zeros=True, saturation=(0.0, 1.0), eps=0.01)
        store.moments(x)
    raw = store.collect(torch.device("cpu"))
    numels = torch.tensor(store.numels(), dtype=torch.float64)
    on_device = stats.finalize(raw, numels).numpy()
    on_host = stats.finalize(raw.numpy(), numels.numpy(), np)
    assert on_host.dtype == np.float64 and on_host.shape == on_device.shape
    assert np.array_equal(on_host, on_device, equal_nan=True)
    assert np.isnan(on_host).any() and np.isinf(on_host).any()  # the cases above reached the figures
