"""actstats.probe on tiny models: exact statistics, records, gradients, the model left as found."""

import math

import pytest
import torch
from torch import nn

import actstats
from actstats.errors import ForwardError, InputError, NothingToHookError
from actstats.hooks import Recorder, modules_by_name
from actstats.probe import collect
from tests import models

# every test here runs on both reduction paths (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("reduction_path")


def test_exact_statistics_of_a_doubling_layer(reduction_path):
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(2 * torch.eye(4))  # y = 2x
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 8)  # mean 0, population std 1
    report = actstats.probe(layer, x, batches=1)
    (record,) = report.layers
    assert record.name == "Linear" and record.type == "Linear" and record.index == 0
    assert record.act.std == 2.0  # population std, as documented
    # Sums are exact here; the Welford rows' running mean (float64) rounds once (6.9e-17).
    assert record.act.mean == (pytest.approx(0.0, abs=1e-16) if reduction_path == "welford" else 0.0)
    assert record.act.rms == 2.0
    assert (record.act.min, record.act.max) == (-2.0, 2.0)
    assert record.act.zero_frac == 0.0 and record.act.numel == 32 and record.act.nonfinite == 0
    assert record.input_rms == 1.0
    assert report.input.shape == (8, 4) and report.input.rms == 1.0
    assert report.batch_size == 8 and report.batches == 1


def test_batches_merge_to_the_statistics_of_all_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    seen: dict[str, list[torch.Tensor]] = {"0": [], "1": [], "2": []}
    handles = [model[i].register_forward_hook(
        lambda m, a, out, key=str(i): seen[key].append(out.detach().double())) for i in range(3)]
    try:
        report = actstats.probe(model, torch.randn(6, 5) * 3 + 1, batches=3)
    finally:
        for h in handles:
            h.remove()
    assert [layer.name for layer in report.layers] == ["0", "1", "2"]
    for layer in report.layers:
        union = torch.cat(seen[layer.name])  # the user's own hook saw the same 3 batches
        assert layer.act.numel == union.numel()
        assert layer.act.mean == pytest.approx(float(union.mean()), rel=1e-5, abs=1e-7)
        assert layer.act.std == pytest.approx(float(union.std(correction=0)), rel=1e-5)
        assert layer.act.min == pytest.approx(float(union.min()))
        assert layer.act.max == pytest.approx(float(union.max()))


def test_made_alike_batches_follow_the_example():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2)) * 4 + 10
    seen = []
    model = nn.Linear(3, 3)
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        actstats.probe(model, x, batches=3, seed=5)
    finally:
        handle.remove()
    assert len(seen) == 3 and torch.equal(seen[0], x)
    for made in seen[1:]:
        assert made.shape == x.shape and not torch.equal(made, x)
        assert float(made.mean()) == pytest.approx(float(x.mean()), abs=4 * 4 / math.sqrt(192))
    tokens = torch.randint(3, 9, (4, 50), generator=torch.Generator().manual_seed(0))
    seen.clear()
    embed = nn.Embedding(10, 2)
    handle = embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        actstats.probe(embed, tokens, batches=2)
    finally:
        handle.remove()
    assert seen[1].dtype == torch.long and int(seen[1].min()) >= 3 and int(seen[1].max()) <= 8


def test_shared_module_called_three_times_gives_three_records():
    report = actstats.probe(models.ReuseReLU(), torch.randn(4, 6), batches=1)
    assert [l.name for l in report.layers] == ["fc1", "relu", "fc2", "relu#1", "fc3", "relu#2"]
    assert [l.index for l in report.layers] == list(range(6))


def test_functional_relu_gives_a_record():
    report = actstats.probe(models.FunctionalCifarNet(), torch.randn(2, 3, 32, 32), batches=1)
    assert [(l.name, l.type) for l in report.layers] == [
        ("conv1", "Conv2d"), ("relu()", "F.relu"), ("pool", "MaxPool2d"),
        ("conv2", "Conv2d"), ("relu()#1", "F.relu"), ("pool#1", "MaxPool2d"),
        ("fc1", "Linear"), ("relu()#2", "F.relu"), ("fc2", "Linear"),
    ]
    relu = report.layer("relu()")
    assert relu.act.min == 0.0 and relu.dead_frac is not None


def test_functional_calls_inside_a_leaf_belong_to_the_leaf():
    report = actstats.probe(models.WithLeafActivation(), torch.randn(3, 4), batches=1)
    assert [(l.name, l.type) for l in report.layers] == [("fc", "Linear"), ("act", "FunctionalInLeaf")]


def test_tensor_methods_and_nested_functional_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc(x).relu_())

    model = nn.Sequential(Block(), Block())
    names = [(l.name, l.type) for l in actstats.probe(model, torch.randn(2, 4), batches=1).layers]
    assert names == [("0.fc", "Linear"), ("0.relu_()", "Tensor.relu_"), ("0.sigmoid()", "torch.sigmoid"),
                     ("1.fc", "Linear"), ("1.relu_()", "Tensor.relu_"), ("1.sigmoid()", "torch.sigmoid")]


def test_module_registered_twice_is_named_once_and_called_twice():
    report = actstats.probe(models.Shared(), torch.randn(2, 4), batches=1)
    assert [l.name for l in report.layers] == ["fc", "fc#1"]


def _stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    return float(t.mean()), float(t.std(correction=0))


def test_inplace_relu_gradients_equal_autograd():
    torch.manual_seed(0)
    block = models.InplaceConvBlock(4)
    x = torch.randn(3, 4, 6, 6)
    cotangent = torch.randn(3, 4, 6, 6)
    with Recorder(block) as recorder:
        block(x).backward(cotangent)
    summaries = collect(recorder)
    block.zero_grad()
    # Reference: the same maths written out of place, gradients by autograd.
    outs = block.reference(x)
    grads = torch.autograd.grad(outs[-1], outs, cotangent)
    assert [s.name for s in summaries] == ["conv1", "bn1", "relu", "conv2", "relu#1"]
    for summary, out, grad in zip(summaries, outs, grads):
        mean, std = _stats(out)
        assert summary.act.mean == pytest.approx(mean, abs=1e-6)
        assert summary.act.std == pytest.approx(std, rel=1e-5)
        g_mean, g_std = _stats(grad)
        assert summary.grad.mean == pytest.approx(g_mean, abs=1e-7), summary.name
        assert summary.grad.std == pytest.approx(g_std, rel=1e-5), summary.name



class _Halves(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.chunk(x, 2, dim=1)  # one autograd node, two outputs


class _SecondHalfAndLastState(nn.Module):
    """Uses only the second output of a two-output node, and only the LSTM's final state."""

    def __init__(self) -> None:
        super().__init__()
        self.halves = _Halves()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.halves(x)
        sequence, (h, c) = self.lstm(x.unsqueeze(1))
        return 3 * second.sum() + h.sum()


def test_an_output_no_gradient_reaches_has_no_gradient_statistics():
    # A record's gradient is that of its first output; when the loss does not depend on it
    # (other outputs of the same autograd node do), autograd hands the hook no gradient.
    torch.manual_seed(0)
    model = _SecondHalfAndLastState()
    x = torch.randn(5, 4, requires_grad=True)
    with Recorder(model) as recorder:
        model(x).backward()
    by_name = {s.name: s for s in collect(recorder)}
    assert set(by_name) == {"halves", "lstm"}
    assert by_name["halves"].grad is None and by_name["lstm"].grad is None
    assert by_name["halves"].act.numel == 10 and by_name["lstm"].act.numel == 15


def test_a_gradient_captured_by_autograd_grad_at_an_output_is_recorded():
    # torch.autograd.grad(loss, [activation]) (saliency, Grad-CAM) stops at that output:
    # the node that produced it never runs, yet its record still gets the gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x = torch.randn(6, 3)
    with Recorder(model) as recorder:
        hidden = model[0](x)
        out = model[1](hidden)
        (captured,) = torch.autograd.grad((out * 2).sum(), [hidden])
    by_name = {s.name: s for s in collect(recorder)}
    assert by_name["0"].grad is not None
    assert by_name["0"].grad.mean == pytest.approx(captured.double().mean().item(), rel=1e-6)
    assert by_name["0"].grad.rms == pytest.approx(captured.double().square().mean().sqrt().item(), rel=1e-6)


class _ReturnsItsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table  # a leaf tensor: a gradient hook on it would outlive the step


def test_a_parameter_returned_as_output_carries_no_hook_of_ours_after_the_step():
    model = nn.Sequential(_ReturnsItsParameter())
    table = model[0].table
    recorder = Recorder(model)
    with recorder:
        for _ in range(3):
            recorder.reset()
            model(torch.zeros(1)).square().sum().backward()
            assert len(table._backward_hooks) == 1  # this step's, the earlier ones removed
        (summary,) = collect(recorder)
        assert summary.grad.mean == pytest.approx(2 * table.detach().double().mean().item(), rel=1e-6)
    assert not table._backward_hooks


def test_gradient_hooks_share_an_output_with_the_users_in_registration_order():
    # Our hook goes into the output's hook dict as Tensor.register_hook puts it there: a hook
    # the user adds afterwards runs after ours (record "0" sees the gradient before it is
    # scaled), one added before runs first ("1", the same tensor through nn.Identity, sees it
    # scaled); the user's handle still removes the user's hook, and no one else's.
    model = nn.Sequential(nn.Linear(3, 4), nn.Identity())
    x = torch.randn(5, 3)
    handles = []

    def scale_by_ten(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        handles.append(out.register_hook(lambda g: g * 10))

    with Recorder(model) as recorder:
        user = model[0].register_forward_hook(scale_by_ten)  # runs after the recorder's own
        try:
            hidden = model(x)
            (hidden * 3).sum().backward()
            hooks_on_output = list(hidden._backward_hooks.values())
            handles[0].remove()
            left = list(hidden._backward_hooks.values())
        finally:
            user.remove()
    assert len(hooks_on_output) == 3 and len(left) == 2 and hooks_on_output[1] not in left
    by_name = {s.name: s for s in collect(recorder)}
    assert by_name["0"].grad.mean == 3.0 and by_name["0"].grad.std == 0.0
    assert by_name["1"].grad.mean == 30.0 and by_name["1"].grad.std == 0.0
    assert by_name["0"].grad.rms == 3.0 and by_name["1"].grad.rms == 30.0


def test_a_gradient_of_one_output_of_a_two_output_node():
    class FirstHalfUsed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.halves = _Halves()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first, second = self.halves(x)
            return (first * torch.arange(10.0).reshape(5, 2)).sum()

    model = FirstHalfUsed()
    with Recorder(model) as recorder:
        model(torch.randn(5, 4, requires_grad=True)).backward()
    (summary,) = collect(recorder)
    reference = torch.arange(10.0, dtype=torch.float64)  # d loss / d first
    # float32 rows on the PyTorch path: the figures are exact to float32's precision
    assert summary.grad.mean == pytest.approx(reference.mean().item(), rel=1e-7)
    assert summary.grad.std == pytest.approx(reference.std(correction=0).item(), rel=1e-7)
    assert summary.grad.rms == pytest.approx(reference.square().mean().sqrt().item(), rel=1e-7)

def test_probe_backpropagates_a_standard_normal_cotangent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(16, 4)
    report = actstats.probe(model, x, batches=1, seed=7)
    # One batch given as is: the generator seeded with `seed` draws the cotangent first.
    cotangent = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))
    mean, std = _stats(cotangent)
    assert report.layers[-1].grad.mean == pytest.approx(mean, abs=1e-7)
    assert report.layers[-1].grad.std == pytest.approx(std, rel=1e-6)
    # And the first layer's gradient is W2^T (tanh' * cotangent), by hand:
    with torch.no_grad():
        h = model[0](x)
        expected = (cotangent @ model[2].weight) * (1 - torch.tanh(h) ** 2)
        expected = expected @ torch.eye(8)
    mean, std = _stats(expected)
    assert report.layers[0].grad.std == pytest.approx(std, rel=1e-5)


def test_dead_frac_is_one_when_bias_kills_every_unit():
    report = actstats.probe(models.DeadReLU(), torch.randn(32, 8), batches=2)
    assert report.layer("act").dead_frac == 1.0
    assert report.layer("act").act.zero_frac == 1.0
    assert report.layer("fc").dead_frac is None


def test_dead_frac_is_one_half_when_half_the_units_are_forced_negative():
    report = actstats.probe(models.HalfDead(), torch.randn(32, 8), batches=2)
    assert report.layer("act").dead_frac == 0.5
    assert type(report.layer("act").dead_frac) is float  # a Python float, not a numpy scalar


def test_dead_units_are_channels_after_a_convolution():
    conv = nn.Conv2d(2, 4, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([0.0, -100.0, 0.0, -100.0]))
    report = actstats.probe(nn.Sequential(conv, nn.ReLU()), torch.randn(4, 2, 3, 3), batches=1)
    assert report.layer("1").dead_frac == 0.5  # 2 of 4 channels, not of the 3 columns


def test_saturation_of_a_sigmoid():
    x = torch.tensor([[-10.0, 0.0, 10.0, 0.5]])  # sigmoid: 4.5e-5, 0.5, 0.99995, 0.62
    report = actstats.probe(nn.Sequential(nn.Identity(), nn.Sigmoid()), x, batches=1, backward=False)
    assert report.layer("1").saturation == 0.5
    assert report.layer("0").saturation is None


def test_tuple_dict_namedtuple_and_dataclass_outputs():
    x = torch.randn(4, 4)
    for model, heads in [(models.DictOutput(), ["head_a", "head_b"]),
                         (models.NamedTupleOutput(), ["head", "body"]),
                         (models.DataclassOutput(), ["fc"])]:
        report = actstats.probe(model, x, batches=1)
        for name in heads:
            assert report.layer(name).grad is not None, (type(model).__name__, name)
        assert report.notices == ()


def test_output_with_nothing_differentiable_is_probed_forward_only():
    report = actstats.probe(models.ArgmaxOutput(), torch.randn(4, 4), batches=1)
    assert report.layer("fc").grad is None
    assert report.notices == ("the model's output has nothing differentiable; probed forward only "
                              "(no gradient statistics)",)


def test_dict_batches_are_keyword_arguments():
    batch = {"tokens": torch.randint(0, 10, (2, 5)), "scale": torch.full((2, 5, 1), 2.0)}
    report = actstats.probe(models.KeywordModel(), batch, batches=2)
    assert [l.name for l in report.layers] == ["embed", "fc"]
    assert report.input.shape == (2, 5)


def test_iterable_and_callable_inputs():
    model = nn.Linear(3, 2)
    loader = [(torch.randn(4, 3), torch.zeros(4)) for _ in range(5)]  # (x, y) pairs, y is dropped
    assert actstats.probe(model, loader, batches=None).batches == 5
    assert actstats.probe(model, loader, batches=2).batches == 2
    sizes = []
    report = actstats.probe(model, lambda n: sizes.append(n) or torch.randn(n, 3), batches=3, batch_size=6)
    assert sizes == [6, 6, 6] and report.batch_size == 6


def test_infinite_outputs_are_the_extremes():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
        layer.bias.zero_()
    x = torch.tensor([[math.inf, 1.0], [1.0, 2.0]])
    with Recorder(layer) as recorder:
        layer(x)
    (summary,) = collect(recorder)
    # outputs: [inf, -inf], [3, -1]; the extremes are what torch.aminmax gives
    assert (summary.act.min, summary.act.max) == (-math.inf, math.inf)
    assert summary.act.nonfinite == 2 and summary.act.numel == 4
    assert math.isnan(summary.act.mean) and math.isnan(summary.act.std)


def test_nonfinite_inputs_are_reported_not_raised():
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    report = actstats.probe(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), x, batches=1)
    assert report.input.nonfinite == 1
    assert report.layers[0].act.nonfinite == 3  # the NaN spreads over one row of 3 outputs
    assert math.isnan(report.layers[0].act.mean)
    text = report.to_json()
    assert ": NaN" not in text and '"mean": null' in text  # strict JSON: no NaN literal
    assert [(f.kind, f.layer) for f in report.flags][:1] == [("nonfinite", "input")]


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def test_model_is_left_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))
    model.eval()
    model[1].train()  # a mixed state must come back as it was
    model[4].weight.requires_grad_(False)
    model[0].weight.grad = torch.full((4, 4), 3.0)
    grad_object = model[0].weight.grad
    calls = []
    user_handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    hooks = _hook_counts(model)
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    actstats.probe(model, x, batches=3)
    assert calls == [1, 1, 1]  # the user's hook kept firing
    assert _hook_counts(model) == hooks
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # incl. BN running stats
    assert model[0].weight.grad is grad_object and torch.equal(grad_object, torch.full((4, 4), 3.0))
    assert model[0].bias.grad is None and model[4].weight.requires_grad is False
    assert torch.equal(torch.get_rng_state(), rng)
    user_handle.remove()
    assert _hook_counts(model) == hooks - 1


def test_model_is_left_as_found_after_a_failing_forward():
    model = models.FunctionalCifarNet()
    hooks = _hook_counts(model)
    with pytest.raises(ForwardError):
        actstats.probe(model, torch.randn(2, 3, 30, 30), batches=1)
    assert _hook_counts(model) == hooks and model.training
    model(torch.randn(1, 3, 32, 32))  # no stale function mode or hook left behind


def test_same_seed_same_report():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    first = actstats.probe(model, torch.ones(8, 4), batches=3, seed=1).to_dict()
    second = actstats.probe(model, torch.ones(8, 4), batches=3, seed=1).to_dict()
    assert first == second
    assert actstats.probe(model, torch.ones(8, 4), batches=3, seed=2).to_dict() != first


def test_forward_failure_names_the_layer_and_shapes():
    with pytest.raises(ForwardError, match=r"^forward failed in layer 'fc1' \(Linear, in_features=400, "
                       r"out_features=120, bias=True\) on an input of shape \(2, 256\): mat1 and mat2"):
        actstats.probe(models.FunctionalCifarNet(), torch.randn(2, 3, 28, 28), batches=1)


def test_failure_in_the_models_own_code_is_named_too():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).view(3, -1, 7)

    with pytest.raises(ForwardError, match=r"^forward of the model \(Broken\) failed on inputs tensor \(2, 4\)"):
        actstats.probe(Broken(), torch.randn(2, 4), batches=1)


def test_nothing_to_hook():
    with pytest.raises(NothingToHookError, match=r"^model Arithmetic has nothing to hook"):
        actstats.probe(models.Arithmetic(), torch.randn(2, 2), batches=1)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [("text", {}, r"^inputs is a str"),
     (torch.randn(2, 4), {"batches": 0}, r"^batches must be at least 1"),
     ([], {}, r"^inputs is an empty iterable"),
     (lambda n: 1 / 0, {}, r"^the inputs function raised ZeroDivisionError"),
     (torch.randn(2, 4), {"device": "tpu:9"}, r"^device 'tpu:9' is not a torch device")],
    ids=["string", "zero-batches", "empty", "raising-callable", "bad-device"],
)
def test_bad_inputs(inputs, kwargs, message):
    with pytest.raises(InputError, match=message):
        actstats.probe(nn.Linear(4, 4), inputs, **kwargs)


def test_eval_mode_and_no_backward():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9))
    report = actstats.probe(model, torch.ones(2, 4), batches=1, train=False, backward=False)
    assert report.layer("1").act.zero_frac == report.layer("0").act.zero_frac  # dropout is off
    assert all(l.grad is None for l in report.layers)


def test_a_compiled_model_is_probed_through_its_original_module():
    model = models.ReuseReLU()
    report = actstats.probe(torch.compile(model), torch.randn(4, 6), batches=1)
    assert [l.name for l in report.layers] == ["fc1", "relu", "fc2", "relu#1", "fc3", "relu#2"]


class _TwoBranches(nn.Module):
    """x feeds two layers; the second layer's input is changed in place before it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.after = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.left(x)
        b = self.right(x)
        a += b  # in place: the next layer's input is no longer the tensor 'left' produced
        return self.after(a)


def test_an_input_seen_before_is_not_reduced_again_unless_it_changed(monkeypatch):
    from actstats import stats

    calls = []
    real = stats.RowStore.reduce
    monkeypatch.setattr(stats.RowStore, "reduce", lambda self, x, **k: calls.append(x.shape) or real(self, x, **k))
    model, x = _TwoBranches(), torch.randn(8, 4)
    with torch.no_grad():
        expected_after_input = model.left(x) + model.right(x)
    with Recorder(model, backward=False) as recorder, torch.no_grad():
        model(x)
    # x once (model input, reused by both branches), three outputs, and 'after''s input again
    # (its version changed with +=): five reductions, not six.
    assert len(calls) == 5
    by_name = {s.name: s for s in collect(recorder)}
    x_rms = float(x.double().square().mean().sqrt())
    assert by_name["left"].input_rms == pytest.approx(x_rms, rel=1e-6)
    assert by_name["right"].input_rms == pytest.approx(x_rms, rel=1e-6)
    after_rms = float(expected_after_input.double().square().mean().sqrt())
    assert by_name["after"].input_rms == pytest.approx(after_rms, rel=1e-6)


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class _Counting(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_leaf_that_raises_leaves_no_function_mode_behind():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), _Boom())
    with pytest.raises(ForwardError):
        actstats.probe(model, torch.randn(2, 3))
    assert torch._C._len_torch_function_stack() == 0
    with Recorder(model):
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 3))
    assert torch._C._len_torch_function_stack() == 0


class _ModeInside(nn.Module):
    """A model that enters a function mode of its own inside its forward."""

    def __init__(self, counting):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.counting = counting

    def forward(self, x):
        with self.counting:
            return torch.sigmoid(self.fc(x))


def test_a_mode_entered_inside_the_forward_sees_everything_and_functional_calls_are_still_recorded():
    counting = _Counting()
    model = _ModeInside(counting)
    report = actstats.probe(model, torch.randn(4, 3), batches=1)
    assert [layer.name for layer in report.layers] == ["fc", "sigmoid()"]
    assert "linear" in counting.calls  # our mode did not step aside over the user's one
    assert torch._C._len_torch_function_stack() == 0


class _CallsABlock(nn.Module):
    """A leaf (no children of its own) whose forward calls a module with children registered elsewhere."""

    def __init__(self, block):
        super().__init__()
        self.__dict__["block"] = block  # not a child

    def forward(self, x):
        return self.block(x) + 1.0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _LeafCaller(nn.Module):
    def __init__(self):
        super().__init__()
        block = _Block()
        self.first, self.caller = nn.Linear(3, 3), _CallsABlock(block)
        self.held = nn.ModuleList([block])  # registered (so hooked) here, called only by the leaf

    def forward(self, x):
        return self.caller(self.first(x))


def test_functional_calls_of_a_module_called_from_inside_a_leaf_are_recorded():
    report = actstats.probe(_LeafCaller(), torch.randn(4, 3), batches=1)
    assert [layer.name for layer in report.layers] == ["first", "held.0.fc", "held.0.tanh()", "caller"]
    assert torch._C._len_torch_function_stack() == 0


def test_a_forward_interrupted_inside_a_leaf_does_not_lose_the_next_steps_functional_calls():
    class Interrupt(nn.Module):
        armed = True

        def forward(self, x):
            if Interrupt.armed:
                Interrupt.armed = False
                raise KeyboardInterrupt  # not an Exception: the root's always-call hook does not run
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.stop = nn.Linear(3, 3), Interrupt()

        def forward(self, x):
            return torch.relu(self.stop(self.fc(x)))

    model = Net()
    rec = Recorder(model).attach()
    try:
        with pytest.raises(KeyboardInterrupt):
            model(torch.randn(2, 3))
        while torch._C._len_torch_function_stack():  # what the interrupted forward left (nothing, here)
            torch._C._pop_torch_function_stack()
        rec.reset()
        model(torch.randn(2, 3))
        assert "relu()" in rec.records
    finally:
        rec.detach()


def test_an_empty_batch_keeps_the_step_vector_layout():
    """A record that saw no value still has its bins and its dead-unit mask, so that the step's
    vector has the same layout on every process (all_reduce needs that), and nothing fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    lengths = []
    for batch in (0, 3):
        with Recorder(model, histogram_bins=8) as recorder:
            model(torch.randn(batch, 4)).sum().backward()
        vector, decode = recorder.gather()
        lengths.append(vector.numel())
        summaries = decode(vector.numpy())
        assert [s.act_hist is None for s in summaries] == [batch == 0] * 4  # no values: no histogram
        assert (summaries[1].dead_frac is None) == (batch == 0)  # the ReLU: no unit known dead
    assert lengths[0] == lengths[1]


def test_modules_by_name_walks_as_named_modules_does():
    # shared modules (named once, first path), a None child, nesting, a transformer's deep tree
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared, models.Shared(), nn.ModuleDict({"a": shared}))
    model.add_module("gone", None)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    for root in (model, encoder, nn.Linear(2, 2)):
        walked = modules_by_name(root)
        assert list(walked.items()) == list(root.named_modules())
