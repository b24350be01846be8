"""CUDA: statistics equal to the CPU's, and one host synchronisation per sampled step.

These tests need a CUDA device; CI has none, so there they are skipped as a whole
(the README's Performance section says when they last ran and on which GPU).
Synchronisations are counted with ``torch.cuda.set_sync_debug_mode("warn")``,
which warns at every operation that makes the host wait for the device: a
device-to-host copy, a host-to-device copy from pageable memory, ``.item()``,
``nonzero``... The count of a watched step is held against the same step
without actstats, so that a synchronisation inside PyTorch's own forward or
backward (cuDNN's LSTM, say) is not blamed on actstats.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import actstats
from actstats import native, stats
from actstats.probe import collect

from .models import FunctionalCifarNet, InplaceConvBlock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Recurrent(nn.Module):
    """An LSTM (tuple output, cuDNN) under a Linear head, tanh as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(torch.tanh(out[:, -1]))


class Encoder(nn.Module):
    """Two transformer encoder layers (MultiheadAttention, GELU, LayerNorm) and a shared head used twice."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu", dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.encoder(x)
        return {"out": self.head(F.silu(self.head(y)))}


#: name -> (model factory, input shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet_block": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), InplaceConvBlock(8), InplaceConvBlock(8)),
                     (16, 3, 12, 12)),
    "functional_cnn": (FunctionalCifarNet, (8, 3, 32, 32)),
    "lstm": (Recurrent, (8, 5, 8)),
    "encoder": (Encoder, (4, 10, 32)),
}


def build(name: str, device: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(device)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    out.float().pow(2).mean().backward()


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in convolutions or matrix products, so that CUDA and CPU compute the same float32 figures."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module", autouse=True)
def warm_cuda():
    """Run each kind of step once before any is counted: the first CUDA work of a process
    (library handles, allocator pools, pinned memory) is not what these tests measure."""
    model, x = build("resnet_block", "cuda")
    train_step(model, x)
    with actstats.watch(model, every=1, histograms=True) as w:
        for _ in range(2):
            train_step(model, x)
            w.step()
    actstats.probe(model, x, batches=2)
    torch.cuda.synchronize()


@contextlib.contextmanager
def synchronisations() -> Iterator[list[str]]:
    """Collect ``file:line`` of every synchronising CUDA operation in the block."""
    found: list[str] = []
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def _transfer_line() -> str:
    """``probe.py:N``: where ``collect`` moves a step's statistics to the host."""
    lines, first = inspect.getsourcelines(collect)
    return f"probe.py:{first + next(i for i, line in enumerate(lines) if '.cpu()' in line)}"


TRANSFER = _transfer_line()


def plain_synchronisations(model: nn.Module, x: torch.Tensor) -> list[str]:
    train_step(model, x)  # warm-up: cuBLAS/cuDNN handles, allocator
    with synchronisations() as found:
        train_step(model, x)
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("options", [{}, {"histograms": True}, {"raise_on": ("nonfinite",)}],
                         ids=["stats", "histograms", "nonfinite"])
def test_a_sampled_step_synchronises_once(name, options, tmp_path):
    model, x = build(name, "cuda")
    baseline = plain_synchronisations(model, x)
    logdir = str(tmp_path) if options.get("histograms") else None
    with actstats.watch(model, every=1, logdir=logdir, **options) as w:
        for _ in range(2):  # the second sampled step bins with the ranges the first one measured
            train_step(model, x)
            w.step()
        with synchronisations() as found:
            train_step(model, x)
            w.step()
        report = w.report()
    added = list((Counter(found) - Counter(baseline)).elements())
    assert added == [TRANSFER], f"watched step: {found}, plain step: {baseline}"
    assert len(report.layers) >= 3
    if options.get("histograms"):
        assert any(a is not None for a, _ in report.histograms.values())


@pytest.mark.parametrize("name", ["resnet_block", "encoder"])
def test_an_unsampled_step_adds_no_synchronisation(name):
    model, x = build(name, "cuda")
    baseline = plain_synchronisations(model, x)
    with actstats.watch(model, every=1000) as w:
        train_step(model, x)
        w.step()  # step 0, sampled
        with synchronisations() as found:
            train_step(model, x)
            w.step()
    assert found == baseline


def test_a_probe_synchronises_once():
    model, x = build("resnet_block", "cuda")
    actstats.probe(model, x, batches=1)  # warm-up
    with synchronisations() as found:
        actstats.probe(model, x, batches=1)
    assert found == [TRANSFER]


def test_to_device_copies_without_synchronising():
    with synchronisations() as found:
        t = stats.to_device([1, 2, 3, 2**40 + 1], torch.long, torch.device("cuda"))
        f = stats.to_device([0.1, -2.5], torch.float64, torch.device("cuda"))
    assert found == []
    assert t.device.type == "cuda" and f.device.type == "cuda"
    assert t.cpu().tolist() == [1, 2, 3, 2**40 + 1] and f.cpu().tolist() == [0.1, -2.5]


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=2e-4, abs_tol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_statistics_equal_the_cpu_statistics(name):
    cpu_model, x = build(name, "cpu")
    cuda_model = copy.deepcopy(cpu_model).cuda()
    assert not native.dense_float32_cpu(x.cuda())  # CUDA tensors take the PyTorch path
    on_cpu = actstats.probe(cpu_model, x, batches=2, seed=3)
    on_cuda = actstats.probe(cuda_model, x.cuda(), batches=2, seed=3)
    assert on_cuda.device.startswith("cuda")
    assert [layer.name for layer in on_cuda.layers] == [layer.name for layer in on_cpu.layers]
    for c, g in zip(on_cpu.layers, on_cuda.layers):
        assert c.act.numel == g.act.numel and c.act.nonfinite == g.act.nonfinite == 0, c.name
        for field in ("mean", "std", "rms", "min", "max", "zero_frac"):
            assert _close(getattr(c.act, field), getattr(g.act, field)), (c.name, field)
        assert _close(c.input_rms, g.input_rms), c.name
        if c.grad is not None:
            for field in ("mean", "std", "rms"):
                assert _close(getattr(c.grad, field), getattr(g.grad, field)), (c.name, "grad", field)
        for field in ("dead_frac", "saturation"):
            cv, gv = getattr(c, field), getattr(g, field)
            assert (cv is None) == (gv is None) and (cv is None or _close(cv, gv)), (c.name, field)
        if c.weight is not None:
            assert _close(c.weight.std, g.weight.std), c.name
    assert [f.kind for f in on_cuda.flags] == [f.kind for f in on_cpu.flags]


def test_histograms_in_deterministic_mode(tmp_path):
    """histc has no deterministic CUDA kernel: in deterministic mode a sampled step with
    histograms still runs and counts every value once."""
    model, x = build("resnet_block", "cuda")  # convolutions and BatchNorm only: no cuBLAS workspace needed
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with actstats.watch(model, every=1, histograms=True, logdir=str(tmp_path)) as w:
            for _ in range(3):  # the first step bins with measured ranges, the others with hints
                train_step(model, x)
                w.step()
            report = w.report()
    finally:
        torch.use_deterministic_algorithms(before)
    for layer in report.layers:
        act, _ = report.histograms[layer.name]
        assert sum(act.counts) == layer.act.numel, layer.name


def test_cuda_histograms_count_every_value():
    """Values outside the first batch's range count in the end bins: every value is counted once."""
    model, x = build("resnet_block", "cuda")
    report = actstats.probe(model, x, batches=2, histogram_bins=16)
    for layer in report.layers:
        act, grad = report.histograms[layer.name]
        assert len(act.counts) == 16 and sum(act.counts) == layer.act.numel == act.num, layer.name
        if grad is not None:
            assert sum(grad.counts) == grad.num, layer.name
