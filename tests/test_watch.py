"""actstats.watch in training loops: sampled steps, TensorBoard, cleanup, accumulation, autocast, DDP."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import actstats
from actstats import stats
from actstats.errors import FlagRaisedError, InputError
from actstats.hooks import Recorder
from actstats.probe import collect
from actstats.tensorboard import tag_name

# every test here runs on both reduction paths (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("reduction_path")


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def train_step(model, x, opt=None):
    loss = model(x).pow(2).mean()
    if opt is not None:
        opt.zero_grad()
    loss.backward()
    if opt is not None:
        opt.step()


def events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_sampled_steps_only_and_the_tensorboard_tags(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with actstats.watch(model, logdir=str(tmp_path), every=2, histograms=True) as w:
        for step in range(6):
            train_step(model, torch.randn(8, 6), opt)
            w.step()
    acc = events(tmp_path)
    names = [layer.name for layer in w.report().layers]
    assert names == ["0", "1", "2"]
    tags = acc.Tags()
    for name in names:
        assert [e.step for e in acc.Scalars(f"act_std/{tag_name(name)}")] == [0, 2, 4]
        assert [e.step for e in acc.Scalars(f"grad_std/{tag_name(name)}")] == [0, 2, 4]
        assert [e.step for e in acc.Histograms(f"activations/{tag_name(name)}")] == [0, 2, 4]
        assert [e.step for e in acc.Histograms(f"gradients/{tag_name(name)}")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("dead_frac/1")] == [0, 2, 4]
    assert sorted(t for t in tags["histograms"]) == sorted(
        [f"activations/{n}" for n in names] + [f"gradients/{n}" for n in names])
    # The propagation curve: one point per record, step = index, written at each sampled step.
    points = acc.Scalars("propagation/act_rms")
    assert [p.step for p in points] == [0, 1, 2] * 3
    last = w.report()
    assert [p.value for p in points[-3:]] == pytest.approx([l.act.rms for l in last.layers], rel=1e-6)
    assert "flags" in tags["tensors"]


def _float32_counts(values, low, high, bins):
    """Counts as actstats defines them: float32 positions ``(x - low) * (bins / (high - low))``,
    floored, the outside values in the end bins."""
    x = values.detach().reshape(-1).numpy().astype(np.float32)
    lo, hi = np.float32(low), np.float32(high)
    position = np.clip(np.floor((x - lo) * (np.float32(bins) / (hi - lo))), 0, bins - 1)
    return np.bincount(position.astype(np.int64), minlength=bins).tolist()


class _WithConstantOutput(nn.Module):
    """A body, and a second output that is constant (zero weights and bias): its range is (0, 0)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
        self.const = nn.Linear(3, 3)
        nn.init.zeros_(self.const.weight), nn.init.zeros_(self.const.bias)

    def forward(self, x):
        y = self.body(x)
        return y, self.const(y)


@pytest.mark.parametrize("in_reduction", [True, False], ids=["binned-in-the-reduction", "binned-apart"])
def test_histograms_bin_each_step_over_the_previous_steps_range_unless_it_is_unusable(monkeypatch, in_reduction):
    # binned apart: as a CUDA tensor is, into counts of its own after the reduction
    monkeypatch.setattr(stats, "bins_in_reduction_on_cpu", in_reduction)
    torch.manual_seed(0)
    model = _WithConstantOutput()
    seen = {}  # record name -> [output, gradient] of the latest step, taken by our own hooks

    def keep(name):
        def hook(module, args, out):
            seen[name] = [out.detach().clone(), None]
            out.register_hook(lambda g: seen[name].__setitem__(1, g.clone()))
        return hook

    names = ("body.0", "body.1", "body.2", "const")
    for name in names:
        model.get_submodule(name).register_forward_hook(keep(name))
    bins = 64
    with actstats.watch(model, every=1, histograms=True) as w:
        previous = None
        for step in range(3):
            y, c = model(torch.randn(16, 6) * (step + 1))
            (y.pow(2).sum() + c.sum()).backward()  # the constant output's gradient is all ones
            w.step()
            report = w.report()
            assert sorted(report.histograms) == sorted(names)
            for name in names:
                act_hist, grad_hist = report.histograms[name]
                for hist, values, which in ((act_hist, seen[name][0], 0), (grad_hist, seen[name][1], 1)):
                    low, high = hist.edges[0], hist.edges[-1]
                    if name == "const":  # never usable: the values' own constant, widened by 0.5
                        assert (low, high) == ((-0.5, 0.5) if which == 0 else (0.5, 1.5))
                    elif previous is None:  # the first step: the record's own min and max
                        assert (low, high) == (float(values.min()), float(values.max()))
                    else:  # later steps: the previous step's min and max
                        before = previous.layer(name).act if which == 0 else previous.histograms[name][1]
                        assert (low, high) == (before.min, before.max)
                    assert list(hist.counts) == _float32_counts(values, low, high, bins)
                    assert hist.num == values.numel() and hist.min == float(values.min())
            previous = report


def test_an_unsampled_step_runs_no_statistics_and_installs_no_hook(monkeypatch):
    model = small_model()
    base = hook_count(model)
    calls = []
    for entry in ("reduce", "reduce_units", "moments"):  # every way into the statistics
        real = getattr(stats.RowStore, entry)
        monkeypatch.setattr(stats.RowStore, entry, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    with actstats.watch(model, every=3) as w:
        train_step(model, torch.randn(4, 6))
        # step 0 is sampled: the model input (also the first layer's), 3 outputs, 3 gradients,
        # and the weights of the two linear layers (read in their forward pre-hooks)
        assert hook_count(model) > base and len(calls) == 9
        w.step()
        assert len(calls) == 9  # closing the step reads nothing again
        calls.clear()
        for _ in range(2):  # steps 1 and 2: not sampled
            assert hook_count(model) == base
            train_step(model, torch.randn(4, 6))
            w.step()
        assert len(calls) == 0
        train_step(model, torch.randn(4, 6))  # step 3 is sampled again
        assert len(calls) == 9
    assert hook_count(model) == base


def test_a_sampled_step_moves_statistics_to_the_host_once(monkeypatch):
    model = small_model()
    transfers = []
    real_cpu = torch.Tensor.cpu
    with actstats.watch(model, every=1) as w:
        train_step(model, torch.randn(4, 6))
        train_step(model, torch.randn(4, 6))
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(self.shape) or real_cpu(self, *a, **k))
        monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() during a step"))
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() during a step"))
        w.step()
        monkeypatch.undo()
    assert len(transfers) == 1  # statistics, histograms, input and weight figures in one vector


def test_no_hook_keeps_an_activation_alive():
    import weakref

    model = small_model()
    refs = []
    handle = model[0].register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    with actstats.watch(model, every=1) as w:
        train_step(model, torch.randn(4, 6))
        w.step()
        import gc
        gc.collect()
        assert refs and all(r() is None for r in refs)
    handle.remove()


def test_gradient_accumulation_merges_every_micro_batch_and_no_grad_passes_are_left_out():
    model = small_model()
    seen = []
    handle = model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    xs = [torch.randn(4, 6) for _ in range(3)]
    with actstats.watch(model, every=1) as w:
        for x in xs:  # three micro-batches in one optimizer step
            train_step(model, x)
        with torch.no_grad():  # an evaluation pass inside the sampled step
            model(torch.full((4, 6), 100.0))
        w.step()
    handle.remove()
    union = torch.cat(seen[:3]).double()
    layer = w.report().layer("0")
    assert w.report().batches == 3
    assert layer.act.numel == union.numel()
    assert layer.act.mean == pytest.approx(float(union.mean()), abs=1e-7)
    assert layer.act.std == pytest.approx(float(union.std(correction=0)), rel=1e-6)
    assert layer.act.max == pytest.approx(float(union.max()))  # not the 100-valued eval pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_figures_are_the_weights_the_step_ran_with_not_the_updated_ones(dtype):
    model = small_model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ran_with = []  # the first layer's weight at each forward, taken by our own pre-hook
    model[0].register_forward_pre_hook(lambda m, a: ran_with.append(m.weight.detach().clone()))
    with actstats.watch(model, every=1) as w:
        for step in range(2):
            for _ in range(2):  # two micro-batches; the weights change only after both
                model(torch.randn(8, 6, dtype=dtype)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            w.step()
            weight = ran_with[2 * step].double()
            assert torch.equal(ran_with[2 * step], ran_with[2 * step + 1])
            before = float(weight.std(correction=0))
            info = w.report().layer("0").weight
            assert info.std == pytest.approx(before, rel=1e-6)
            # predicted_gain = sqrt(fan_in) * rms of the same weights (rms is what a stale shift spoils)
            assert info.predicted_gain == pytest.approx(math.sqrt(6) * float(weight.pow(2).mean().sqrt()), rel=1e-6)
            updated = float(model[0].weight.detach().double().std(correction=0))
            assert abs(updated / before - 1) > 1e-3  # the update moved it: the test tells them apart


def test_the_symmetric_flag_judges_the_weights_the_step_ran_with():
    # The first layer's units are identical (constant weights, zero biases); the random layer after
    # it sends each of them a different gradient, so one update makes them differ.
    model = small_model()
    nn.init.constant_(model[0].weight, 0.1), nn.init.zeros_(model[0].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with actstats.watch(model, every=1) as w:
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        w.step()
        rows = model[0].weight.detach()
        assert not torch.equal(rows, rows[:1].expand_as(rows))  # the update made the units differ
        symmetric = [f for f in w.report().flags if f.kind == "symmetric"]
        assert [f.layer for f in symmetric] == ["0"]
        assert "(every weight 0.1)" in symmetric[0].message and symmetric[0].value == 0.0  # the std it ran with
        model(torch.randn(8, 6)).pow(2).mean().backward()  # the next step runs with units that differ
        opt.step()
        w.step()
        assert [f for f in w.report().flags if f.kind == "symmetric"] == []


def test_hooks_are_removed_after_an_exception_and_training_is_unchanged():
    watched, plain = small_model(), small_model()
    user_calls = []
    watched[0].register_forward_hook(lambda *a: user_calls.append(1))
    base = hook_count(watched)
    opt_w = torch.optim.SGD(watched.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.manual_seed(1)
    xs = [torch.randn(5, 6) for _ in range(4)]
    with pytest.raises(RuntimeError, match="boom"):
        with actstats.watch(watched, every=1):
            for x in xs:
                train_step(watched, x, opt_w)
                train_step(plain, x, opt_p)
            raise RuntimeError("boom")
    assert hook_count(watched) == base and len(user_calls) == 4
    for a, b in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)  # watching changed nothing
    assert watched.training and all(p.requires_grad for p in watched.parameters())


def test_raise_on_nonfinite_names_the_first_layer():
    model = small_model()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with actstats.watch(model, every=1, raise_on=("nonfinite",)) as w:
        train_step(model, torch.randn(4, 6))
        with pytest.raises(FlagRaisedError, match=r"^step 0: 2: 4 of 12 outputs are NaN or Inf"):
            w.step()
    assert w.report().flags[0].layer == "2"


def test_bf16_autocast_statistics_are_float32_figures_of_the_bf16_outputs():
    model = small_model()
    seen = []
    handle = model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with actstats.watch(model, every=1) as w:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(64, 6))
        out.float().pow(2).mean().backward()
        w.step()
    handle.remove()
    assert seen[0].dtype == torch.bfloat16
    reference = seen[0].double()
    layer = w.report().layer("0")
    assert layer.act.std == pytest.approx(float(reference.std(correction=0)), rel=1e-6)
    assert layer.grad is not None and math.isfinite(layer.grad.std)


def test_existing_writer_is_used_and_left_open(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    model = small_model()
    with actstats.watch(model, writer=writer, every=1) as w:
        train_step(model, torch.randn(4, 6))
        w.step()
    writer.add_scalar("still/open", 1.0, 0)  # would raise on a closed writer's file
    writer.close()
    assert "act_std/0" in events(tmp_path).Tags()["scalars"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"every": 0}, r"^every must be a positive integer"),
     ({"raise_on": ("nan",)}, r"^raise_on has unknown flag kind\(s\) 'nan'"),
     ({"logdir": "a", "writer": object()}, r"^give logdir or writer, not both")],
    ids=["every", "raise_on", "logdir-and-writer"],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        actstats.watch(small_model(), **kwargs)


def test_compiled_models_are_refused_with_a_clear_error():
    compiled = torch.compile(small_model())
    with pytest.raises(InputError, match=r"^actstats.watch cannot observe a torch.compile'd model"):
        actstats.watch(compiled)


# --- distributed -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, logdir, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(small_model())
        seen = []
        model.module[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1) + rank
        with actstats.watch(model, logdir=os.path.join(logdir, f"rank{rank}"), every=1, histograms=True) as w:
            model(x).pow(2).mean().backward()
            w.step()
            model(x).pow(2).mean().backward()
            w.step()
        report = w.report()
        results[rank] = {
            "names": [l.name for l in report.layers],
            "act": (report.layer("0").act.mean, report.layer("0").act.std, report.layer("0").act.numel,
                    report.layer("0").act.min, report.layer("0").act.max),
            "dead": report.layer("1").dead_frac,
            "local": seen[-1],
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_statistics_are_merged_exactly_across_two_processes(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), results), nprocs=2,
                       start_method="spawn", join=True)
    r0, r1 = results[0], results[1]
    assert r0["names"] == ["0", "1", "2"]  # the inner module's names, no "module." prefix
    union = torch.cat([r0["local"], r1["local"]]).double()  # each rank saw different data
    for r in (r0, r1):  # every rank holds the merged figures
        mean, std, numel, low, high = r["act"]
        assert numel == union.numel()
        assert mean == pytest.approx(float(union.mean()), abs=1e-6)
        assert std == pytest.approx(float(union.std(correction=0)), rel=1e-6)
        assert (low, high) == pytest.approx((float(union.min()), float(union.max())))
    assert r0["dead"] == r1["dead"]
    assert os.listdir(tmp_path) == ["rank0"]  # rank 1 writes nothing
    acc = events(tmp_path / "rank0")
    assert [e.step for e in acc.Scalars("act_std/0")] == [0, 1]
    assert [e.step for e in acc.Histograms("activations/0")] == [1]  # ranks bin alike from step 1


def test_flush_makes_a_sampled_step_readable_before_the_watch_closes(tmp_path):
    model = small_model()
    with actstats.watch(model, logdir=str(tmp_path), every=1) as w:
        train_step(model, torch.randn(4, 6))
        w.step()
        w.flush()
        acc = events(tmp_path)  # read while the writer is still open
        assert [e.step for e in acc.Scalars("act_std/0")] == [0]
        assert acc.Scalars("act_std/0")[0].value == pytest.approx(w.report().layer("0").act.std, rel=1e-6)
    actstats.watch(small_model()).flush()  # no logdir: nothing to flush, no error


def test_consecutive_sampled_steps_keep_the_hooks_and_start_afresh(monkeypatch):
    model = small_model()
    base = hook_count(model)
    registered = []
    real = nn.Module.register_forward_hook
    monkeypatch.setattr(nn.Module, "register_forward_hook",
                        lambda self, *a, **k: registered.append(self) or real(self, *a, **k))
    x1, x2 = torch.randn(4, 6), 3 * torch.randn(8, 6)
    with actstats.watch(model, every=1) as w:
        train_step(model, x1)
        w.step()
        first = w.report()
        hooks = hook_count(model)
        train_step(model, x2)
        w.step()
        second = w.report()
        assert hook_count(model) == hooks and len(registered) == len(list(model.modules()))  # registered once
    assert hook_count(model) == base
    # each step's statistics are its own batch only, as a probe of that batch gives
    assert (first.batches, second.batches, second.batch_size) == (1, 1, 8)
    with torch.no_grad():
        expected = model[0](x2)
    assert second.layers[0].act.mean == pytest.approx(float(expected.double().mean()), rel=1e-6)
    assert second.layers[0].act.numel == expected.numel()


def test_a_module_added_between_sampled_steps_is_hooked():
    model = small_model()
    with actstats.watch(model, every=1) as w:
        train_step(model, torch.randn(4, 6))
        w.step()
        model.append(nn.Tanh())
        train_step(model, torch.randn(4, 6))
        w.step()
        assert [layer.name for layer in w.report().layers] == ["0", "1", "2", "3"]


def test_a_module_replaced_under_its_name_between_sampled_steps_is_hooked():
    model = small_model()
    with actstats.watch(model, every=1) as w:
        train_step(model, torch.randn(4, 6))
        w.step()
        model[1] = nn.Sigmoid()  # same name, another module
        train_step(model, torch.randn(4, 6))
        w.step()
        assert [layer.type for layer in w.report().layers] == ["Linear", "Sigmoid", "Linear"]
        assert w.report().layers[1].saturation is not None


def test_a_recorder_attached_again_after_detach_records_again():
    model = small_model()
    recorder = Recorder(model)
    for _ in range(2):
        recorder.reset()
        with recorder:
            train_step(model, torch.randn(4, 6))
        assert [s.name for s in collect(recorder)] == ["0", "1", "2"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_gradient_from_an_earlier_sampled_step_is_ignored():
    model = small_model()
    with actstats.watch(model, every=1) as w:
        stale = model(torch.randn(4, 6)).square().mean()
        w.step()  # step 0 closes with its forward only
        train_step(model, torch.randn(4, 6))
        stale.backward()  # step 0's graph: its gradients belong to no open step
        w.step()
        assert all(layer.grad is not None for layer in w.report().layers)
        assert w.report().batches == 1
