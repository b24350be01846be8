"""--init on probe and the compare command: same batches per scheme, verdicts, JSON."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import actstats
from actstats.cli import cli
from actstats.compare import compare
from actstats.errors import UnknownSchemeError
from tests import models
from tests.test_report import validate_report


def relu_mlp(depth=20, width=32):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def test_probe_init_uses_the_traced_functional_nonlinearity():
    # The CIFAR tutorial net calls F.relu in forward: kaiming must see it and use gain sqrt(2).
    model = models.FunctionalCifarNet()
    report = actstats.probe(model, torch.randn(4, 3, 32, 32), batches=1, init="kaiming")
    conv1 = report.layer("conv1").weight
    assert conv1.nonlinearity == "relu"
    # 450 samples of N(0, 2/75): the sample std is within 5/sqrt(2n) of sqrt(2/75)
    assert conv1.std == pytest.approx(math.sqrt(2 / 75), rel=5 / math.sqrt(2 * 450))
    # fc2 is the last layer: nothing follows, identity gain 1, std 1/sqrt(120).
    assert report.layer("fc2").weight.nonlinearity == "linear"
    assert report.layer("fc2").weight.std == pytest.approx(math.sqrt(1 / 120), rel=5 / math.sqrt(2 * 10 * 120))
    assert report.init == "kaiming" and report.untouched == ()
    assert {"init_mismatch", "vanishing", "vanishing_grad"}.isdisjoint(f.kind for f in report.flags)


def test_constant_init_of_the_cifar_net_is_symmetric():
    model = models.FunctionalCifarNet()
    report = actstats.probe(model, torch.randn(4, 3, 32, 32), batches=1, init="constant:val=0.0042,bias=0.0042")
    assert report.flagged("symmetric") == ["conv1", "conv2", "fc1", "fc2"]
    assert report.layer("conv1").weight.std == 0.0


def test_untouched_parameters_are_reported():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.scale

    report = actstats.probe(Scaled(), torch.randn(4, 4), batches=1, init="xavier")
    assert report.untouched == ("scale",)
    assert report.notices == ("init 'xavier' left 1 parameter(s) of unknown module types alone: scale",)
    assert report.to_dict()["untouched"] == ["scale"]


def test_bad_scheme_fails_before_the_model_is_touched():
    model = relu_mlp(2)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UnknownSchemeError, match=r"^unknown init scheme 'kaiming_norml'.*did you mean 'kaiming_normal'"):
        actstats.probe(model, torch.randn(2, 32), init="kaiming_norml")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compare_uses_the_same_batches_and_picks_he_for_a_relu_mlp():
    model = relu_mlp()

    def make(n, _gen=torch.Generator().manual_seed(3)):
        return torch.randn(n, 32, generator=_gen)  # a stream: each call gives new values

    original = [p.clone() for p in model.parameters()]
    result = compare(model, make, ["default", "xavier", "kaiming"], batches=3, batch_size=16)
    assert [row.scheme for row in result.rows] == ["default", "xavier", "kaiming"]
    assert result.best == "kaiming"
    assert result.rows[2].verdict == "ok" and "vanishing" in result.rows[0].verdict
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))  # copies only
    # Same batches: the input statistics are identical across schemes.
    inputs = {scheme: report.input for scheme, report in result.reports.items()}
    assert inputs["default"] == inputs["xavier"] == inputs["kaiming"]
    # The row's numbers come from its report.
    report = result.reports["default"]
    assert result.rows[0].output_ratio == report.layers[-1].act.rms / report.input.rms
    assert result.rows[0].flags == len(report.flags)
    grads = [l.grad.rms for l in report.layers]
    assert result.rows[0].first_grad_ratio == grads[0] / grads[-1]


def test_compare_cli_prints_one_row_per_scheme_and_json():
    runner = CliRunner()
    args = ["compare", "examples/deep_mlp.py:build", "--inits", "default,xavier,kaiming", "--batches", "2"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["scheme", "out/in"]
    assert [line.split()[0] for line in lines[1:4]] == ["default", "xavier", "*"]
    assert lines[3].split()[1] == "kaiming" and lines[3].endswith("ok")
    assert max(len(line) for line in lines) <= 80
    result = runner.invoke(cli, args + ["--format", "json"])
    doc = json.loads(result.stdout)
    assert doc["schema"] == "actstats.compare/1" and doc["best"] == "kaiming"
    assert [row["scheme"] for row in doc["rows"]] == ["default", "xavier", "kaiming"]
    assert set(doc["reports"]) == {"default", "xavier", "kaiming"}
    for report in doc["reports"].values():
        validate_report(report)
    assert doc["reports"]["kaiming"]["init"] == "kaiming"


def test_compare_cli_parameters_with_commas_and_bad_schemes():
    runner = CliRunner()
    result = runner.invoke(cli, ["compare", "examples/deep_mlp.py:build", "--batches", "1", "--format", "json",
                                 "--inits", "constant:val=0.01,bias=0.01,kaiming:mode=fan_out"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["reports"]) == ["constant:val=0.01,bias=0.01", "kaiming:mode=fan_out"]
    result = runner.invoke(cli, ["compare", "examples/deep_mlp.py:build", "--inits", "default,glorott"])
    assert result.exit_code == 2
    assert result.stderr.startswith("actstats: error: unknown init scheme 'glorott'")


def test_probe_cli_init_and_fail_on():
    runner = CliRunner()
    base = ["probe", "examples/deep_mlp.py:build", "--batches", "1", "--format", "json"]
    result = runner.invoke(cli, base + ["--fail-on", "vanishing"])
    assert result.exit_code == 1 and result.stderr == "actstats: failing: flag(s) raised: vanishing\n"
    result = runner.invoke(cli, base + ["--init", "kaiming", "--fail-on", "any"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["init"] == "kaiming"
    result = runner.invoke(cli, base + ["--fail-on", "vanishin"])
    assert result.exit_code == 2 and "unknown flag kind 'vanishin'" in result.stderr
    result = runner.invoke(cli, base + ["--threshold", "vanishing=1e30", "--fail-on", "vanishing"])
    assert result.exit_code == 0
