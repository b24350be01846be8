"""The kernels share a large tensor among PyTorch's own threads (actstats/_native.c, "Threads")."""

import copy
import ctypes
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from actstats import native, stats
from tests.test_stats import _numpy_histogram


@pytest.fixture
def two_threads(monkeypatch):
    """The kernels on, and PyTorch's thread count at 2 for one test (the suite runs on one)."""
    assert native.kernels is not None, "actstats/_native.c is not built: pip install -e . needs a C compiler"
    monkeypatch.setattr(native, "enabled", True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _openmp_visible() -> bool:
    """Whether the process exports GOMP_parallel (PyTorch's Linux wheels load their libgomp globally)."""
    try:
        ctypes.CDLL(None).GOMP_parallel
    except (AttributeError, OSError):
        return False
    return sys.platform == "linux"


def _kernel_figures(x, units_dim, bounds):
    """Kernel rows (activation with unit maxima, plain, weights) and histogram counts of ``x``."""
    store = stats.RowStore()
    act, maxima = store.reduce_units(x, None, units_dim, zeros=True)
    plain = store.reduce(x, saturation=(-1.0, 1.0), eps=0.01)
    weights = store.moments(x)
    rows = stats.finalize(store.collect(torch.device("cpu")), torch.tensor(store.numels(), dtype=torch.float64))
    counts = stats.add_histogram(None, x, bounds, 64)
    return rows[act + plain + weights], maxima, counts


@pytest.mark.parametrize("shape, units_dim", [((6, 3, 30011), 1), ((200, 16, 7, 7), 1), ((3001, 100), -1),
                                               ((400_003,), 0)])
def test_kernels_split_large_tensors_among_pytorch_threads(two_threads, shape, units_dim):
    # PyTorch's thread count decides, when its OpenMP runtime is visible in the process (elsewhere
    # the kernels run on one thread); a tensor too small for two threads of 2**16 values stays on one
    assert native.kernels.team(1 << 20, 2) == (2 if _openmp_visible() else 1)
    assert native.kernels.team(1 << 20, 1) == 1 and native.kernels.team(100_000, 2) == 1
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    flat[flat.numel() // 3] = 0.0
    flat[flat.numel() // 2:flat.numel() // 2 + 700] = 0.0
    finite = x.clone()
    flat[-5] = float("nan")  # in the second thread's part
    flat[flat.numel() // 4] = float("inf")
    for t in (finite, x):
        two = _kernel_figures(t, units_dim, (-3.0, 3.0))
        torch.set_num_threads(1)
        one = _kernel_figures(t, units_dim, (-3.0, 3.0))
        torch.set_num_threads(2)
        exact = [stats.F_N, stats.F_ZEROS, stats.F_NONFINITE, stats.F_SATURATED, stats.F_MIN, stats.F_MAX]
        assert torch.equal(two[0][:, exact].nan_to_num(7.0), one[0][:, exact].nan_to_num(7.0))
        torch.testing.assert_close(two[0], one[0], rtol=1e-12, atol=0, equal_nan=True)  # float64 order only
        torch.testing.assert_close(two[1], one[1], rtol=0, atol=0, equal_nan=True)  # unit maxima
        assert torch.equal(two[2], one[2])  # histogram counts
        # and each equals what PyTorch computes
        view = t.reshape(1) if t.dim() == 0 else t
        dims = [d for d in range(view.dim()) if d != units_dim % view.dim()]
        torch.testing.assert_close(two[1], view.amax(dim=dims) if dims else view, rtol=0, atol=0, equal_nan=True)
        values = t[torch.isfinite(t)].double()
        assert two[0][0, stats.F_NONFINITE] == t.numel() - values.numel()
        assert two[0][0, stats.F_ZEROS] == int((t == 0).sum())
        assert two[0][1, stats.F_SATURATED] == int((t.abs() >= torch.tensor(1.0 - 0.01)).sum())  # float32 bound
        assert np.array_equal(two[2].numpy(), _numpy_histogram(t.numpy().ravel(), -3.0, 3.0, 64))
        if values.numel() == t.numel():
            assert float(two[0][2, stats.F_SUM]) == pytest.approx(float(values.sum()), rel=1e-9, abs=1e-6)
            assert float(two[0][2, stats.F_SUMSQ]) == pytest.approx(float(values.square().sum()), rel=1e-9)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_kernels_on_its_own_thread(two_threads):
    # libgomp's pool does not survive a fork: a child of a process that used it would hang in it
    x = torch.randn(1 << 20)
    row = torch.zeros(8, dtype=torch.float64)
    native.kernels.moments(x.data_ptr(), x.numel(), row.data_ptr(), 2, True, False, 0.0, 0.0)  # the pool runs
    expected = row.clone()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, an exit status only
        signal.alarm(20)  # a hang ends the child instead of the suite
        ok = native.kernels.team(1 << 20, 2) == 1
        native.kernels.moments(x.data_ptr(), x.numel(), row.data_ptr(), 2, True, False, 0.0, 0.0)
        os._exit(0 if ok and torch.allclose(row, expected, rtol=1e-12, atol=0) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _reduce_from_two_threads(rounds: int) -> None:
    """Two Python threads reduce into one store, ``rounds`` times; raises AssertionError on a
    lost, doubled or wrong row (run in a child process by the test below)."""
    import threading

    torch.set_num_threads(1)
    for round_ in range(rounds):
        store = stats.RowStore()
        generator = torch.Generator().manual_seed(round_)
        dense = [torch.randn(64, 1024, generator=generator) + k for k in range(3)]
        strided = [torch.randn(40, 2, generator=generator)[:, 0] - k for k in range(3)]
        ways = [
            lambda x: store.reduce(x, zeros=True),
            lambda x: store.reduce_units(x, None, 0, zeros=True)[0],
            store.moments,  # weights: sums only
        ]
        written: list[tuple[int, torch.Tensor, int]] = []
        start = threading.Barrier(2)

        def reduce_many(tensors: list[torch.Tensor]) -> None:
            start.wait()
            for i in range(1500):
                x, way = tensors[i % len(tensors)], i % len(ways)
                written.extend((row, x, way) for row in ways[way](x))

        threads = [threading.Thread(target=reduce_many, args=(dense,)),
                   threading.Thread(target=reduce_many, args=(dense[:1] + strided,))]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # the interpreter also changes threads between Python lines
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)
        assert len(store) == len(written) == 3000 and sorted(row for row, _, _ in written) == list(range(3000))
        final = stats.finalize(store.collect(torch.device("cpu")),
                               torch.tensor(store.numels(), dtype=torch.float64))
        for row, x, way in written:
            assert final[row, stats.F_N] == x.numel()
            # float32 sums on the PyTorch path
            assert final[row, stats.F_SUM].item() == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-5)
            if way != 2:  # not store.moments
                assert (final[row, stats.F_MIN], final[row, stats.F_MAX]) == (x.min().double(), x.max().double())


def test_python_threads_reducing_into_one_store_lose_no_row():
    # Autograd runs a CPU tensor's gradient hooks on the thread that called backward and a
    # CUDA tensor's on the device's own thread: a model split across both devices reduces
    # into one store from two Python threads, and the kernels let go of the interpreter
    # while they read. Kernel rows and PyTorch rows (strided views) are interleaved, through
    # all three ways in, so that blocks close (every RowStore.BLOCK rows) while the other
    # thread's kernel may be writing. Without the store's lock, 4 of 6 runs of this test failed,
    # some by crashing (a row written past its block): hence the child process.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", "from tests.test_threads import _reduce_from_two_threads as run; run(8)"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]


def test_a_row_store_copies_with_a_lock_of_its_own():
    store = stats.RowStore()
    store.reduce(torch.randn(100, 10), zeros=True)
    store.reduce(torch.randn(50, 2)[:, 0])
    twin = copy.deepcopy(store)  # a deep copy of a recorder, or of a watch, copies its store
    assert twin._lock is not store._lock and not twin._lock.locked()
    device = torch.device("cpu")
    assert torch.equal(twin.collect(device), store.collect(device)) and twin.numels() == store.numels()
    twin.reduce(torch.ones(3))
    assert len(twin) == 3 and len(store) == 2
