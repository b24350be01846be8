"""What actstats costs per training step, next to the hooks users write by hand.

    python benchmarks/overhead.py                        # 20 steps after 3 warm-up, all methods
    python benchmarks/overhead.py --steps 3 --warmup 1 --no-rss --workloads mlp --json out.json
    python benchmarks/overhead.py --scale                # probe a 1000-layer MLP and a GPT-2-small
    python benchmarks/overhead.py --device cuda          # the same on a GPU (peak CUDA memory instead of RSS)

Workloads, seeded, on CPU (``--device``) with ``torch.set_num_threads(--threads)`` (2): ``cnn``
a ResNet-18 layout with widths 32-64-128-256 on 64 x 3x32x32, ``mlp`` 24 x
(Linear(1024, 1024) + ReLU) on 256 x 1024, ``transformer`` 4 encoder layers
(d_model 256, 4 heads, ffn 1024) on 16 x 128 x 256. A step is the forward and
backward of ``out.float().pow(2).mean()``, no optimizer. Methods, each on its
own deep copy of the model:

* ``plain``: the step alone.
* ``handwritten``: what users write today: a forward hook on every module
  actstats records (leaves, modules with parameters of their own) taking mean,
  std and zero fraction with ``.item()``, and a tensor hook on the output doing
  the same on its gradient. ``handwritten_tb``: plus ``add_histogram`` of both.
* ``actstats_unsampled``: a step inside ``actstats.watch`` that is not sampled,
  ``w.step()`` included. ``actstats_stats``: a sampled step (``every=1``): hooks,
  then merge, one transfer and diagnosis in ``w.step()``. ``actstats_hist``: with
  ``histograms=True`` and TensorBoard events. ``actstats_nonfinite``: with
  ``raise_on=("nonfinite",)``.
* ``actstats_probe``: one ``actstats.probe(model, x, batches=1)`` call.
* ``fastai_activationstats``: fastai's ``ActivationStats`` hook (forward only: mean,
  std and near-zero fraction with ``.item()``) on the modules its callback picks
  (leaves with parameters), if fastai is installed; ``fastai_activationstats_hist``
  the same with ``with_hist=True`` (a 40-bin ``histc`` per output).

Repetitions are interleaved (every method once per repetition, in a seeded
shuffled order) so that machine drift cancels and no method always pays for the
state its predecessor left; the garbage collector runs between steps, not during
them (as in ``timeit``), and TensorBoard writers are flushed inside the step that
wrote; a cell is the method's median (min) over plain's median (min), same
workload, same run; a second table gives the median of each step's ratio to
the plain step of the same repetition (paired). Peak RSS (``VmHWM``) comes from
a fresh process per method and workload (1 warm-up + 5 steps; ``--no-rss``
skips it), run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows the
memory in use, and with sympy imported first: torch imports it (about 30 MB)
on the first ``autograd.grad`` given output gradients, as the probe's is.

On CUDA (``--device cuda``) a timed step starts and ends with
``torch.cuda.synchronize()``, and memory is the peak of
``torch.cuda.max_memory_allocated`` over each method's own steps (1 warm-up + 3,
in this process, one method after the other), above what was allocated before
them. ``--batch-scale K`` multiplies every batch by K (a GPU step at the
default sizes is mostly kernel launches).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import gc
import importlib
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import actstats

# --- workloads -----------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs, BN, an in-place ReLU used twice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (7x7 stem, max-pool, 4 stages of 2 blocks) with narrower stages."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _mlp(depth: int, width: int) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])


def _encoder(d_model: int, heads: int, ffn: int, layers: int, **kw: Any) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model, heads, ffn, batch_first=True, **kw)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


#: name -> (model factory, input shape); the timed workloads, then the --scale ones.
WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (ResNet18, (64, 3, 32, 32)),
    "mlp": (lambda: _mlp(24, 1024), (256, 1024)),
    "transformer": (lambda: _encoder(256, 4, 1024, 4), (16, 128, 256)),
}
SCALE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp1000": (lambda: _mlp(1000, 64), (32, 64)),
    "gpt2_small": (lambda: _encoder(768, 12, 3072, 12, norm_first=True, activation="gelu"), (2, 128, 768)),
}


def build(workload: str, device: str = "cpu", batch_scale: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """The model (train mode) and its one input batch (batch multiplied by ``batch_scale``), seeded, on ``device``."""
    factory, shape = {**WORKLOADS, **SCALE}[workload]
    torch.manual_seed(0)
    model = factory().train().to(device)
    shape = (shape[0] * batch_scale, *shape[1:])
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a module output (MultiheadAttention returns a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in map(first_tensor, out) if t is not None), None)
    return None


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    first_tensor(model(x)).float().pow(2).mean().backward()


# --- methods: each sets up its own model copy and returns the step to time -----------

Step = Callable[[], Any]


def plain(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return lambda: forward_backward(model, x)


def _handwritten(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, writer: Any = None) -> Step:
    seen: dict[str, tuple[float, float, float]] = {}  # what a user would log or print later
    step = 0

    def summarize(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        seen[key] = (t.mean().item(), t.std().item(), (t == 0).float().mean().item())
        if writer is not None:
            writer.add_histogram(key, t, step)

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            y = first_tensor(out)
            if y is None or not y.is_floating_point():
                return
            summarize(f"act/{name}", y)
            if y.requires_grad:  # a tensor hook stays right when an in-place ReLU modifies y later
                y.register_hook(lambda g: summarize(f"grad/{name}", g))
        return hook

    for name, module in model.named_modules():
        if name and (next(module.children(), None) is None or next(module.parameters(False), None) is not None):
            stack.callback(module.register_forward_hook(forward_hook(name)).remove)

    def run() -> None:
        nonlocal step
        forward_backward(model, x)
        if writer is not None:
            writer.flush()  # the writer thread's serialisation belongs to this step, not the next one
        step += 1
    return run


def handwritten(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _handwritten(model, x, stack)


def handwritten_tb(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    from torch.utils.tensorboard import SummaryWriter

    return _handwritten(model, x, stack, writer=stack.enter_context(SummaryWriter(tmp)))


def _watched(model: nn.Module, x: torch.Tensor, w: actstats.Watch) -> Step:
    def step() -> None:
        forward_backward(model, x)
        w.step()
        w.flush()  # as handwritten_tb: the event writer's work counts in this step
    return step


def actstats_unsampled(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    w = stack.enter_context(actstats.watch(model, every=10**6))  # no timed step is a multiple
    w.step()  # step 0 is sampled; close it before timing
    return _watched(model, x, w)


def actstats_stats(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _watched(model, x, stack.enter_context(actstats.watch(model, every=1)))


def actstats_hist(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _watched(model, x, stack.enter_context(actstats.watch(model, every=1, histograms=True, logdir=tmp)))


def actstats_nonfinite(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _watched(model, x, stack.enter_context(actstats.watch(model, every=1, raise_on=("nonfinite",))))


def actstats_probe(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return lambda: actstats.probe(model, x, batches=1)


def _fastai(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, with_hist: bool) -> Step:
    from fastai.callback.hook import ActivationStats, Hooks, has_params
    from fastai.layers import flatten_model

    modules = [m for m in flatten_model(model) if has_params(m)]  # as HookCallback.before_fit picks them
    hook = ActivationStats(with_hist=with_hist).hook
    stack.callback(Hooks(modules, hook, is_forward=True, detach=True, cpu=True).remove)  # HookCallback's defaults
    return lambda: forward_backward(model, x)


def fastai_activationstats(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _fastai(model, x, stack, with_hist=False)


def fastai_activationstats_hist(model: nn.Module, x: torch.Tensor, stack: contextlib.ExitStack, tmp: str) -> Step:
    return _fastai(model, x, stack, with_hist=True)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, contextlib.ExitStack, str], Step]] = {
    f.__name__: f for f in (plain, handwritten, handwritten_tb, actstats_unsampled, actstats_stats,
                            actstats_hist, actstats_nonfinite, actstats_probe, fastai_activationstats,
                            fastai_activationstats_hist)
}


# --- measuring -------------------------------------------------------------------------


def time_interleaved(workload: str, methods: list[str], steps: int, warmup: int, device: str = "cpu",
                     batch_scale: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each method, repetitions interleaved in a shuffled order.

    The order is shuffled (seeded) every repetition, so that no method always
    follows the same one (a method leaves caches, the allocator and background
    threads in a state the next one pays for). As in ``timeit``, Python's cyclic
    garbage collector is off during a timed step and runs between steps.
    """
    model, x = build(workload, device, batch_scale)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    order = random.Random(0)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="actstats-bench-"))
        runners = {}
        for m in methods:
            twin = copy.deepcopy(model)
            runners[m] = (twin, METHODS[m](twin, x, stack, os.path.join(tmp, m)))
        gc_was_enabled = gc.isenabled()
        try:
            for rep in range(warmup + steps):
                for m in order.sample(methods, len(methods)):
                    twin, step = runners[m]
                    gc.collect()
                    gc.disable()
                    synchronize(device)
                    start = time.perf_counter()
                    step()
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                    gc.enable()
                    twin.zero_grad(set_to_none=True)
                    if rep >= warmup:
                        seconds[m].append(elapsed)
        finally:  # leave the collector as it was found
            (gc.enable if gc_was_enabled else gc.disable)()
    return seconds


def cuda_peaks(workload: str, methods: list[str], device: str, batch_scale: int) -> dict[str, float]:
    """Per method, the peak CUDA memory (MB) of 1 warm-up + 3 steps above what was allocated before them."""
    model, x = build(workload, device, batch_scale)
    peaks = {}
    for m in methods:
        with contextlib.ExitStack() as stack:
            twin = copy.deepcopy(model)
            step = METHODS[m](twin, x, stack, stack.enter_context(tempfile.TemporaryDirectory()))
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(4):
                step()
                twin.zero_grad(set_to_none=True)
            synchronize(device)
            peaks[m] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del twin, step
        gc.collect()
    return peaks


def single(method: str, workload: str, steps: int, warmup: int, device: str = "cpu",
           batch_scale: int = 1) -> dict[str, Any]:
    """Run one method alone (the ``--single`` child): its times, records, peak RSS (and CUDA memory)."""
    importlib.import_module("torch.fx.experimental.symbolic_shapes")  # sympy: see the docstring
    model, x = build(workload, device, batch_scale)
    before = peak_rss_mb()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        synchronize(device)
        cuda_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds, result = [], None
    with contextlib.ExitStack() as stack:
        step = METHODS[method](model, x, stack, stack.enter_context(tempfile.TemporaryDirectory()))
        for rep in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            result = step()
            synchronize(device)
            if rep >= warmup:
                seconds.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"method": method, "workload": workload, "seconds": seconds,
                           "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before_steps": before}
    if cuda:
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    if isinstance(result, actstats.Report):
        out["records"] = len(result.layers)
    if workload in SCALE and method == "plain":
        out["saved_mb"] = saved_for_backward_mb(model, x)
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` on Linux, else ``ru_maxrss``.

    On Linux ``ru_maxrss`` is no use in a child: ``exec`` keeps the high-water mark of
    the image it replaces, so every child would report the parent's RSS at fork time.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def saved_for_backward_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Megabytes autograd keeps for the backward of one forward: what O(activations) means here."""
    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved twice counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params) / 2**20


def in_subprocess(method: str, workload: str, args: argparse.Namespace, steps: int, warmup: int) -> dict[str, Any]:
    """Run ``--single`` in a fresh Python and return what it printed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--single", method, "--workload", workload,
           "--steps", str(steps), "--warmup", str(warmup), "--threads", str(args.threads), "--device", args.device,
           "--batch-scale", str(args.batch_scale)]
    # Large blocks straight from mmap, so that glibc hands freed tensors back at once and peak RSS
    # follows the memory in use rather than what the allocator happened to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- output ----------------------------------------------------------------------------


def machine_line(threads: int, device: str = "cpu") -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = ""
    if torch.device(device).type == "cuda":
        gpu = f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); "
    return (f"machine: {gpu}{cpu}, {os.cpu_count()} logical CPUs; torch.set_num_threads({threads}); "
            f"torch {torch.__version__}, actstats {actstats.__version__}, Python {sys.version.split()[0]}")


def markdown(rows: list[str], columns: list[str], cell: Callable[[str, str], str], *extra: list[str],
             corner: str = "method") -> str:
    """A markdown table: one row per ``rows`` entry, one column per ``columns`` entry, then ``extra`` rows."""
    table = [[corner, *columns]] + [[r, *(cell(r, c) for c in columns)] for r in rows] + list(extra)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns) + 1)]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_list(text: str, valid: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in valid:
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SystemExit(f"unknown {what} {name!r}; expected some of: {', '.join(valid)}{hint}")
    return names


def run_scale(args: argparse.Namespace) -> None:
    """Probe the --scale models; each run, and a plain forward+backward, in a fresh process."""
    results = {w: {m: in_subprocess(m, w, args, 3, 1) for m in ("plain", "actstats_probe")} for w in SCALE}
    columns = {
        "records": lambda p, q: str(q["records"]),
        "plain s": lambda p, q: f"{statistics.median(p['seconds']):.2f}",
        "probe s": lambda p, q: f"{statistics.median(q['seconds']):.2f}",
        "saved for backward MB": lambda p, q: f"{p['saved_mb']:.0f}",
        "plain peak RSS MB": lambda p, q: f"{p['peak_rss_mb']:.0f}",
        "probe peak RSS MB": lambda p, q: f"{q['peak_rss_mb']:.0f}",
        "probe - plain MB": lambda p, q: f"{q['peak_rss_mb'] - p['peak_rss_mb']:+.0f}",
    }
    if torch.device(args.device).type == "cuda":
        columns["probe - plain CUDA MB"] = lambda p, q: f"{q['peak_cuda_mb'] - p['peak_cuda_mb']:+.0f}"
    print("actstats.probe(model, x, batches=1) against a plain forward+backward: median of 3 calls "
          "after one warm-up, each in a fresh process\n")
    print(markdown(list(SCALE), list(columns),
                   lambda w, c: columns[c](results[w]["plain"], results[w]["actstats_probe"]), corner="model"))
    print("\n" + machine_line(args.threads, args.device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.threads, args.device), "scale": results}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--methods", default=None, help="comma-separated (default all): " + ", ".join(METHODS))
    parser.add_argument("--json", metavar="PATH", help="write every raw timing here")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device such as cuda or cuda:0")
    parser.add_argument("--batch-scale", type=int, default=1, help="multiply every batch by this (default 1)")
    parser.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                        help="peak RSS per method, each in its own process (default on)")
    parser.add_argument("--scale", action="store_true", help="probe a 1000-layer MLP and a GPT-2-small instead")
    parser.add_argument("--single", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=[*WORKLOADS, *SCALE], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.batch_scale < 1:
        parser.error(f"need --steps >= 1, --warmup >= 0, --threads >= 1, --batch-scale >= 1; got {args.steps}, "
                     f"{args.warmup}, {args.threads}, {args.batch_scale}")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device name; use cpu, cuda or cuda:N")
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r} is not available here; use cpu" +
                     (" or cuda" if torch.cuda.is_available() else ""))
    torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(single(args.single, args.workload or "mlp", args.steps, args.warmup, args.device,
                                args.batch_scale)))
        return
    if args.scale:
        if args.batch_scale != 1:
            parser.error("--batch-scale applies to the timed workloads, not to --scale")
        run_scale(args)
        return

    workloads = parse_list(args.workloads, list(WORKLOADS), "workload")
    methods = parse_list(args.methods or ",".join(METHODS), list(METHODS), "method")
    notes = []
    fastai = [m for m in methods if m.startswith("fastai_")]
    if fastai and importlib.util.find_spec("fastai") is None:
        methods = [m for m in methods if m not in fastai]
        notes.append(f"fastai is not installed: {', '.join(fastai)} skipped")
    if "plain" not in methods:
        methods.insert(0, "plain")  # every ratio is to plain
    times = {w: time_interleaved(w, methods, args.steps, args.warmup, args.device, args.batch_scale)
             for w in workloads}
    summary = {w: {m: {"seconds": s, "median": statistics.median(s), "min": min(s)} for m, s in t.items()}
               for w, t in times.items()}
    for per in summary.values():
        for r in per.values():
            r["ratio"] = r["median"] / per["plain"]["median"]
            r["min_ratio"] = r["min"] / per["plain"]["min"]
            # each step over the plain step of the same repetition (run within the same second)
            r["paired_ratio"] = statistics.median(a / b for a, b in zip(r["seconds"], per["plain"]["seconds"]))

    scaled = f", batches x{args.batch_scale}" if args.batch_scale > 1 else ""
    print(f"step time / plain on {args.device}{scaled}, median (min) of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up\n")
    plain_ms = ["plain median ms", *(f"{summary[w]['plain']['median'] * 1e3:.1f}" for w in workloads)]
    ratio = "{0[ratio]:.2f}x ({0[min_ratio]:.2f}x)".format
    print(markdown(methods, workloads, lambda m, w: ratio(summary[w][m]), plain_ms))
    print("\npaired: the median of each step's ratio to the plain step of its own repetition (steadier on a "
          "busy machine: a slow second slows both)\n")
    print(markdown(methods, workloads, lambda m, w: f"{summary[w][m]['paired_ratio']:.2f}x"))
    rss: dict[str, dict[str, Any]] = {}
    cuda_mb: dict[str, dict[str, float]] = {}
    if args.rss and kind == "cuda":
        cuda_mb = {w: cuda_peaks(w, methods, args.device, args.batch_scale) for w in workloads}
        print("\npeak CUDA memory (MB) of each method's steps above what was allocated before them, "
              "(difference to plain)\n")
        print(markdown(methods, workloads,
                       lambda m, w: f"{cuda_mb[w][m]:.1f} ({cuda_mb[w][m] - cuda_mb[w]['plain']:+.1f})"))
    elif args.rss:
        rss = {w: {m: in_subprocess(m, w, args, 5, 1) for m in methods} for w in workloads}
        peak = {w: {m: r["peak_rss_mb"] for m, r in per.items()} for w, per in rss.items()}
        print("\npeak RSS (MB) of each method alone in a fresh process, (difference to plain)\n")
        print(markdown(methods, workloads, lambda m, w: f"{peak[w][m]:.1f} ({peak[w][m] - peak[w]['plain']:+.1f})"))
    print("\n" + machine_line(args.threads, args.device))
    for note in notes:
        print("note: " + note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.threads, args.device), "device": args.device,
                       "batch_scale": args.batch_scale, "steps": args.steps, "warmup": args.warmup,
                       "timings": summary, "rss": rss, "cuda_memory_mb": cuda_mb, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
