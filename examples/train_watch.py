"""Train a small MLP on synthetic data with ``actstats.watch`` writing to TensorBoard.

Run ``python examples/train_watch.py`` (optionally ``--steps 300 --logdir runs/train_watch``),
then ``tensorboard --logdir runs/``. Every 20th optimizer step is sampled: per-layer
activation and gradient histograms and scalars, the signal-propagation curve, and
the flags (none for this He-initialized model) appear under the run's name.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import actstats


def build(width: int = 64, depth: int = 4) -> nn.Sequential:
    """A ReLU MLP regressor: He init for the ReLU layers, LeCun for the linear head."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    head = nn.Linear(width, 1)
    nn.init.normal_(head.weight, 0.0, width ** -0.5)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


def train(steps: int = 200, logdir: str = "runs/train_watch", every: int = 20, seed: int = 0) -> actstats.Report | None:
    """Fit ``y = sin(sum(x))`` for ``steps`` steps; return the last sampled step's report."""
    torch.manual_seed(seed)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with actstats.watch(model, logdir=logdir, every=every, histograms=True, raise_on=("nonfinite",)) as w:
        for _ in range(steps):
            x = torch.randn(128, 64)
            y = torch.sin(x.sum(dim=1, keepdim=True))
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step()
    return w.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logdir", default="runs/train_watch")
    args = parser.parse_args()
    report = train(args.steps, args.logdir, args.every)
    flags = [f.kind for f in report.flags] if report else []
    print(f"wrote {args.logdir}; last sampled step: {len(report.layers) if report else 0} records, "
          f"flags: {', '.join(flags) or 'none'}")


if __name__ == "__main__":
    main()
