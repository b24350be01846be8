"""Init schemes: sample stds against the formulas, gains pinned exactly, chunked layers, errors.

Tolerances come from the sample size: the relative error of a sample std over
n draws is about 1/sqrt(2n) for a normal (less for uniform or truncated
draws), and every check allows 5 of those.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from actstats.errors import InitError, UnknownSchemeError
from actstats.schemes import (
    ALIASES,
    SCHEME_NAMES,
    InitSummary,
    SchemeSpec,
    init_weights,
    parse_scheme,
    static_following_activations,
)
from actstats.theory import Activation

RELU_GAIN = math.sqrt(2.0)
LEAKY_GAIN = math.sqrt(2.0 / (1.0 + 0.2**2))  # LeakyReLU(0.2): sqrt(2 / 1.04)
TANH_GAIN = 5.0 / 3.0
# N(0, 1) truncated at ±2: var = 1 - 2*2*phi(2) / (Phi(2) - Phi(-2)), phi(2) = exp(-2)/sqrt(2 pi)
TRUNC2_STD = math.sqrt(1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / math.erf(2.0 / math.sqrt(2.0)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_std(weight: torch.Tensor, expected: float) -> None:
    """The rms about the known mean 0 is within 5 sampling errors of ``expected``."""
    rms = float(weight.detach().double().square().mean().sqrt())
    tolerance = 5.0 / math.sqrt(2.0 * weight.numel())
    assert abs(rms / expected - 1.0) < tolerance, (rms, expected, tolerance)


class Zero(nn.Module):
    """Multiplies by zero: the layer after it sees a constant input that no scaling can fix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


class Scale(nn.Module):
    """A custom module owning a raw nn.Parameter: unknown to actstats."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


# fan_in 800, fan_out 1200 so that the two modes differ
LINEAR_CASES = [
    ("kaiming_normal", nn.ReLU(), RELU_GAIN / math.sqrt(800)),
    ("kaiming_uniform", nn.LeakyReLU(0.2), LEAKY_GAIN / math.sqrt(800)),
    ("kaiming_normal:mode=fan_out", nn.Tanh(), TANH_GAIN / math.sqrt(1200)),
    ("kaiming_uniform:mode=fan_out", nn.ReLU(), RELU_GAIN / math.sqrt(1200)),
    ("he", nn.Identity(), 1.0 / math.sqrt(800)),  # nothing follows: gain 1
    ("xavier_normal", nn.ReLU(), math.sqrt(2.0 / (800 + 1200))),  # gain 1 whatever follows
    ("xavier_uniform", nn.Tanh(), math.sqrt(2.0 / 2000)),
    ("xavier:gain=auto", nn.Tanh(), TANH_GAIN * math.sqrt(2.0 / 2000)),
    ("xavier_uniform:gain=2.5", nn.ReLU(), 2.5 * math.sqrt(2.0 / 2000)),
    ("lecun_normal", nn.ReLU(), 1.0 / math.sqrt(800)),  # no gain
    ("lecun_uniform", nn.Tanh(), 1.0 / math.sqrt(800)),
    ("normal:std=0.05", nn.ReLU(), 0.05),
    ("trunc_normal:std=0.02", nn.ReLU(), 0.02 * TRUNC2_STD),
]


@pytest.mark.parametrize("scheme, act, expected", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_std_with_static_gains(scheme: str, act: nn.Module, expected: float) -> None:
    model = nn.Sequential(nn.Linear(800, 1200), nn.Dropout(), act)
    summary = init_weights(model, scheme, generator=gen())
    assert_std(model[0].weight, expected)
    assert torch.equal(model[0].bias, torch.zeros(1200))
    assert summary == InitSummary(scheme, ("0.weight", "0.bias"), ())


@pytest.mark.parametrize("scheme, act, expected", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_std_with_explicit_nonlinearities(scheme: str, act: nn.Module, expected: float) -> None:
    layer = nn.Linear(800, 1200)
    following = static_following_activations(nn.Sequential(layer, act))
    mapping = {layer: following[layer]} if layer in following else {}  # nn.Identity: nothing follows
    init_weights(layer, scheme, generator=gen(), nonlinearities=mapping)
    assert_std(layer.weight, expected)


def test_explicit_mapping_overrides_static_detection() -> None:
    model = nn.Sequential(nn.Linear(800, 1200), nn.ReLU())
    init_weights(model, "kaiming", generator=gen(), nonlinearities={})  # absent: identity
    assert_std(model[0].weight, 1.0 / math.sqrt(800))
    init_weights(model, "kaiming", generator=gen(), nonlinearities={model[0]: Activation("tanh")})
    assert_std(model[0].weight, TANH_GAIN / math.sqrt(800))


def test_trunc_normal_truncates_at_two_std() -> None:
    layer = nn.Linear(1000, 1000)
    init_weights(layer, "trunc_normal:std=0.02", generator=gen())
    assert float(layer.weight.detach().abs().max()) <= 2 * 0.02
    # the tails reach the relative bound (torch's absolute ±2 would allow |w| up to 100 std)
    assert float(layer.weight.detach().abs().max()) > 1.9 * 0.02


@pytest.mark.parametrize(
    "module, fan_in, fan_out",
    [(nn.Conv2d(64, 128, 3), 64 * 9, 128 * 9), (nn.ConvTranspose2d(64, 32, 3), 32 * 9, 64 * 9)],
    ids=["conv2d", "conv_transpose2d"],
)
def test_conv_fans_and_norm_skipped(module: nn.Module, fan_in: int, fan_out: int) -> None:
    channels = module.out_channels
    model = nn.Sequential(module, nn.BatchNorm2d(channels), nn.ReLU())
    init_weights(model, "kaiming", generator=gen())
    assert_std(module.weight, RELU_GAIN / math.sqrt(fan_in))
    init_weights(model, "xavier_uniform", generator=gen())
    assert_std(module.weight, math.sqrt(2.0 / (fan_in + fan_out)))


def test_static_following_activations() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(), nn.ReLU(),
        nn.Linear(4, 4), nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Tanh(),
        nn.Linear(4, 4), nn.PReLU(init=0.25),
    )
    following = static_following_activations(model)
    assert list(following) == [model[0], model[5], model[8]]  # model[4]: nothing follows
    assert following[model[0]] == Activation("relu", family="relu")
    assert following[model[5]] == Activation("leaky_relu", param=pytest.approx(0.2))
    assert following[model[8]] == Activation("leaky_relu", param=0.25)


def test_orthogonal_rows_scaled_by_gain() -> None:
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    init_weights(model, "orthogonal", generator=gen())
    w1, w2 = model[0].weight, model[2].weight
    torch.testing.assert_close(w1 @ w1.T, 2.0 * torch.eye(128), atol=1e-4, rtol=0)  # gain sqrt(2) squared
    torch.testing.assert_close(w2 @ w2.T, torch.eye(64), atol=1e-4, rtol=0)  # last layer: gain 1


def test_constant_zeros_uniform_and_bias() -> None:
    model = nn.Sequential(nn.Linear(200, 300), nn.LayerNorm(300), nn.Linear(300, 10))
    init_weights(model, "constant:val=0.5,bias=0.25")
    assert torch.equal(model[0].weight, torch.full((300, 200), 0.5))
    assert torch.equal(model[2].bias, torch.full((10,), 0.25))
    assert torch.equal(model[1].weight, torch.ones(300)) and torch.equal(model[1].bias, torch.zeros(300))
    init_weights(model, "zeros")
    assert all(torch.equal(p, torch.zeros_like(p)) for p in (model[0].weight, model[0].bias, model[2].weight))
    init_weights(model, "uniform:a=0.3", generator=gen())
    w = model[0].weight.detach()
    assert -0.3 <= float(w.min()) and float(w.max()) <= 0.3
    assert_std(w, 0.3 / math.sqrt(3.0))


def _lstm_checks(lstm: nn.LSTM, per_chunk_std) -> None:
    gates = (1.0, 1.0, TANH_GAIN, 1.0)  # i, f, g, o
    for name, param in lstm.named_parameters():
        if name.startswith("weight_hr"):
            assert_std(param, per_chunk_std(param, 1.0))
        elif name.startswith("weight"):
            for chunk, gate_gain in zip(param.chunk(4), gates):
                assert_std(chunk, per_chunk_std(chunk, gate_gain))


def test_lstm_kaiming_per_gate_chunk() -> None:
    lstm = nn.LSTM(256, 128, num_layers=2, bidirectional=True)
    init_weights(lstm, "kaiming", generator=gen())
    _lstm_checks(lstm, lambda w, g: g / math.sqrt(w.shape[1]))
    biases = [p for name, p in lstm.named_parameters() if name.startswith("bias")]
    assert len(biases) == 8 and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_lstm_xavier_uses_chunk_fans() -> None:
    lstm = nn.LSTM(256, 128, proj_size=64)
    summary = init_weights(lstm, "xavier_normal", generator=gen())
    # each chunk is [128, fan_in]: fan_out 128, not the stacked 512
    _lstm_checks(lstm, lambda w, g: math.sqrt(2.0 / (w.shape[0] + w.shape[1])))
    assert summary.initialized == ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0")


def test_lstm_forget_bias() -> None:
    lstm = nn.LSTM(8, 4)
    init_weights(lstm, "kaiming:lstm_forget_bias=1", generator=gen())
    # the gate sees bias_ih + bias_hh: the forget value sits in bias_ih only
    assert torch.equal(lstm.bias_ih_l0, torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))
    assert torch.equal(lstm.bias_hh_l0, torch.zeros(16))


def test_gru_and_rnn_chunks() -> None:
    gru = nn.GRU(256, 128)
    init_weights(gru, "kaiming", generator=gen())
    for chunk, gate_gain in zip(gru.weight_ih_l0.chunk(3), (1.0, 1.0, TANH_GAIN)):  # r, z, n
        assert_std(chunk, gate_gain / math.sqrt(256))
    for chunk, gate_gain in zip(gru.weight_hh_l0.chunk(3), (1.0, 1.0, TANH_GAIN)):
        assert_std(chunk, gate_gain / math.sqrt(128))
    rnn = nn.RNN(256, 128, nonlinearity="relu")
    init_weights(rnn, "kaiming", generator=gen())
    assert_std(rnn.weight_ih_l0, RELU_GAIN / math.sqrt(256))


def test_attention_chunks_each_with_own_fans() -> None:
    mha = nn.MultiheadAttention(256, 4, add_bias_kv=True)
    summary = init_weights(mha, "xavier_normal:bias=0.1", generator=gen())
    # each chunk is [256, 256]: sqrt(2 / 512), not the stacked [768, 256]'s sqrt(2 / 1024)
    for chunk in mha.in_proj_weight.chunk(3):
        assert_std(chunk, math.sqrt(2.0 / 512))
    assert torch.equal(mha.in_proj_bias, torch.full((768,), 0.1))
    assert torch.equal(mha.bias_k, torch.full((1, 1, 256), 0.1))
    assert set(summary.initialized) == {
        "in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"
    }
    split = nn.MultiheadAttention(256, 4, kdim=64, vdim=128)
    init_weights(split, "kaiming", generator=gen())
    assert_std(split.q_proj_weight, 1.0 / math.sqrt(256))
    assert_std(split.k_proj_weight, 1.0 / math.sqrt(64))
    assert_std(split.v_proj_weight, 1.0 / math.sqrt(128))


@pytest.mark.parametrize(
    "scheme",
    ["kaiming", "xavier_uniform", "orthogonal", "normal:std=1", "constant:val=2", "trunc_normal:std=0.02",
     "torch_default"],
)
def test_embedding_padding_row_stays_zero(scheme: str) -> None:
    embedding = nn.Embedding(100, 16, padding_idx=3)
    init_weights(embedding, scheme, generator=gen())
    assert torch.equal(embedding.weight[3], torch.zeros(16))
    assert float(embedding.weight.detach()[4].abs().sum()) > 0


def test_norm_layers_one_and_zero() -> None:
    norms = [nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True),
             nn.RMSNorm(4)]
    model = nn.Sequential(nn.Linear(4, 4), *norms)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
        norms[0].running_mean.fill_(5.0)
    init_weights(model, "kaiming", generator=gen())
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones(4))
        if getattr(norm, "bias", None) is not None:  # RMSNorm has none
            assert torch.equal(norm.bias, torch.zeros(4))
    assert torch.equal(norms[0].running_mean, torch.zeros(4))


@pytest.mark.parametrize("scheme", ["kaiming", "torch_default"])
def test_unknown_module_is_untouched_and_listed(scheme: str) -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 3), scale=Scale()))
    before = model.scale.alpha.detach().clone()
    summary = init_weights(model, scheme, generator=gen())
    assert summary.untouched == ("scale.alpha",)
    assert summary.initialized == ("fc.weight", "fc.bias")
    assert torch.equal(model.scale.alpha, before)


def test_prelu_keeps_its_slope() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(init=0.1))
    summary = init_weights(model, "kaiming", generator=gen())
    assert torch.equal(model[1].weight, torch.tensor([0.1]))
    assert summary.initialized == ("0.weight", "0.bias") and summary.untouched == ()


def test_default_changes_nothing() -> None:
    model = nn.Linear(4, 4)
    before = [p.detach().clone() for p in model.parameters()]
    assert init_weights(model, "default") == InitSummary("default")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _mixed_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 8),
                         nn.LSTM(8, 8), nn.MultiheadAttention(8, 2), nn.Embedding(10, 8))


@pytest.mark.parametrize("scheme", ["kaiming_uniform", "orthogonal", "trunc_normal:std=0.1", "torch_default"])
def test_same_seed_same_weights(scheme: str) -> None:
    first, second = _mixed_model(1), _mixed_model(2)  # built differently: init must overwrite everything
    init_weights(first, scheme, generator=gen(7))
    init_weights(second, scheme, generator=gen(7))
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


def test_torch_default_keeps_global_rng_and_resets() -> None:
    model = _mixed_model(1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(9.0)
    state = torch.get_rng_state()
    summary = init_weights(model, "torch_default", generator=gen())
    assert torch.equal(torch.get_rng_state(), state)
    assert len(summary.initialized) == len(list(model.parameters())) and summary.untouched == ()
    assert all(float(p.detach().max()) < 9.0 for p in model.parameters())
    assert torch.equal(model[5].out_proj.bias, torch.zeros(8))  # as MultiheadAttention builds it


def _output_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    variances: list[float] = []
    handles = [m.register_forward_hook(lambda mod, args, out: variances.append(float(out.var(correction=0))))
               for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return variances


@pytest.mark.parametrize(
    "model, shape",
    [
        (nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)),
         (256, 32)),
        (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                       nn.Linear(8 * 6 * 6, 10)), (16, 3, 8, 8)),
    ],
    ids=["mlp", "cnn"],
)
def test_lsuv_unit_output_variance(model: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=gen(1))
    model.eval()
    init_weights(model, "lsuv", generator=gen(), inputs=x)
    variances = _output_variances(model, x)
    assert len(variances) == 3
    assert all(abs(v - 1.0) < 0.05 for v in variances), variances
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_lsuv_needs_inputs() -> None:
    with pytest.raises(InitError, match=r"^init scheme 'lsuv' needs a probe batch: pass inputs="):
        init_weights(nn.Linear(4, 4), "lsuv")


def test_lsuv_dead_layer_raises_and_restores() -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), zero=Zero(), fc2=nn.Linear(4, 4)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InitError, match=r"^lsuv cannot normalize layer 'fc2': its output variance on the "
                                        r"probe batch is 0\.0 \(all outputs equal\)"):
        init_weights(model, "lsuv", generator=gen(), inputs=torch.randn(8, 4, generator=gen(1)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not m._forward_hooks for m in model.modules())


def test_parse_scheme_aliases_and_params() -> None:
    assert parse_scheme("he:mode=fan_out,bias=0.1") == SchemeSpec(
        "kaiming_normal", {"mode": "fan_out", "bias": 0.1}, "he:mode=fan_out,bias=0.1"
    )
    assert parse_scheme("xavier:gain=auto").params == {"gain": "auto"}
    assert {a: ALIASES[a] for a in ("glorot", "msra", "lecun")} == {
        "glorot": "xavier_normal", "msra": "kaiming_normal", "lecun": "lecun_normal"
    }
    assert "lsuv" in SCHEME_NAMES and "kaiming" not in SCHEME_NAMES


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("kaiming_norml", r"^unknown init scheme 'kaiming_norml'; expected one of: .*kaiming_normal.* "
                          r"\(did you mean 'kaiming_normal'\?\)$"),
        ("kaiming:std=2", r"^unknown parameter 'std' in init scheme 'kaiming:std=2'; "
                          r"kaiming_normal accepts: mode, bias, lstm_forget_bias$"),
        ("default:bias=1", r"^unknown parameter 'bias' .*default accepts no parameters$"),
        ("normal:std=", r"^parameter 'std' in init scheme 'normal:std=' has no value; write std=VALUE$"),
        ("constant", r"^init scheme 'constant' needs parameter 'val' \(e\.g\. 'constant:val=0\.1'\)"),
        ("normal:std=abc", r"^parameter 'std' in init scheme 'normal:std=abc' must be a number, got 'abc'$"),
        ("uniform:a=-1", r"^parameter 'a' .* must be a positive number, got '-1'$"),
        ("kaiming:mode=fan_avg", r"^parameter 'mode' .* must be one of: fan_in, fan_out, got 'fan_avg'$"),
        ("xavier:gain=x", r"^parameter 'gain' .* must be a number or 'auto', got 'x'$"),
        ("zeros:bias=1,bias=2", r"^parameter 'bias' is given twice"),
    ],
    ids=["unknown-name", "unknown-key", "no-params", "missing-value", "missing-required", "non-numeric",
         "negative", "bad-mode", "bad-gain", "duplicate"],
)
def test_parse_errors(text: str, pattern: str) -> None:
    with pytest.raises(UnknownSchemeError, match=pattern):
        parse_scheme(text)


def test_hand_built_spec_is_validated_before_touching_the_model() -> None:
    layer = nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    with pytest.raises(UnknownSchemeError, match=r"^unknown parameter 'std'"):
        init_weights(layer, SchemeSpec("kaiming_normal", {"std": 1.0}))
    assert torch.equal(layer.weight, before)
    assert init_weights(layer, SchemeSpec("zeros")).scheme == "zeros"
