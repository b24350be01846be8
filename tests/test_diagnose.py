"""Theory and flags: reference networks stay clean, the classic failures are caught and located."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import actstats
from actstats import theory
from actstats.diagnose import Thresholds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import resnet  # noqa: E402
import transformer  # noqa: E402

PROPAGATION = {"vanishing", "exploding", "vanishing_grad", "exploding_grad", "init_mismatch"}


def mlp(widths, activation, init, *, bias=0.0, seed=0):
    """Linear layers between ``widths`` each followed by ``activation``, weights by ``init``."""
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        linear = nn.Linear(fan_in, fan_out)
        if init is not None:
            init(linear.weight)
            nn.init.constant_(linear.bias, bias)
        layers += [linear, activation()]
    return nn.Sequential(*layers)


def he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def xavier(w):
    nn.init.xavier_normal_(w)


def lecun(w):
    nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1]))


def kinds(report):
    return {f.kind for f in report.flags}


def probe(model, x, **kwargs):
    return actstats.probe(model, x, batches=kwargs.pop("batches", 2), **kwargs)


# --- clean reference networks ----------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "shape"),
    [(lambda: mlp([64] * 51, nn.ReLU, he), (32, 64)),
     (lambda: mlp([64] * 17, nn.Tanh, xavier), (32, 64)),
     (lambda: mlp([64] * 51, nn.SELU, lecun), (32, 64))],
    ids=["he-relu-mlp-50", "xavier-tanh-mlp-16", "lecun-selu-mlp-50"],
)
def test_matched_mlps_are_clean(model, shape):
    report = probe(model(), torch.randn(*shape))
    assert kinds(report) & PROPAGATION == set(), [f.message for f in report.flags]


def test_he_initialized_cnn_is_clean():
    torch.manual_seed(0)
    layers, channels = [], [3, 16, 16, 32, 32, 32, 32]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    nn.init.xavier_normal_(layers[-1].weight)
    report = probe(nn.Sequential(*layers), torch.randn(8, 3, 16, 16))
    assert kinds(report) & PROPAGATION == set(), [f.message for f in report.flags]


@pytest.mark.parametrize("zero_init", [False, True], ids=["resnet", "resnet-zero-init-residual"])
def test_resnet_with_batchnorm_and_inplace_relu_is_clean(zero_init):
    torch.manual_seed(0)
    model, x = resnet.build(zero_init_residual=zero_init)
    report = probe(model, x)
    assert kinds(report) & PROPAGATION == set(), [f.message for f in report.flags]
    if zero_init:  # the branch is silent at init, and that is not vanishing
        assert report.layer("layer1.0.bn2").act.rms == 0.0


def test_pre_ln_transformer_is_clean():
    torch.manual_seed(0)
    model, batch = transformer.build()
    report = probe(model, batch)
    assert kinds(report) & PROPAGATION == set(), [f.message for f in report.flags]
    attn = next(l for l in report.layers if l.type == "MultiheadAttention")
    assert [p["name"] for p in attn.weight.parts] == [
        "in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]", "out_proj.weight"]


# --- caught ----------------------------------------------------------------------------

def test_default_init_relu_mlp_vanishes_in_both_directions_and_mismatches():
    # kaiming_uniform(a=sqrt(5)): weight std 1/sqrt(3 fan_in), 0.41x He's sqrt(2/fan_in).
    report = probe(mlp([64] * 51, nn.ReLU, None), torch.randn(32, 64))
    assert {"vanishing", "vanishing_grad", "init_mismatch"} <= kinds(report)
    mismatched = report.flagged("init_mismatch")
    assert mismatched == [str(2 * i) for i in range(50)]  # every Linear, in execution order
    flag = next(f for f in report.flags if f.kind == "init_mismatch")
    assert flag.value == pytest.approx(1 / math.sqrt(6), rel=0.05) and flag.threshold == 2.0
    assert "Try --init kaiming." in flag.message


def test_normal_std_one_explodes():
    report = probe(mlp([64] * 11, nn.Identity, lambda w: nn.init.normal_(w, 0.0, 1.0)), torch.randn(16, 64))
    flag = next(f for f in report.flags if f.kind == "exploding")
    # x8 (sqrt(64)) per Linear: the Identity "1" receives x8, Linear "2" x8, Identity "3" x64.
    assert flag.layer == "3"
    assert flag.value > 1e8 and flag.threshold == 10.0
    assert "activations grow x" in flag.message and "Try --init xavier." in flag.message


def test_xavier_on_a_deep_relu_mlp_vanishes_and_says_he_predicts_one():
    report = probe(mlp([128] * 25, nn.ReLU, xavier), torch.randn(64, 128))
    flag = next(f for f in report.flags if f.kind == "vanishing")
    # x sqrt(1/2) per Linear+ReLU: the ratio falls below 1/10 after 7 layers.
    per_layer = float(flag.message.split(" shrink x")[1].split(" ")[0])
    assert per_layer == pytest.approx(math.sqrt(0.5), abs=0.06)
    assert "He predicts x1.00 for relu" in flag.message and "Try --init kaiming." in flag.message
    assert flag.value == pytest.approx(0.5 ** 12, rel=0.6)  # 24 layers of x0.71


def test_alternating_widths_under_xavier_mismatch_on_widening_layers_only():
    widths = [128, 1024, 128, 1024, 128, 1024, 128]
    report = probe(mlp(widths, nn.ReLU, xavier), torch.randn(16, 128))
    # widening 128->1024: Xavier sqrt(2/1152)=0.042 vs He sqrt(2/128)=0.125, about 3x under;
    # narrowing 1024->128: Xavier 0.042 vs He sqrt(2/1024)=0.044, within 2x.
    assert report.flagged("init_mismatch") == ["0", "4", "8"]
    values = [f.value for f in report.flags if f.kind == "init_mismatch"]
    assert values == pytest.approx([math.sqrt(128 / 1152)] * 3, rel=0.05)


def test_negative_bias_kills_relus():
    report = probe(mlp([16, 16, 16], nn.ReLU, he, bias=-100.0), torch.randn(32, 16))
    assert report.flagged("dead_relu") == ["1", "3"]
    flag = next(f for f in report.flags if f.kind == "dead_relu")
    assert flag.value == 1.0 and flag.threshold == 0.5


def test_large_weights_saturate_sigmoids():
    report = probe(mlp([32, 32, 32], nn.Sigmoid, lambda w: nn.init.normal_(w, 0.0, 3.0)), torch.randn(64, 32))
    assert report.flagged("saturated") == ["1", "3"]
    assert all(f.value > 0.5 for f in report.flags if f.kind == "saturated")


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
@pytest.mark.parametrize("value", [0.0042, 0.0], ids=["constant-0.0042", "zeros"])
def test_constant_weights_are_symmetric(value):
    model = mlp([8, 16, 16, 4], nn.ReLU, lambda w: nn.init.constant_(w, value), bias=value)
    report = probe(model, torch.randn(8, 8))
    assert report.flagged("symmetric") == ["0", "2", "4"]
    assert "all 16 units have identical weights" in report.flags[-3].message or any(
        "all 16 units have identical weights" in f.message for f in report.flags)


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_random_weights_are_not_symmetric_even_with_equal_rows_but_different_bias():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    assert "symmetric" not in kinds(probe(linear, torch.randn(4, 4)))


class NaNInTheMiddle(nn.Module):
    """fc2's output is NaN from one column on: the first non-finite record is fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        with torch.no_grad():
            self.fc2.bias[1] = float("nan")

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_nan_is_located_at_the_layer_that_produced_it():
    report = probe(NaNInTheMiddle(), torch.randn(4, 4))
    # relu() zeroes the gradient where its input is NaN (NaN > 0 is false): backward stays finite.
    assert [(f.kind, f.layer) for f in report.flags if f.kind == "nonfinite"] == [("nonfinite", "fc2")]
    assert report.layer("fc1").act.nonfinite == 0
    assert report.layer("fc2").act.nonfinite == 2 * 4  # one column of 4 samples, 2 batches
    assert report.layer("fc3").act.nonfinite == 2 * 4 * 4  # fc3 mixes the NaN into every output
    assert "nonfinite" in report.layer("fc2").flags


class SqrtOfZero(nn.Module):
    """sqrt of a ReLU output that is exactly 0: finite forward, infinite gradient at relu."""

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        with torch.no_grad():
            self.fc1.bias[0] = -100.0  # unit 0 is always 0 after the ReLU

    def forward(self, x):
        return self.fc2(torch.sqrt(self.relu(self.fc1(x))))


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_an_infinite_gradient_is_located_in_the_backward_pass():
    report = probe(SqrtOfZero(), torch.randn(4, 4))
    assert [(f.kind, f.layer) for f in report.flags if f.kind == "nonfinite"] == [("nonfinite", "relu")]
    relu = report.layer("relu")
    # d sqrt(y)/dy = inf wherever y == 0: exactly the zeros of the ReLU output (unit 0 and others).
    assert relu.grad.nonfinite == round(relu.act.zero_frac * relu.act.numel) >= 2 * 4
    assert report.layer("fc2").grad.nonfinite == 0
    assert all(l.act.nonfinite == 0 for l in report.layers)


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_inf_input_is_reported_as_the_input():
    x = torch.randn(4, 4)
    x[0, 0] = float("inf")
    report = probe(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), x, batches=1)
    assert [(f.kind, f.layer) for f in report.flags if f.kind == "nonfinite"][0] == ("nonfinite", "input")


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_halving_layers_give_the_exact_gain_and_the_exact_flagged_layers():
    layers = []
    for _ in range(6):
        linear = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            linear.weight.copy_(0.5 * torch.eye(8))  # y = x / 2: gain exactly 0.5
        layers.append(linear)
    report = probe(nn.Sequential(*layers), torch.randn(16, 8), batches=1)
    for layer in report.layers:
        assert layer.weight.measured_gain == pytest.approx(0.5, rel=1e-6)
        # predicted gain sqrt(fan_in) * rms(W) = sqrt(8) * sqrt(8 * 0.25 / 64) = 0.5
        assert layer.weight.predicted_gain == pytest.approx(0.5, rel=1e-6)  # float32 on the device
    # Inputs received: 1, 1/2, ..., 1/32, then the output 1/64 of the input.
    # Below 1/10 from the input of layer 4 (1/16) on: that is where the flag points.
    (flag,) = [f for f in report.flags if f.kind == "vanishing"]
    assert flag.layer == "4" and flag.value == pytest.approx(1 / 64, rel=1e-6)
    assert " shrink x0.5 per layer" in flag.message
    # std(0.5 I) = sqrt(8 * 0.25 / 64 - (4 / 64)**2) = 0.165, x0.47 of Xavier/LeCun's 0.354.
    assert report.flagged("init_mismatch") == ["0", "1", "2", "3", "4", "5"]
    # Gradients w.r.t. the outputs of layers 5..0: 1, 1/2, ..., 1/32 of the cotangent;
    # below 1/10 from layer 1 (1/16) back to layer 0 (1/32).
    (grad_flag,) = [f for f in report.flags if f.kind == "vanishing_grad"]
    assert grad_flag.layer == "1" and grad_flag.value == pytest.approx(1 / 32, rel=1e-6)


def test_thresholds_are_settable():
    model = mlp([16, 16, 16], nn.ReLU, he, bias=-100.0)
    x = torch.randn(32, 16)
    assert "dead_relu" not in kinds(probe(model, x, thresholds={"dead_relu": 1.0}))
    assert "dead_relu" in kinds(probe(model, x, thresholds=Thresholds(dead_relu=0.99)))
    with pytest.raises(actstats.ActStatsError, match=r"^unknown threshold 'dead'"):
        probe(model, x, thresholds={"dead": 0.1})


# --- theory against torch.nn.init ---------------------------------------------------------

@pytest.mark.parametrize(
    "module",
    [nn.Linear(30, 20), nn.Conv2d(6, 12, 5), nn.Conv3d(3, 8, (3, 4, 5)), nn.ConvTranspose2d(6, 12, 3)],
    ids=["linear", "conv2d", "conv3d", "conv-transpose2d"],
)
@pytest.mark.parametrize(("nonlinearity", "param"), [("relu", None), ("leaky_relu", 0.2), ("tanh", None),
                                                     ("linear", None)])
def test_fans_and_stds_match_torch_init(module, nonlinearity, param):
    (part,) = theory.weight_parts(module)
    fan_in, fan_out = theory.fans(part.tensor)
    assert (fan_in, fan_out) == torch.nn.init._calculate_fan_in_and_fan_out(module.weight)
    gain = theory.gain(nonlinearity, param)
    assert gain == torch.nn.init.calculate_gain(nonlinearity, param)
    assert theory.xavier_std(fan_in, fan_out) == 1.0 * math.sqrt(2.0 / float(fan_in + fan_out))
    # torch's kaiming_normal_ std: gain / sqrt(fan_in)
    assert theory.he_std(fan_in, gain) == gain / math.sqrt(fan_in)


def test_lstm_gate_parts_have_their_own_fans_and_gains():
    lstm = nn.LSTM(10, 6)
    parts = {p.name: p for p in theory.weight_parts(lstm)}
    assert list(parts) == [f"weight_{k}_l0[{g}]" for k in ("ih", "hh") for g in "ifgo"]
    forget = parts["weight_ih_l0[f]"]
    assert torch.equal(forget.tensor, lstm.weight_ih_l0[6:12])
    assert theory.fans(forget.tensor) == (10, 6) and forget.nonlinearity == "sigmoid"
    assert parts["weight_hh_l0[g]"].nonlinearity == "tanh"
    assert theory.gain("tanh") == 5.0 / 3 and theory.gain("sigmoid") == 1.0


def test_following_nonlinearity_is_found_through_norm_dropout_and_functional_calls():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.drop = nn.Dropout(0.1)
            self.fc = nn.Linear(4, 4)
            self.act = nn.LeakyReLU(0.2)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.drop(self.bn(self.conv(x))))
            x = x.mean((2, 3))
            return self.out(self.act(self.fc(x)))

    report = probe(Net(), torch.randn(4, 3, 8, 8))
    assert report.layer("conv").weight.nonlinearity == "relu"
    assert report.layer("fc").weight.nonlinearity == "leaky_relu"
    assert report.layer("fc").weight.he_std == pytest.approx(math.sqrt(2 / 1.04) / 2)
    assert report.layer("out").weight.nonlinearity == "linear"
    assert report.layer("out").weight.reference == "xavier"


@pytest.mark.usefixtures("reduction_path")  # both reduction paths (tests/conftest.py)
def test_symmetry_check_spans_chunks_and_sees_one_differing_weight():
    from actstats.weights import weight_figures

    layer = nn.Linear(3000, 1000)  # 3M weights: the row differences go through the scratch buffer in chunks
    with torch.no_grad():
        layer.weight.copy_(torch.randn(1, 3000).expand(1000, 3000))
        layer.bias.fill_(0.5)

    def symmetric():
        vector, decode = weight_figures([layer])
        return decode(vector.numpy())[layer].symmetric

    assert symmetric()
    with torch.no_grad():
        layer.weight[999, 2999] += 1e-3  # the last weight of the last unit
    assert not symmetric()
