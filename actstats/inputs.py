"""Turn what the user gave as inputs into probe batches, and feed a batch to a model.

A batch is a tensor (one positional argument), a tuple of tensors (positional
arguments) or a dict (keyword arguments). From Python, ``inputs`` may also be
a list or any other iterable of batches (a DataLoader), or a callable
``batch_size -> batch`` (SPEC 3).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from actstats.errors import InputError

Batch = Union[torch.Tensor, tuple, dict]


def describe(batch: Any) -> str:
    """A short description of a batch for error messages: ``tensor (8, 3, 32, 32)``."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def _check_batch(batch: Any, where: str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise InputError(
        f"{where} is a {type(batch).__name__}; expected a tensor, a tuple/list of tensors "
        "or a dict of keyword arguments"
    )


def make_like(batch: Batch, generator: torch.Generator) -> Batch:
    """Make a batch with the same structure, shapes and dtypes as ``batch`` (SPEC 3).

    Floating tensors are drawn normal with the example's mean and population std,
    integer tensors uniform over the example's value range (inclusive), booleans
    uniform; anything that is not a tensor is passed along unchanged.
    """
    if isinstance(batch, Mapping):
        return {k: make_like(v, generator) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(make_like(v, generator) for v in batch)
    if not isinstance(batch, torch.Tensor):
        return batch
    x = batch.detach()
    if x.numel() == 0:
        return x.clone()
    if x.is_floating_point():
        xf = x.double()
        finite = xf[torch.isfinite(xf)]
        mean = float(finite.mean()) if finite.numel() else 0.0
        std = float(finite.std(correction=0)) if finite.numel() else 1.0
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        return (noise * std + mean).to(dtype=x.dtype, device=x.device)
    if x.dtype == torch.bool:
        return (torch.rand(x.shape, generator=generator) < 0.5).to(x.device)
    low, high = int(x.min()), int(x.max())
    return torch.randint(low, high + 1, x.shape, generator=generator).to(dtype=x.dtype, device=x.device)


def materialize(
    inputs: Any,
    *,
    batches: int | None,
    batch_size: int,
    generator: torch.Generator,
) -> list[Batch]:
    """Return the list of probe batches described by ``inputs`` (see the module docstring)."""
    if batches is not None and batches < 1:
        raise InputError(f"batches must be at least 1, got {batches}")
    if callable(inputs) and not isinstance(inputs, (torch.Tensor, nn.Module)):
        made = []
        for i in range(batches or 1):
            try:
                batch = inputs(batch_size)
            except Exception as err:  # the user's function failed: say which and why
                raise InputError(f"the inputs function raised {type(err).__name__}: {err}") from err
            made.append(_check_batch(batch, f"what the inputs function returned (call {i + 1})"))
        return made
    if isinstance(inputs, (torch.Tensor, tuple, Mapping)):
        first = _check_batch(inputs, "inputs")
        return [first] + [make_like(first, generator) for _ in range((batches or 1) - 1)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        taken = list(itertools.islice(iter(inputs), batches))
        if not taken:
            raise InputError("inputs is an empty iterable; give at least one batch")
        return [_check_batch(b, f"batch {i} of inputs") for i, b in enumerate(taken)]
    raise InputError(
        f"inputs is a {type(inputs).__name__}; expected a tensor, a tuple of tensors, a dict, "
        "an iterable of batches or a callable batch_size -> batch"
    )


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


def positional_capacity(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` accepts; None when unlimited."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def call(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on one batch: a tensor positionally, a tuple spread, a dict as kwargs.

    A tuple longer than ``forward`` accepts (a DataLoader's ``(x, y)`` for a
    model taking ``x``) is cut to the leading arguments it accepts.
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    capacity = positional_capacity(model)
    args = batch if capacity is None or capacity == 0 else batch[:capacity]
    return model(*args)


def synthetic(
    shape: tuple[int, ...],
    *,
    dtype: str = "float",
    vocab_size: int | None = None,
    seed: int = 0,
) -> Callable[[int], torch.Tensor]:
    """A batch maker for ``--input-shape``: standard normal floats or uniform token ids in [0, vocab)."""
    if dtype not in ("float", "long"):
        raise InputError(f"--input-dtype must be 'float' or 'long', got {dtype!r}")
    if dtype == "long" and not vocab_size:
        raise InputError("--input-dtype long needs --vocab-size N (token ids are drawn from [0, N))")
    gen = torch.Generator().manual_seed(seed)

    def make(batch_size: int) -> torch.Tensor:
        full = (batch_size, *shape)
        if dtype == "long":
            return torch.randint(0, int(vocab_size), full, generator=gen)  # type: ignore[arg-type]
        return torch.randn(full, generator=gen)

    return make


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``--input-shape 3,224,224`` (per sample, without the batch dimension)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(
            f"--input-shape {text!r} is not a list of positive integers; expected e.g. 3,224,224"
        )
    return shape
