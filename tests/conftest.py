"""Test-suite settings: tiny models run fastest on one thread on a shared 2-core machine."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

from actstats import native, stats  # noqa: E402


@pytest.fixture(params=["kernels", "torch", "welford"])
def reduction_path(request, monkeypatch):
    """Run a test on each reduction path: the compiled one-pass kernels, the PyTorch operations
    CPU tensors take without them (shifted rows), and those CUDA tensors take (Welford rows,
    merged per record with PyTorch operations, as on CUDA, rather than in numpy on the host)."""
    if request.param == "kernels":
        assert native.kernels is not None, "actstats/_native.c is not built: pip install -e . needs a C compiler"
    monkeypatch.setattr(native, "enabled", request.param == "kernels")
    monkeypatch.setattr(stats, "welford_on_cpu", request.param == "welford")
    monkeypatch.setattr(stats, "host_merge_on_cpu", request.param != "welford")
    return request.param
