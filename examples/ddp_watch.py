"""``actstats.watch`` on a DistributedDataParallel model: launch with torchrun.

    torchrun --nproc-per-node 2 examples/ddp_watch.py --logdir runs/ddp_watch

Each rank trains on its own synthetic data (gloo backend, CPU). On sampled
steps the ranks merge their statistics exactly (one all-gather per step); every rank can read the merged ``w.report()``, and only rank 0
writes TensorBoard events. Records are named after the inner module (``0``,
``1``, ...), without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import actstats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--logdir", default="runs/ddp_watch")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    try:
        with actstats.watch(model, logdir=args.logdir, every=args.every) as w:
            for _ in range(args.steps):
                x = torch.randn(64, 32, generator=data)
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.step()
        report = w.report()
        print(f"rank {rank}/{dist.get_world_size()} (pid {os.getpid()}): merged act std of "
              f"'{report.layers[0].name}' = {report.layers[0].act.std:.4f}; flags: "
              f"{', '.join(f.kind for f in report.flags) or 'none'}")
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
