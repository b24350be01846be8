"""Tiny models whose forward returns a dict or a named tuple instead of a tensor.

Not a classic experiment but a contract check: actstats must probe models
whose output is a container, back-propagating a standard-normal cotangent from
every floating output that requires grad (here both ``logits`` and ``aux``)
and recording the same layers whatever the container. Both models share one
body -- ``fc1`` (Linear), ``act`` (ReLU), and two heads ``logits`` and ``aux``
(Linear) -- so their reports should list the same records with the same
statistics for the same weights and batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


class Output(NamedTuple):
    """What :class:`NamedTupleModel` returns."""

    logits: torch.Tensor
    aux: torch.Tensor


class _TwoHeads(nn.Module):
    """Shared body: one hidden layer feeding a classification head and an auxiliary head."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.logits = nn.Linear(hidden, num_classes)
        self.aux = nn.Linear(hidden, 1)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.fc1(x))
        return self.logits(h), self.aux(h)


class DictModel(_TwoHeads):
    """Returns ``{"logits": (batch, num_classes), "aux": (batch, 1)}``."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, aux = self.heads(x)
        return {"logits": logits, "aux": aux}


class NamedTupleModel(_TwoHeads):
    """Returns ``Output(logits=(batch, num_classes), aux=(batch, 1))``."""

    def forward(self, x: torch.Tensor) -> Output:
        return Output(*self.heads(x))


def _batch(batch_size: int, in_features: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(BATCH_SEED)
    return torch.randn(batch_size, in_features, generator=gen)


def build_dict(
    in_features: int = 8, hidden: int = 16, num_classes: int = 4, batch_size: int = 4
) -> tuple[DictModel, torch.Tensor]:
    """Return the dict-output model and a fixed normal batch ``(batch_size, in_features)``."""
    return DictModel(in_features, hidden, num_classes), _batch(batch_size, in_features)


def build_namedtuple(
    in_features: int = 8, hidden: int = 16, num_classes: int = 4, batch_size: int = 4
) -> tuple[NamedTupleModel, torch.Tensor]:
    """Return the named-tuple-output model and the same batch as :func:`build_dict`."""
    return NamedTupleModel(in_features, hidden, num_classes), _batch(batch_size, in_features)


# Every example file has a ``build``; here it is the dict variant.
build = build_dict


if __name__ == "__main__":
    for fn in (build_dict, build_namedtuple):
        net, x = fn()
        out = net(x)
        fields = out if isinstance(out, dict) else out._asdict()
        print(fn.__name__, type(out).__name__, {k: tuple(v.shape) for k, v in fields.items()})
