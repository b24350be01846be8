"""A deep plain MLP: the textbook experiment behind Xavier and He initialization.

Fifty fully connected layers of equal width, each followed by the same
activation, fed a standard-normal batch -- the network of Glorot & Bengio
(2010) and He et al. (2015), and of every "why initialization matters" post
that prints the activation std layer by layer. With PyTorch's own default init
(``kaiming_uniform_(a=sqrt(5))``, weight std ``1/sqrt(3 * fan_in)``, 0.41x the
He std for ReLU) the rms of a ReLU stack shrinks by 1/sqrt(6) = 0.41 per layer
until the bias terms hold it at a small floor, and the gradients shrink with
it: actstats should flag ``vanishing``, ``vanishing_grad`` and
``init_mismatch`` on every Linear. With ``init="kaiming"`` the rms stays
roughly constant across all 50 layers and no such flag is raised. ``"lecun"``
keeps a SELU stack at unit variance; ``"xavier"`` (gain 1) with tanh decays
only slowly, since tanh's slope is below 1 off zero (rms about 0.23 after 10
layers and 0.1 after 50 at width 256, so a depth-50 probe sits at the 10x
``vanishing`` threshold); ``"normal1"`` (std 1) explodes like the
matrix-product experiment until the activations overflow to inf/nan.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
}
INITS = ("default", "kaiming", "xavier", "lecun", "normal1")


def _init_linear(layer: nn.Linear, init: str) -> None:
    """Re-initialize one Linear in place; every scheme but ``default`` zeroes the bias."""
    if init == "default":
        return  # keep torch's kaiming_uniform_(a=sqrt(5)) weights and its uniform bias
    fan_in = layer.in_features
    if init == "kaiming":
        # He et al. 2015: std = sqrt(2 / fan_in) keeps E[x^2] constant through ReLU.
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    elif init == "xavier":
        # Glorot & Bengio 2010: std = sqrt(2 / (fan_in + fan_out)), gain 1.
        nn.init.xavier_normal_(layer.weight, gain=1.0)
    elif init == "lecun":
        # LeCun 1998 / Klambauer et al. 2017 (SELU): std = 1 / sqrt(fan_in).
        nn.init.normal_(layer.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))
    elif init == "normal1":
        # Unit-std weights: each layer multiplies the rms by about sqrt(fan_in).
        nn.init.normal_(layer.weight, mean=0.0, std=1.0)
    nn.init.zeros_(layer.bias)


def make_mlp(depth: int, width: int, activation: str, init: str) -> nn.Sequential:
    """Stack ``depth`` x (Linear(width, width), activation) as one flat Sequential.

    Layers are named ``0, 1, 2, ...`` (Linear at even indices, activation at odd
    ones), so a report reads straight down the depth of the network.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of: {', '.join(ACTIVATIONS)}"
        )
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of: {', '.join(INITS)}")
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be positive, got depth={depth}, width={width}")
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        _init_linear(linear, init)
        layers += [linear, ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


def build(
    depth: int = 50,
    width: int = 256,
    activation: str = "relu",
    init: str = "default",
    batch_size: int = 32,
) -> tuple[nn.Sequential, torch.Tensor]:
    """Return the MLP and a fixed standard-normal batch of shape ``(batch_size, width)``.

    Weights come from the global RNG, as for any model; seed it with
    ``torch.manual_seed`` for bit-identical weights. The example batch has its
    own generator, so building never disturbs the caller's random state.
    """
    model = make_mlp(depth, width, activation, init)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randn(batch_size, width, generator=gen)
    return model, x


def build_default() -> tuple[nn.Sequential, torch.Tensor]:
    """50-layer ReLU MLP with PyTorch's default init: the signal vanishes."""
    return build(depth=50, init="default")


def build_kaiming() -> tuple[nn.Sequential, torch.Tensor]:
    """50-layer ReLU MLP with He (Kaiming) normal init: the signal keeps its scale."""
    return build(depth=50, init="kaiming")


if __name__ == "__main__":
    for fn in (build_default, build_kaiming):
        net, batch = fn()
        h = batch
        with torch.no_grad():
            for i, layer in enumerate(net):
                h = layer(h)
                if i % 10 == 9 or i == len(net) - 1:
                    print(f"{fn.__name__}: layer {i:3d} rms {h.pow(2).mean().sqrt().item():.3g}")
