"""The 100-layer matrix product: why weights cannot simply be drawn with std 1.

Reproduces the opening experiment of every weight-initialization primer: no
activation and no bias, just ``x <- W x`` a hundred times with 512x512
matrices drawn from a standard normal. Each product multiplies the rms by
about ``sqrt(512) = 22.6``, so float32 (max ~3.4e38) overflows to ``inf``
after about 28 layers (22.6**28 ~ 9e37 times the input) and the next product
turns ``inf - inf`` into ``nan``. actstats should report a ``nonfinite`` flag
naming the first layer whose output was not finite, ``exploding`` before it,
and ``init_mismatch`` on every layer (std 1 vs the expected 1/sqrt(512) =
0.044). ``build_scaled`` draws the weights with std ``1/sqrt(width)``, the
variance-preserving choice (LeCun/Xavier for a square linear map), and the rms
stays of order 1 through all 100 layers, with no flag raised.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Seed of the example batch's own generator. Deliberately not 0 or 42: a test that
# seeds the global RNG with the same value would draw weights repeating the
# batch (same seed, same normal stream), e.g. W[0] == x[0] in matrix_product.
BATCH_SEED = 9176431


def make_product(depth: int, width: int, std: float) -> nn.Sequential:
    """Return ``depth`` bias-free ``Linear(width, width)`` layers with N(0, std^2) weights."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be positive, got depth={depth}, width={width}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(linear.weight, mean=0.0, std=std)
        layers.append(linear)
    return nn.Sequential(*layers)


def build(
    depth: int = 100,
    width: int = 512,
    std: float = 1.0,
    batch_size: int = 8,
) -> tuple[nn.Sequential, torch.Tensor]:
    """Return the product network and a fixed standard-normal batch ``(batch_size, width)``.

    Weights come from the global RNG (seed it for identical weights); the batch
    from a private generator.
    """
    model = make_product(depth, width, std)
    gen = torch.Generator().manual_seed(BATCH_SEED)
    x = torch.randn(batch_size, width, generator=gen)
    return model, x


def build_scaled(
    depth: int = 100,
    width: int = 512,
    batch_size: int = 8,
) -> tuple[nn.Sequential, torch.Tensor]:
    """The same network with weight std ``1/sqrt(width)``: the rms stays near 1."""
    return build(depth=depth, width=width, std=1.0 / math.sqrt(width), batch_size=batch_size)


if __name__ == "__main__":
    for fn in (build, build_scaled):
        net, h = fn()
        with torch.no_grad():
            for i, layer in enumerate(net):
                h = layer(h)
                finite = bool(torch.isfinite(h).all())
                if i % 10 == 9 or not finite:
                    # float64 for the printout: in float32, x**2 overflows once |x| > 1.8e19,
                    # long before x itself does (around layer 12 here).
                    rms = h.double().pow(2).mean().sqrt().item()
                    print(f"{fn.__name__}: layer {i:3d} rms {rms:.3g}")
                if not finite:
                    break
