"""actstats.weights.weight_figures: every part's std, rms and each module's first value, on
every reduction path, against float64 arithmetic on the weights themselves."""

import numpy as np
import pytest
import torch
from torch import nn

from actstats import theory
from actstats.weights import weight_figures

pytestmark = pytest.mark.usefixtures("reduction_path")


def _figures_of(part: torch.Tensor) -> tuple[float, float]:
    values = part.detach().double().numpy().reshape(-1)
    return float(values.std()), float(np.sqrt(np.mean(values * values)))


def test_figures_of_a_conv_an_lstm_and_a_shifted_linear():
    torch.manual_seed(0)
    conv, lstm, linear = nn.Conv2d(3, 8, 3), nn.LSTM(4, 6), nn.Linear(5, 7)
    conv.to(memory_format=torch.channels_last)  # a dense weight in another order
    assert not conv.weight.is_contiguous()
    with torch.no_grad():
        linear.weight.add_(1000.0)  # a large mean over a small spread: the shift keeps the std
    modules = [conv, lstm, linear]
    vector, decode = weight_figures(modules)
    figures = decode(vector.numpy())
    assert list(figures) == modules
    for module in modules:
        parts = theory.weight_parts(module)
        assert len(figures[module].parts) == len(parts) == (8 if module is lstm else 1)
        for part, (std, rms) in zip(parts, figures[module].parts):
            want_std, want_rms = _figures_of(part.tensor)
            assert std == pytest.approx(want_std, rel=1e-6), part.name
            assert rms == pytest.approx(want_rms, rel=1e-6), part.name  # float32 partial sums
        assert figures[module].first == float(parts[0].tensor.reshape(-1)[0])
        assert figures[module].symmetric is False


def test_a_constant_weight_has_zero_std_and_is_symmetric():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.fill_(0.25)
        layer.bias.fill_(-1.0)
    vector, decode = weight_figures([layer])
    (figures,) = decode(vector.numpy()).values()
    assert figures.parts == ((0.0, 0.25),) and figures.first == 0.25 and figures.symmetric is True
