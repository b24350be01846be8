"""The CIFAR-10 classifier from PyTorch's "Training a Classifier" tutorial.

Two 5x5 convolutions with max pooling and three fully connected layers, left
at PyTorch's default initialization (``kaiming_uniform_(a=sqrt(5))``: weight
std ``1/sqrt(3 * fan_in)``, 0.41x the He std for ReLU) -- the network that the
"what does PyTorch's default Conv2d init do?" and the "set every parameter to
0.0042" experiments were run on. Its ReLUs are functional (``F.relu`` inside
``forward``), so actstats should record them as ``relu()``, ``relu()#1``, ...
next to the module layers, and show the rms falling layer after layer with
``init_mismatch`` on every layer (default std 0.41x He for conv1..fc2, 0.44x
Xavier for fc3); ``--init constant:val=0.0042,bias=0.0042`` should raise
``symmetric`` on every layer. ``build`` returns the bare module, to be probed
with ``--input-shape 3,32,32``; ``build_with_inputs`` also returns a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


class Net(nn.Module):
    """LeNet-style CIFAR-10 net, layer for layer as in the PyTorch tutorial."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)  # 3x32x32 -> 6x28x28, pooled to 6x14x14
        self.pool = nn.MaxPool2d(2, 2)  # one pooling module, called twice
        self.conv2 = nn.Conv2d(6, 16, 5)  # 6x14x14 -> 16x10x10, pooled to 16x5x5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Functional ReLUs, as the tutorial writes them: no nn.ReLU module exists
        # to hook, which is exactly what actstats has to cope with.
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build(batch_size: int = 8) -> nn.Module:
    """Return the tutorial net alone, without example inputs.

    ``batch_size`` is accepted so that every build in ``examples/`` takes the
    same argument, and is unused here: the CLI makes the batch from
    ``--input-shape 3,32,32`` and ``--batch-size``.
    """
    del batch_size
    return Net()


def build_with_inputs(batch_size: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """Return the net and a fixed standard-normal batch of shape ``(batch_size, 3, 32, 32)``."""
    gen = torch.Generator().manual_seed(BATCH_SEED)
    return Net(), torch.randn(batch_size, 3, 32, 32, generator=gen)


if __name__ == "__main__":
    net, images = build_with_inputs()
    print(net(images).shape)  # torch.Size([8, 10])
