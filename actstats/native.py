"""The optional one-pass kernels (``actstats/_native.c``) and when they apply.

A float32 tensor on the CPU whose values sit densely in memory is reduced by a
compiled kernel that reads it once; anything else (CUDA, float64, fp16/bf16,
sparse or overlapping layouts, tensor subclasses) goes through the PyTorch
operations in :mod:`actstats.stats`, which give the same figures. The kernels
are built by ``pip install`` when a C compiler is at hand; without one, or with
the environment variable ``ACTSTATS_NATIVE=0``, every tensor takes the PyTorch
path. :data:`enabled` can also be switched at run time (the tests run both paths).

A kernel given a large tensor shares it among ``torch.get_num_threads()`` threads
of PyTorch's own OpenMP pool, when the process has that runtime (PyTorch's Linux
wheels; elsewhere, and in a process forked after this module was imported, it
runs on the calling thread): see "Threads" in ``_native.c``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

#: The kernels' ``VERSION`` this code calls (``KERNELS_VERSION`` in ``_native.c``).
KERNELS_VERSION = 2

try:
    from actstats import _native as kernels
except ImportError:  # built without a C compiler
    kernels: Any = None
if kernels is not None and getattr(kernels, "VERSION", 0) != KERNELS_VERSION:
    warnings.warn("actstats' compiled kernels were built from another version of its code (an in-place build "
                  "not redone); using PyTorch operations instead. Rebuild them: pip install -e . (or python "
                  "setup.py build_ext --inplace)", RuntimeWarning, stacklevel=2)
    kernels = None

#: Use the compiled kernels where they apply.
enabled: bool = kernels is not None and os.environ.get("ACTSTATS_NATIVE", "1") != "0"


def _plain_float32_cpu(x: torch.Tensor) -> bool:
    """A plain strided float32 CPU tensor (no subclass, no lazy negation bit), with the kernels on."""
    return enabled and x.dtype == torch.float32 and x.is_cpu and type(x) is torch.Tensor \
        and x.layout == torch.strided and not x.is_neg()


def dense_float32_cpu(x: torch.Tensor) -> bool:
    """True when a kernel may read ``x`` as ``x.numel()`` float32 values from ``x.data_ptr()``.

    That is a plain float32 CPU tensor whose values fill a block of memory in
    some order (contiguous, channels-last, or a permutation of dimensions such
    as the transposed output of ``nn.MultiheadAttention``: the statistics do not
    depend on the order of the values).
    """
    return _plain_float32_cpu(x) and (x.is_contiguous() or _permuted_dense(x))


def _permuted_dense(x: torch.Tensor) -> bool:
    """True when some order of ``x``'s dimensions is contiguous (no gaps, no overlaps)."""
    expected = 1
    for stride, size in sorted((t, s) for s, t in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def row_major_float32_cpu(x: torch.Tensor) -> bool:
    """True when a kernel may read ``x`` in its logical (row-major) order: a contiguous
    :func:`_plain_float32_cpu` tensor. Written out in one expression: the hooks ask it of
    every tensor they reduce."""
    return enabled and type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu \
        and x.layout is torch.strided and not x.is_neg() and x.is_contiguous()
