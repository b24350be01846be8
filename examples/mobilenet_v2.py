"""A small MobileNetV2, with ReLU6 + BatchNorm or with SELU and no BatchNorm.

MobileNetV2 (Sandler et al. 2018) is built from inverted residual blocks: a
1x1 expansion conv, a 3x3 depthwise conv, and a linear 1x1 projection, with a
residual add when the block keeps its shape. This is the network of the
CIFAR-10 experiment that trained it from scratch with random-normal, Glorot,
He and -- after swapping ReLU6 for SELU -- LeCun-normal weights. The default
build follows torchvision (ReLU6, BatchNorm after every conv, convs
``kaiming_normal_(mode="fan_out")``, classifier ``normal(0, 0.01)``): the
BatchNorms re-standardize every layer, so actstats should show activations of
order 1 throughout and no ``vanishing``/``exploding`` flag, although that init
is far from the fan-in references -- torch counts a depthwise kernel's fan_out
as channels x 9, so the depthwise convs get 0.07-0.15x He, the linear
projections 2-2.6x Xavier and the classifier 0.18x Xavier.
``activation="selu"`` (``build_selu``) replaces every ReLU6 by SELU and drops
the BatchNorms, as in Klambauer et al.'s self-normalizing networks, with
LeCun-normal weights (std ``1/sqrt(fan_in)``): there the signal is kept near
zero mean and unit variance by the activation alone, and probing it with
``--init kaiming`` or ``--init normal:std=1`` shows what happens without that
pairing. Sizes are small enough for a CPU: ``image_size=32``,
``width_mult=0.5``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431

# (expand ratio t, output channels c, repeats n, first stride s), as in the
# paper's Table 2 but cut after the 64-channel stage to keep the model small.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
)
ACTIVATIONS = ("relu6", "selu")


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, as torchvision does."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10 %
        new_value += divisor
    return new_value


def conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: str = "relu6",
    act: bool = True,
) -> nn.Sequential:
    """Conv2d [+ BatchNorm2d] [+ activation] as one Sequential (``0``, ``1``, ``2``).

    With ReLU6 the conv has no bias (the BatchNorm supplies it); the SELU
    variant has no BatchNorm, so its conv keeps a bias. (The blog experiment
    this follows kept BatchNorm in its SELU variant; dropping it, as
    Klambauer et al. do, is what lets a probe see SELU normalize on its own.)
    """
    use_bn = activation == "relu6"
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=not use_bn,
        )
    ]
    if use_bn:
        layers.append(nn.BatchNorm2d(out_ch))
    if act:
        layers.append(nn.ReLU6(inplace=True) if activation == "relu6" else nn.SELU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), plus the input when shapes match."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, activation: str
    ) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_norm_act(in_ch, hidden, 1, activation=activation))
        layers += [
            conv_norm_act(hidden, hidden, 3, stride, groups=hidden, activation=activation),
            # The projection is linear on purpose: a nonlinearity on the narrow
            # bottleneck destroys information (the paper's section 3.2).
            conv_norm_act(hidden, out_ch, 1, activation=activation, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residual blocks, 1x1 head, global average pool, Linear classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 0.5,
        activation: str = "relu6",
        last_channel: int = 640,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}"
            )
        in_ch = _make_divisible(32 * width_mult)
        # Like torchvision, the head is never narrowed below its base width
        # (here 640, half of torchvision's 1280, to stay small).
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [conv_norm_act(3, in_ch, 3, stride=2, activation=activation)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, activation))
                in_ch = out_ch
        features.append(conv_norm_act(in_ch, self.last_channel, 1, activation=activation))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        self._init_weights(activation)

    def _init_weights(self, activation: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if activation == "relu6":
                    # torchvision's MobileNetV2 init.
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                else:
                    # LeCun normal, std 1/sqrt(fan_in): the init SELU's fixed point assumes.
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if activation == "relu6":
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def build(
    width_mult: float = 0.5,
    num_classes: int = 10,
    image_size: int = 32,
    batch_size: int = 8,
    activation: str = "relu6",
) -> tuple[MobileNetV2, torch.Tensor]:
    """Return the net and a fixed standard-normal batch ``(batch_size, 3, image_size, image_size)``.

    Weights come from the global RNG (seed it for identical weights); the batch
    from a private generator.
    """
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, activation=activation)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return model, x


def build_selu() -> tuple[MobileNetV2, torch.Tensor]:
    """The self-normalizing variant: SELU everywhere, no BatchNorm, LeCun-normal weights."""
    return build(activation="selu")


if __name__ == "__main__":
    for fn in (build, build_selu):
        net, images = fn()
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{fn.__name__}: {n_params} parameters, output {tuple(net(images).shape)}")
