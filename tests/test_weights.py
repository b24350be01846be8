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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_first_value_is_the_weights_own_in_every_dtype(dtype):
    # Identical rows that are not constant: the first value is not the mean (a Welford row's shift).
    layer = nn.Linear(4, 3).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 0.5, 1.0, 1.5]).expand(3, 4))
        layer.bias.zero_()
    vector, decode = weight_figures([layer])
    (figures,) = decode(vector.numpy()).values()
    assert figures.first == 0.0 and figures.symmetric is True
    assert figures.parts[0] == pytest.approx(_figures_of(layer.weight), rel=1e-6)


def test_empty_weights_are_measured_without_error_and_are_not_symmetric():
    torch.manual_seed(0)
    no_outputs, no_inputs, plain = nn.Linear(3, 0), nn.Linear(0, 3), nn.Linear(3, 3)
    vector, decode = weight_figures([no_outputs, no_inputs, plain])
    figures = decode(vector.numpy())
    assert figures[no_outputs].symmetric is False and figures[no_inputs].symmetric is False
    assert np.isnan(figures[no_outputs].first) and np.isnan(figures[no_outputs].parts[0][0])
    assert figures[plain].parts[0] == pytest.approx(_figures_of(plain.weight), rel=1e-6)
    assert figures[plain].first == float(plain.weight.detach().reshape(-1)[0])
