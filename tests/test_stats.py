"""Streaming statistics: partials on the device, exact merge on the host."""

import math

import numpy as np
import pytest
import torch

from actstats import stats


def _counts(chunks):
    return torch.tensor([float(c.numel()) for c in chunks], dtype=torch.float64)


def _merge_act(chunks, bounds=None, eps=0.01):
    raw = torch.stack([stats.activation_partial(c, None, bounds, eps) for c in chunks])
    n = _counts(chunks)
    parts = stats.finalize_activations(raw, n, torch.zeros_like(n))
    return stats.summarize_activations(parts.numpy())


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


def test_input_partial_gives_rms():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    raw = stats.activation_partial(x, stats.input_partial(x), None, 0.01)[None]
    part = stats.finalize_activations(raw, _counts([x]), _counts([x]))
    _, input_rms, input_numel, _ = stats.summarize_activations(part.numpy())
    assert input_rms == pytest.approx(math.sqrt(25 / 4)) and input_numel == 4


def test_half_precision_is_accumulated_in_float32():
    x = torch.full((70000,), 1.0, dtype=torch.float16)  # an fp16 sum would overflow at 65504
    act, *_ = _merge_act([x])
    assert act.mean == 1.0 and act.numel == 70000
    assert act.std == pytest.approx(0.0, abs=1e-7)  # sqrt of a float64 rounding error


def test_gradient_partials_merge():
    g1, g2 = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 3.0, 3.0])
    raw = torch.stack([stats.gradient_partial(g1), stats.gradient_partial(g2)])
    parts = stats.finalize_gradients(raw, _counts([g1, g2])).numpy()
    grad = stats.summarize_gradients(parts)
    assert (parts[:, stats.G_MIN].min(), parts[:, stats.G_MAX].max()) == (-1.0, 3.0)
    union = np.array([1.0, -1.0, 3.0, 3.0, 3.0])
    assert grad.mean == pytest.approx(union.mean())
    assert grad.std == pytest.approx(union.std())
    assert grad.rms == pytest.approx(math.sqrt((union**2).mean()))
    assert grad.nonfinite == 0


def test_alive_units_along_the_last_dim():
    x = -torch.ones(2, 3)
    x[:, 0] = 1.0
    x[1, 2] = 0.5  # one positive value in one sample keeps a unit alive
    assert stats.alive_units(x, -1).tolist() == [True, False, True]


def test_alive_units_along_channels():
    x = -torch.ones(2, 3, 4, 4)
    x[:, 0] = 1.0
    x[0, 2, 3, 1] = 0.5
    assert stats.alive_units(x, 1).tolist() == [True, False, True]
