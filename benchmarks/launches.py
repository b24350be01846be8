"""Count the device operations of a training step on the path actstats takes off the CPU.

    python benchmarks/launches.py                    # cnn, mlp, transformer

On a GPU these workloads' steps are bound by the host's time to launch
operations, not by the device (see "On a GPU" in the README): what a sampled
step costs there is, first of all, how many operations it launches. This
script needs no GPU. It runs the operations actstats runs on a CUDA tensor
on the CPU (the compiled kernels off, Welford rows, the merge on the device,
histograms counted by ``histc``, chunks of the device's size) and counts,
with a ``TorchDispatchMode``, the ATen operations that launch work (views,
metadata and allocations left out; host-device copies, which do nothing on the
CPU, are not seen), for:

* ``plain``: a forward + backward of the workload, as in ``overhead.py``;
* ``hooks``: the same step sampled by ``actstats.watch(every=1)``, without
  its ``w.step()``: what actstats adds in the forward and backward pass;
* ``w.step``: the ``w.step()`` that closes it (the merge; its one transfer is
  not seen);
* the same two with histograms.

Each figure is one step after three sampled steps of warm-up (constants and
scratch buffers already on the device, as in a training loop), with the
gradients cleared before it, as before the plain step (no accumulation).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import actstats
from actstats import native, stats
from overhead import WORKLOADS, build, forward_backward


class CountOperations(TorchDispatchMode):
    """Count ATen operations that launch work on a device: views, metadata and allocations
    left out, by name. Host-device copies are not seen (on the CPU they do nothing)."""

    VIEWS = frozenset(("view", "_unsafe_view", "reshape", "slice", "select", "as_strided", "unsqueeze", "squeeze",
                       "expand", "detach", "alias", "split", "split_with_sizes", "unbind", "t", "transpose",
                       "permute", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh"))

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def take_the_device_path(set_value: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make actstats run on the CPU the operations it runs on a CUDA tensor (``set_value``: how
    to set each switch; the tests pass ``monkeypatch.setattr``, which undoes them)."""
    set_value(native, "enabled", False)
    set_value(stats, "welford_on_cpu", True)
    set_value(stats, "host_merge_on_cpu", False)
    set_value(stats, "bins_in_reduction_on_cpu", False)
    set_value(stats, "_bin_counts", stats.count_by_histc)
    set_value(stats, "CHUNK", stats.DEVICE_CHUNK)


def count(workload: str, histograms: bool) -> tuple[int, int, int, Counter[str]]:
    """``(plain, hooks, w.step, what the hooks ran)``: operations of one step of ``workload``."""
    model, x = build(workload)
    with CountOperations() as plain:
        forward_backward(model, x)
    options = {"histograms": True} if histograms else {}
    with actstats.watch(model, every=1, **options) as w:
        for _ in range(3):
            forward_backward(model, x)
            w.step()
        model.zero_grad(set_to_none=True)  # as before the plain step: no gradient to accumulate into
        with CountOperations() as hooks:
            forward_backward(model, x)
        with CountOperations() as step:
            w.step()
    extra = Counter(hooks.names) - Counter(plain.names)
    return len(plain.names), len(hooks.names) - len(plain.names), len(step.names), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--top", type=int, default=0, help="also list the N commonest operations actstats adds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    take_the_device_path()
    print("| workload | plain step | + hooks | + w.step() | sampled / plain | + hooks, histograms "
          "| + w.step(), histograms | sampled with histograms / plain |")
    print("|---|---|---|---|---|---|---|---|")
    listed = []
    for workload in args.workloads.split(","):
        plain, hooks, step, extra = count(workload, False)
        _, hooks_h, step_h, _ = count(workload, True)
        print(f"| {workload} | {plain} | {hooks} | {step} | {(plain + hooks + step) / plain:.2f}x "
              f"| {hooks_h} | {step_h} | {(plain + hooks_h + step_h) / plain:.2f}x |")
        listed.append((workload, extra))
    for workload, extra in listed if args.top else ():
        print(f"{workload}, added in the forward and backward pass:",
              ", ".join(f"{name} {n}" for name, n in extra.most_common(args.top)))


if __name__ == "__main__":
    main()
