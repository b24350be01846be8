"""A small ResNet built the torchvision way: BasicBlocks, BatchNorm, He init.

The residual network of He et al. (2016) with torchvision's conventions --
``nn.ReLU(inplace=True)`` shared inside each block (called twice per block),
convs without bias initialized with ``kaiming_normal_(mode="fan_out",
nonlinearity="relu")``, BatchNorm weight 1 and bias 0, and the option
``zero_init_residual=True`` that zeroes the last BatchNorm of every residual
branch so each block starts as the identity (Goyal et al. 2017). It is a
reference network: actstats should raise no ``vanishing`` or ``exploding``
flag on it, with or without zero-init, and its in-place ReLUs must still give
correct gradient statistics. Against the fan-in references, two layers sit
off: the stem conv (fan_out init with 3 in and 16 out channels: 0.43x He) and
``fc`` (PyTorch's default: 0.43x Xavier); every other conv is within sqrt(2)
of He, and a BatchNorm undoes each conv's scale anyway. With zero-init every
block's ``bn2`` outputs exactly 0 and the gradients reaching ``conv1``,
``bn1`` and ``conv2`` inside the branch are exactly 0 too (``bn2.weight``
alone gets one): the identity path carries the whole signal, which is not
vanishing. Note ``out += identity`` writes into ``bn2``'s output in place,
again as torchvision does. Widths and block counts are parameters; the
defaults fit a 32x32 image and run in milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (the BatchNorm after it has one)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (possibly downsampled) input, then ReLU."""

    expansion = 1

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)  # one module, called twice in forward
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision writes it
        return self.relu(out)


class ResNet(nn.Module):
    """Stem (7x7 conv, stride 2, max pool), four stages of BasicBlocks, average pool, fc."""

    def __init__(
        self,
        layers: tuple[int, ...] = (1, 1, 1, 1),
        widths: tuple[int, ...] = (16, 32, 64, 128),
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(
                f"layers and widths must have the same non-zero length, got {layers} and {widths}"
            )
        self.in_ch = widths[0]
        self.conv1 = nn.Conv2d(3, self.in_ch, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Stages named layer1..layerN like torchvision's, the first at stride 1.
        for i, (blocks, width) in enumerate(zip(layers, widths, strict=True), start=1):
            setattr(self, f"layer{i}", self._make_layer(width, blocks, stride=1 if i == 1 else 2))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)

        # torchvision's init; the final fc keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != width * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_ch, width, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width),
            )
        layers = [BasicBlock(self.in_ch, width, stride, downsample)]
        self.in_ch = width
        layers += [BasicBlock(width, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build(
    layers: tuple[int, ...] = (1, 1, 1, 1),
    widths: tuple[int, ...] = (16, 32, 64, 128),
    num_classes: int = 10,
    image_size: int = 32,
    batch_size: int = 8,
    zero_init_residual: bool = False,
) -> tuple[ResNet, torch.Tensor]:
    """Return the ResNet and a fixed standard-normal batch of images.

    The batch has shape ``(batch_size, 3, image_size, image_size)``. Weights come
    from the global RNG; the batch from a private generator.
    """
    model = ResNet(tuple(layers), tuple(widths), num_classes, zero_init_residual)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return model, x


def build_zero_init() -> tuple[ResNet, torch.Tensor]:
    """The default ResNet with the last BatchNorm of every block zero-initialized."""
    return build(zero_init_residual=True)


if __name__ == "__main__":
    net, images = build()
    print(net(images).shape)  # torch.Size([8, 10])
