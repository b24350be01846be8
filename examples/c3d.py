"""A scaled-down C3D: 3x3x3 convolutions over video clips (Tran et al. 2015).

C3D stacks 3D convolutions and max pools over ``(channels, frames, height,
width)`` clips, then three fully connected layers with dropout. This follows
the layout of the widely used PyTorch port (conv1, pool1 over space only,
conv2, then pairs conv3a/conv3b, ...), including its two habits that matter
here: one shared ``self.relu = nn.ReLU()`` applied after every conv and fc
layer, and a private init that sets the conv weights with ``kaiming_normal_``
while leaving every Linear at PyTorch's default. actstats should record the
shared ReLU once per call (``relu``, ``relu#1``, ...), find the He-initialized
convs on target (no ``init_mismatch`` there) and flag ``init_mismatch`` on the
default-initialized fc layers (std ``1/sqrt(3 * fan_in)``: 0.41x He for
fc6/fc7, 0.42x Xavier for fc8). Channels, clip length and image size are
parameters, so a forward and backward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


class C3D(nn.Module):
    """C3D with ``len(channels)`` conv stages and a 3-layer classifier.

    Stage 1 is one conv and a spatial-only pool (1, 2, 2); stage 2 one conv
    and a (2, 2, 2) pool; every later stage two convs (``conv3a``,
    ``conv3b``, ...) and a (2, 2, 2) pool -- the original with
    ``channels=(64, 128, 256, 512, 512)``, 16x112x112 clips and fc width 4096.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (8, 16, 32),
        clip_len: int = 8,
        image_size: int = 32,
        num_classes: int = 10,
        fc_dim: int = 128,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"C3D needs at least 2 conv stages, got channels={channels}")
        n = len(channels)
        frames = clip_len // 2 ** (n - 1)  # every pool but pool1 halves time
        side = image_size // 2**n  # every pool halves space
        if frames < 1 or side < 1:
            raise ValueError(
                f"a clip of {clip_len} frames of {image_size}x{image_size} is too small for "
                f"{n} pooling stages; need clip_len >= {2 ** (n - 1)} and image_size >= {2**n}"
            )
        # Stage layout as (conv names, pool name), walked by forward().
        self.stages: list[tuple[list[str], str]] = []
        in_ch = 3
        for i, out_ch in enumerate(channels, start=1):
            names = [f"conv{i}"] if i <= 2 else [f"conv{i}a", f"conv{i}b"]
            for name in names:
                setattr(self, name, nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1))
                in_ch = out_ch
            pool = (1, 2, 2) if i == 1 else (2, 2, 2)
            setattr(self, f"pool{i}", nn.MaxPool3d(kernel_size=pool, stride=pool))
            self.stages.append((names, f"pool{i}"))
        self.flat_features = channels[-1] * frames * side * side
        self.fc6 = nn.Linear(self.flat_features, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self.dropout = nn.Dropout(p=0.5)
        # One ReLU module for the whole network, called after every conv and
        # after fc6 and fc7: a module with many calls per forward.
        self.relu = nn.ReLU()
        self._init_weight()

    def _init_weight(self) -> None:
        # As the popular port does (jfzhang95/pytorch-video-recognition,
        # network/C3D_model.py, and the many forks quoted in init tutorials):
        # kaiming_normal_ with its defaults -- mode="fan_in",
        # nonlinearity="leaky_relu" with a=0, i.e. std sqrt(2 / fan_in), the He
        # std for ReLU -- on the conv weights only. Conv biases and all Linear
        # layers keep PyTorch's default init (the port has no BatchNorm3d,
        # the other branch of its init loop).
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv_names, pool_name in self.stages:
            for name in conv_names:
                x = self.relu(getattr(self, name)(x))
            x = getattr(self, pool_name)(x)
        x = x.reshape(-1, self.flat_features)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)  # logits; the port's optional softmax is left out


def build(
    channels: tuple[int, ...] = (8, 16, 32),
    clip_len: int = 8,
    image_size: int = 32,
    num_classes: int = 10,
    batch_size: int = 2,
) -> tuple[C3D, torch.Tensor]:
    """Return the net and a fixed standard-normal clip batch ``(batch_size, 3, clip_len, H, W)``.

    Weights come from the global RNG; the batch from a private generator.
    """
    model = C3D(tuple(channels), clip_len, image_size, num_classes)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randn(batch_size, 3, clip_len, image_size, image_size, generator=gen)
    return model, x


if __name__ == "__main__":
    net, clips = build()
    print(net(clips).shape)  # torch.Size([2, 10])
