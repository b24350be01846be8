"""Test-suite settings: tiny models run fastest on one thread on a shared 2-core machine."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

from actstats import native  # noqa: E402


@pytest.fixture(params=["kernels", "torch"])
def reduction_path(request, monkeypatch):
    """Run a test on both reduction paths: the compiled one-pass kernels and the PyTorch operations."""
    if request.param == "kernels":
        assert native.kernels is not None, "actstats/_native.c is not built: pip install -e . needs a C compiler"
    monkeypatch.setattr(native, "enabled", request.param == "kernels")
    return request.param
