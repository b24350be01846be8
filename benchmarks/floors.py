"""How much of a sampled step's cost any per-layer hook pays, and how much is actstats' own.

    python benchmarks/floors.py                      # cnn, 60 rounds
    python benchmarks/floors.py --workload mlp --rounds 30

Same workloads, seeds and threads as ``overhead.py`` (2 on CPU). Each round
runs one step of every method below, in a seeded shuffled order, on its own
deep copy of the model; a figure is the method's median step over plain's
median, and the median of the per-round ratios (paired: one round's steps
run within a second of each other):

* ``empty_hooks``: a forward pre-hook and a forward hook (``with_kwargs``, as
  actstats registers them) on every leaf module, and a tensor hook that does
  nothing on every output that requires grad: what hooking costs at all.
* ``kernel_hooks``: the same, but the forward hook and the tensor hook hand
  their tensor to actstats' compiled kernel (one read, the moments actstats
  records) with the least Python possible: no record, no name, no state.
* ``kernel_weights``: ``kernel_hooks``, and a forward pre-hook on every
  parametric layer that hands each of its weight parts to the kernel actstats
  reads weights with (float64 sums, one pass), once per step: on the cnn and
  the mlp every activation, gradient and weight a sampled step reads (not
  the inputs it reads where no layer produced them: 10 per cnn step), read
  with the least Python (on the transformer the leaves' hooks miss the
  attention's tuple outputs and the functional ReLUs, 8 of actstats' 36
  records).
* ``actstats_hooks``: a sampled step of ``actstats.watch(every=1)`` without its
  ``w.step()``, which is timed apart (``w.step``, in ms: merge, transfer,
  weights, diagnosis, report).
* ``actstats_step``: both together, as ``actstats_stats`` in ``overhead.py``.

The differences between consecutive lines are what each layer of the design
costs: hooking at all, reading every activation and gradient once, reading
the weights once, actstats' bookkeeping in the hooks (records, names, input
rows, functional activations, in-place safety), and ``w.step()``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import time
from typing import Any

import torch

import actstats
from actstats import native, stats, theory
from overhead import build, forward_backward

METHODS = ("plain", "empty_hooks", "kernel_hooks", "kernel_weights", "actstats_hooks", "actstats_step")


class _KernelHooks:
    """Hooks that only give each output and gradient to the compiled kernel."""

    def __init__(self) -> None:
        self.rows = torch.zeros(1 << 12, stats.RAW_WIDTH, dtype=torch.float64)  # one row per read, reused
        self.address = self.rows.data_ptr()
        self.next = 0
        self.seen: set[torch.nn.Module] = set()  # modules whose weights this step has read

    def read(self, x: torch.Tensor, zeros: bool) -> None:
        row, self.next = self.next, (self.next + 1) % self.rows.shape[0]
        address = self.address + row * stats.RAW_WIDTH * 8
        native.kernels.moments(x.data_ptr(), x.numel(), address, torch.get_num_threads(), zeros, False, 0.0, 0.0)

    def gradient(self, grad: torch.Tensor | None) -> None:
        if grad is not None and native.row_major_float32_cpu(grad):
            self.read(grad, False)

    def output(self, module: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if type(out) is torch.Tensor and native.row_major_float32_cpu(out):
            self.read(out, True)
            if out.requires_grad:
                out.register_hook(self.gradient)

    def weights(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        """A parametric layer's weight parts, read once per step (``seen`` is cleared between steps)."""
        if module in self.seen:
            return
        self.seen.add(module)
        threads = torch.get_num_threads()
        for part in theory.weight_parts(module):
            w = part.tensor
            if w.numel() and native.row_major_float32_cpu(w):
                row, self.next = self.next, (self.next + 1) % self.rows.shape[0]
                native.kernels.sums(w.data_ptr(), w.numel(), self.address + row * stats.RAW_WIDTH * 8, threads)


def _nothing(*args: Any) -> None:
    return None


def _empty_output_hook(module: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
    if type(out) is torch.Tensor and out.requires_grad:
        out.register_hook(_nothing)


def _hook_leaves(model: torch.nn.Module, output_hook: Any, weights: Any = None) -> None:
    """Hooks on every leaf; with ``weights``, its pre-hook on every parametric module instead, leaf
    or not (``nn.MultiheadAttention`` owns weights and has a child, as actstats reads it)."""
    for module in model.modules():
        leaf = next(module.children(), None) is None
        reads = weights is not None and theory.is_parametric(module)
        if leaf or reads:
            module.register_forward_pre_hook(weights if reads else _nothing, with_kwargs=True)
        if leaf:
            module.register_forward_hook(output_hook, with_kwargs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="cnn", choices=["cnn", "mlp", "transformer"])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if native.kernels is None:
        raise SystemExit("actstats' kernels are not built (pip install -e . needs a C compiler)")
    torch.set_num_threads(args.threads)
    base, x = build(args.workload)
    models = {name: copy.deepcopy(base) for name in METHODS}
    _hook_leaves(models["empty_hooks"], _empty_output_hook)
    _hook_leaves(models["kernel_hooks"], _KernelHooks().output)
    weight_reader = _KernelHooks()
    _hook_leaves(models["kernel_weights"], weight_reader.output, weight_reader.weights)
    watches = {name: actstats.watch(models[name], every=1).__enter__() for name in ("actstats_hooks", "actstats_step")}
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    step_alone: list[float] = []
    order, shuffle = list(METHODS), random.Random(0).shuffle
    clock = time.perf_counter
    try:
        for round_ in range(args.warmup + args.rounds):
            shuffle(order)
            for name in order:
                gc.collect()
                weight_reader.seen.clear()
                start = clock()
                forward_backward(models[name], x)
                backward_done = clock()
                if name in watches:
                    watches[name].step()
                end = clock()
                if round_ >= args.warmup:
                    seconds[name].append((backward_done if name == "actstats_hooks" else end) - start)
                    if name == "actstats_hooks":
                        step_alone.append(end - backward_done)
    finally:
        for w in watches.values():
            w.__exit__(None, None, None)
    plain = seconds["plain"]
    print(f"{args.workload}: {args.rounds} rounds, {args.threads} threads, plain step median "
          f"{statistics.median(plain) * 1e3:.1f} ms")
    print("| method | median / plain median | paired median | ms over plain |")
    print("|---|---|---|---|")
    for name in METHODS[1:]:
        paired = statistics.median(a / b for a, b in zip(seconds[name], plain))
        extra = (statistics.median(seconds[name]) - statistics.median(plain)) * 1e3
        print(f"| {name} | {statistics.median(seconds[name]) / statistics.median(plain):.3f}x "
              f"| {paired:.3f}x | {extra:+.1f} |")
    print(f"w.step() alone: median {statistics.median(step_alone) * 1e3:.2f} ms, min {min(step_alone) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
