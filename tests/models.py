"""Named edge-case models for the tests; each docstring says what it exercises."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class FunctionalCifarNet(nn.Module):
    """The CIFAR-10 tutorial net: activations are F.relu calls inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class ReuseReLU(nn.Module):
    """One nn.ReLU module applied after three layers (C3D style): three records."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc3(self.relu(self.fc2(self.relu(self.fc1(x))))))


class InplaceConvBlock(nn.Module):
    """conv -> BN -> ReLU(inplace) -> conv -> ReLU(inplace) + identity: the ResNet pattern."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = out + x
        return self.relu(out)

    def reference(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The same computation out of place, returning every record's output in order."""
        y1 = F.conv2d(x, self.conv1.weight, None, padding=1)
        y2 = F.batch_norm(y1, None, None, self.bn1.weight, self.bn1.bias, training=True)
        y3 = torch.relu(y2)
        y4 = F.conv2d(y3, self.conv2.weight, self.conv2.bias, padding=1)
        y5 = torch.relu(y4 + x)
        return [y1, y2, y3, y4, y5]


class DeadReLU(nn.Module):
    """Linear with bias -100 before a ReLU: every unit is dead."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.1)
            self.fc.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class HalfDead(nn.Module):
    """Identity weights, bias -100 on the first half of the units: dead_frac is exactly 0.5."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(width))
            self.fc.bias.zero_()
            self.fc.bias[: width // 2] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class DictOutput(nn.Module):
    """Returns a dict of two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head_a = nn.Linear(4, 2)
        self.head_b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return {"a": self.head_a(h), "b": self.head_b(h)}


Pair = namedtuple("Pair", ["logits", "features"])


class NamedTupleOutput(nn.Module):
    """Returns a namedtuple (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Pair:
        h = self.body(x)
        return Pair(self.head(h), h)


@dataclass
class Output:
    """A dataclass output."""

    logits: torch.Tensor
    label: torch.Tensor


class DataclassOutput(nn.Module):
    """Returns a dataclass holding float logits and an integer label."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Output:
        logits = self.fc(x)
        return Output(logits, logits.argmax(-1))


class ArgmaxOutput(nn.Module):
    """Outputs only integer class ids: nothing differentiable, probed forward-only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(-1)


class Arithmetic(nn.Module):
    """No parameters, no child module, no activation: nothing to hook."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


class KeywordModel(nn.Module):
    """Takes two keyword tensors (a dict batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(tokens)) * scale


class Shared(nn.Module):
    """The same Linear registered under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alias = self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.fc(x))


class FunctionalInLeaf(nn.Module):
    """A leaf module whose own forward calls F.relu: one record for the leaf, none for F.relu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) * 2


class WithLeafActivation(nn.Module):
    """Linear followed by a custom leaf module that calls F.relu internally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = FunctionalInLeaf()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))
