"""The compiled kernels' module: a build older than the Python code is not used."""

import importlib
import sys
import types

import pytest

import actstats
from actstats import native


def test_an_outdated_kernel_build_is_not_used(monkeypatch):
    assert native.kernels is not None and native.kernels.VERSION == native.KERNELS_VERSION
    outdated = types.ModuleType("actstats._native")  # an in-place build from before a kernel was added
    outdated.moments = lambda *args: None
    monkeypatch.setitem(sys.modules, "actstats._native", outdated)
    monkeypatch.setattr(actstats, "_native", outdated)
    try:
        with pytest.warns(RuntimeWarning, match="built from another version of its code"):
            importlib.reload(native)
        assert native.kernels is None and not native.enabled  # every tensor takes PyTorch operations
    finally:
        monkeypatch.undo()
        importlib.reload(native)
    assert native.kernels is not None and native.enabled
