"""Resolve a MODEL_SPEC (``path/to/file.py:callable`` or ``package.module:callable``).

The callable takes no required arguments and returns an ``nn.Module`` or a
pair ``(module, example_inputs)`` (SPEC 3). ``--inputs`` specs use the same
syntax; that callable is given the batch size.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from actstats.errors import ModelSpecError


@dataclass(frozen=True)
class LoadedModel:
    """A model built from a MODEL_SPEC, with the example inputs its callable returned (or None)."""

    model: nn.Module
    example_inputs: Any
    spec: str


def _split(spec: str, what: str) -> tuple[str, str]:
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise ModelSpecError(
            f"{what} {spec!r} is not of the form path/to/file.py:callable or package.module:callable"
        )
    return location, name


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ModelSpecError(f"model file {path!r} does not exist")
    abspath = os.path.abspath(path)
    module_name = "actstats_user_" + os.path.splitext(os.path.basename(abspath))[0]
    spec = importlib.util.spec_from_file_location(module_name, abspath)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"model file {path!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(abspath)
    sys.path.insert(0, folder)  # let the file import its neighbours
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise ModelSpecError(f"importing {path!r} failed: {type(err).__name__}: {err}") from err
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ModelSpecError(
            f"module {name!r} cannot be found ({err}); give a file path ending in .py or an importable module"
        ) from err
    except Exception as err:
        raise ModelSpecError(f"importing {name!r} failed: {type(err).__name__}: {err}") from err


def resolve_callable(spec: str, what: str = "MODEL_SPEC") -> Callable[..., Any]:
    """Import the file or module of ``spec`` and return its callable."""
    location, name = _split(spec, what)
    looks_like_file = location.endswith(".py") or os.sep in location or "/" in location
    module = _import_file(location) if looks_like_file else _import_module(location)
    target = getattr(module, name, None)
    if target is None or not callable(target):
        available = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        hint = difflib.get_close_matches(name, available, n=1)
        listing = ", ".join(available) if available else "none"
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ModelSpecError(
            f"{location!r} has no callable {name!r}; callables defined there: {listing}{suffix}"
        )
    return target


def load_model(spec: str, *, seed: int | None = None) -> LoadedModel:
    """Build the model named by ``spec``.

    With ``seed``, the callable runs under ``torch.manual_seed(seed)`` inside a
    forked RNG, so a model whose weights come from the global RNG is built the
    same way every time (the CLI passes ``--seed``), and the caller's RNG state
    is left as it was.

    Raises:
        ModelSpecError: a missing file or module, a missing callable (the
            message lists those that exist), a callable that raises or that
            returns something other than a module or ``(module, inputs)``.
    """
    build = resolve_callable(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            result = build()
    except Exception as err:
        raise ModelSpecError(f"calling {spec!r} raised {type(err).__name__}: {err}") from err
    example = None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
    if not isinstance(result, nn.Module):
        raise ModelSpecError(
            f"{spec!r} returned a {type(result).__name__}; expected an nn.Module or a pair (module, example_inputs)"
        )
    return LoadedModel(result, example, spec)


def load_inputs(spec: str) -> Callable[[int], Any]:
    """Resolve ``--inputs file.py:fn``; ``fn(batch_size)`` returns one batch."""
    fn = resolve_callable(spec, "--inputs")
    try:
        inspect.signature(fn).bind(1)
    except (TypeError, ValueError) as err:
        raise ModelSpecError(f"--inputs {spec!r} must accept one argument, the batch size ({err})") from err
    return fn
