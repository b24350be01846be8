"""The classic experiments in examples/, each with its verdict asserted (sizes shrunk by parameter)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actstats
from actstats.compare import compare

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import c3d  # noqa: E402
import cifar_net  # noqa: E402
import deep_mlp  # noqa: E402
import lstm_text  # noqa: E402
import matrix_product  # noqa: E402
import mobilenet_v2  # noqa: E402
import train_watch  # noqa: E402

PROPAGATION = {"vanishing", "exploding", "vanishing_grad", "exploding_grad"}


def kinds(report):
    return {f.kind for f in report.flags}


def test_matrix_product_explodes_with_std_one_and_not_with_one_over_sqrt_width():
    torch.manual_seed(0)
    model, x = matrix_product.build(depth=30, width=64)
    report = actstats.probe(model, x, batches=1)
    flag = next(f for f in report.flags if f.kind == "exploding")
    assert flag.value == pytest.approx(8.0 ** 30, rel=0.99)  # x sqrt(64) per layer, 30 layers
    torch.manual_seed(0)
    model, x = matrix_product.build_scaled(depth=30, width=64)
    assert kinds(actstats.probe(model, x, batches=1)) & (PROPAGATION | {"init_mismatch"}) == set()


def test_deep_relu_mlp_vanishes_under_the_default_init_and_not_under_kaiming():
    torch.manual_seed(0)
    model, x = deep_mlp.build(depth=20, width=64)
    assert {"vanishing", "vanishing_grad", "init_mismatch"} <= kinds(actstats.probe(model, x, batches=2))
    torch.manual_seed(0)
    model, x = deep_mlp.build(depth=20, width=64, init="kaiming")
    assert kinds(actstats.probe(model, x, batches=2)) == set()


def test_cifar_net_with_every_parameter_0_0042_is_symmetric():
    model, x = cifar_net.build_with_inputs(batch_size=4)
    report = actstats.probe(model, x, batches=1, init="constant:val=0.0042,bias=0.0042")
    assert report.flagged("symmetric") == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_mobilenet_v2_inits_side_by_side():
    # The README's configuration (default sizes, 4 batches, seed 0): BatchNorm normalizes the
    # init's scale away; He's gains are the closest to theory.
    torch.manual_seed(0)
    model, x = mobilenet_v2.build()
    result = compare(model, x, ["normal:std=0.05", "xavier", "kaiming"], batches=4)
    assert result.best == "kaiming"
    assert all(row.verdict == "ok" for row in result.rows), [row.verdict for row in result.rows]
    torch.manual_seed(0)
    model, x = mobilenet_v2.build(width_mult=0.25, image_size=16, batch_size=4, activation="selu")
    result = compare(model, x, ["normal:std=0.05", "xavier", "kaiming", "lecun"], batches=1)
    verdicts = {row.scheme: row.verdict for row in result.rows}
    assert result.best == "lecun" and verdicts["lecun"] == "ok"
    assert verdicts["normal:std=0.05"].startswith("vanishing")


def test_c3d_with_kaiming_normal_convs_propagates_and_only_its_default_fcs_mismatch():
    torch.manual_seed(0)
    model, x = c3d.build()
    report = actstats.probe(model, x, batches=2)
    assert kinds(report) & PROPAGATION == set()
    assert report.flagged("init_mismatch") == ["fc6", "fc7"]  # nn.Linear's own init, 0.41x He
    conv = report.layer("conv1").weight
    assert conv.std == pytest.approx(conv.he_std, rel=0.1) and conv.nonlinearity == "relu"
    assert [l.name for l in report.layers if l.type == "ReLU"] == ["relu"] + [f"relu#{k}" for k in range(1, 6)]


def test_lstm_with_per_gate_xavier_init():
    torch.manual_seed(0)
    model, tokens = lstm_text.build(init="xavier_per_gate")
    report = actstats.probe(model, tokens, batches=2)
    assert kinds(report) == set()
    parts = {p["name"]: p for p in report.layer("lstm").weight.parts}
    for gate in "ifgo":
        part = parts[f"weight_ih_l0[{gate}]"]  # each chunk (hidden x embed) is Xavier on its own
        n = part["fan_in"] * part["fan_out"]
        assert part["std"] == pytest.approx(part["xavier_std"], rel=5 / math.sqrt(2 * n))
    torch.manual_seed(0)
    model, tokens = lstm_text.build()
    assert "vanishing_grad" in kinds(actstats.probe(model, tokens, batches=2))


def test_train_watch_example(tmp_path):
    report = train_watch.train(steps=20, logdir=str(tmp_path), every=10)
    assert report is not None and report.flags == ()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_watch_example_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(ROOT / "examples" / "ddp_watch.py"),
               "--steps", "4", "--every", "2", "--logdir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-2000:]
    # The two processes share stdout: their lines may interleave, so match, don't split.
    found = dict(re.findall(r"rank (\d)/2 \(pid \d+\): merged act std of '0' = ([0-9.]+)", done.stdout))
    assert set(found) == {"0", "1"}, done.stdout
    assert found["0"] == found["1"]  # both ranks hold the same merged figure
    assert len(os.listdir(tmp_path)) == 1  # one event file: rank 0 only
