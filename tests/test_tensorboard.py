"""TensorBoard sink (SPEC 8): exact tags, steps and values, read back from the event files."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter

import actstats
from actstats.tensorboard import Histogram, TensorBoardSink, tag_name

# every test here runs on both reduction paths (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("reduction_path")

TAG_RE = re.compile(r"^[A-Za-z0-9_./-]+$")


class Mixed(nn.Module):
    """A shared nn.ReLU called twice, then F.relu, torch.sigmoid, F.relu: records relu, relu#1, relu(), relu()#1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8)
        self.fc4 = nn.Linear(8, 8)
        with torch.no_grad():
            self.fc3.bias.fill_(-100.0)  # relu() is dead: a dead_relu flag on a name with "()"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc2(self.relu(self.fc1(x))))
        x = torch.sigmoid(self.fc4(F.relu(self.fc3(x))))
        return F.relu(x)


RECORDS = ["fc1", "relu", "fc2", "relu#1", "fc3", "relu()", "fc4", "sigmoid()", "relu()#1"]
TAGS = ["fc1", "relu", "fc2", "relu-1", "fc3", "relu-fn", "fc4", "sigmoid-fn", "relu-fn-1"]


@pytest.fixture(scope="module")
def report() -> actstats.Report:
    torch.manual_seed(0)
    rep = actstats.probe(Mixed(), torch.randn(16, 4), batches=1)
    assert [layer.name for layer in rep.layers] == RECORDS
    assert "dead_relu" in {f.kind for f in rep.flags}
    return rep


def load(logdir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(
        str(logdir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}
    )
    acc.Reload()
    return acc


def f32(x: float) -> float:
    """What a scalar summary stores: TensorBoard's simple_value is float32."""
    return float(np.float32(x))


def untag(tag: str) -> str:
    """Invert tag_name, to prove it is injective."""
    out, i = [], 0
    while i < len(tag):
        ch = tag[i]
        if ch != "-":
            out.append(ch)
            i += 1
            continue
        nxt = tag[i + 1]
        if nxt == "-":
            out.append("-")
            i += 2
        elif nxt == "f":
            assert tag[i + 2] == "n"
            out.append("()")
            i += 3
        elif nxt.isdigit():
            out.append("#")
            i += 1
        elif nxt == "u":
            out.append(chr(int(tag[i + 2 : i + 6], 16)))
            i += 6
        else:
            assert nxt == "U"
            out.append(chr(int(tag[i + 2 : i + 10], 16)))
            i += 10
    return "".join(out)


# --- tag_name -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("relu", "relu"),
        ("relu#1", "relu-1"),
        ("relu()", "relu-fn"),
        ("relu()#1", "relu-fn-1"),
        ("relu()#2", "relu-fn-2"),
        ("relu_()#1", "relu_-fn-1"),
        ("layer1.0.conv1", "layer1.0.conv1"),
        ("layer1.0.relu()", "layer1.0.relu-fn"),
        ("layers.0.self_attn", "layers.0.self_attn"),
        ("Linear", "Linear"),
        ("a-b", "a--b"),
        ("a/b", "a-u002fb"),
        ("f(x)", "f-u0028x-u0029"),
        ("x#y", "x-u0023y"),
        ("wé", "w-u00e9"),
    ],
    ids=lambda v: v,
)
def test_tag_name(name: str, tag: str) -> None:
    assert tag_name(name) == tag
    assert TAG_RE.match(tag)
    assert untag(tag) == name


def test_tag_name_is_injective() -> None:
    names = ["relu()", "relu()#1", "relu#1", "relu", "relu-1", "relu-fn", "relu_", "relu__", "relu_()",
             "relu()#10", "relu#10", "relu()1", "layer1.0.relu()#2", "layer1.0.relu#2", "a-", "a--", "-"]
    rng = random.Random(0)
    alphabet = "ab_.0-#()/ é\U0001f600"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(2000)]
    names = sorted(set(names))
    tags = [tag_name(n) for n in names]
    assert len(set(tags)) == len(names)
    assert all(TAG_RE.match(t) for t in tags)
    assert [untag(t) for t in tags] == names


def test_tag_name_rejects_empty() -> None:
    with pytest.raises(ValueError, match=r"^a record name must not be empty"):
        tag_name("")


# --- scalars --------------------------------------------------------------------------------

def test_scalars_tags_steps_and_values(report: actstats.Report, tmp_path: Path) -> None:
    with TensorBoardSink(tmp_path / "run") as sink:
        for step in (0, 2, 4):
            sink.write_report(report, step)
    acc = load(tmp_path / "run")
    expected = (
        {f"act_std/{t}" for t in TAGS}
        | {f"act_mean/{t}" for t in TAGS}
        | {f"grad_std/{t}" for t in TAGS}  # backward by default: every record has a gradient
        | {"dead_frac/relu", "dead_frac/relu-1", "dead_frac/relu-fn", "dead_frac/relu-fn-1"}
        | {"saturation/sigmoid-fn"}
        | {"propagation/act_rms", "propagation/grad_rms"}
    )
    assert set(acc.Tags()["scalars"]) == expected
    assert acc.Tags()["histograms"] == []
    for layer, tag in zip(report.layers, TAGS):
        events = acc.Scalars(f"act_std/{tag}")
        assert [e.step for e in events] == [0, 2, 4]
        assert [e.value for e in events] == [f32(layer.act.std)] * 3
        assert [e.value for e in acc.Scalars(f"act_mean/{tag}")] == [f32(layer.act.mean)] * 3
        assert [e.value for e in acc.Scalars(f"grad_std/{tag}")] == [f32(layer.grad.std)] * 3
    assert [e.value for e in acc.Scalars("dead_frac/relu-fn")] == [1.0] * 3  # bias -100: all dead
    assert [e.step for e in acc.Scalars("saturation/sigmoid-fn")] == [0, 2, 4]


def test_propagation_curve_steps_are_record_indices(report: actstats.Report, tmp_path: Path) -> None:
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, step=7)
    acc = load(tmp_path)
    act = acc.Scalars("propagation/act_rms")
    assert [e.step for e in act] == [layer.index for layer in report.layers] == list(range(9))
    assert [e.value for e in act] == [f32(layer.act.rms) for layer in report.layers]
    grad = acc.Scalars("propagation/grad_rms")
    assert [e.step for e in grad] == list(range(9))
    assert [e.value for e in grad] == [f32(layer.grad.rms) for layer in report.layers]


def test_propagation_keeps_one_curve_per_call(report: actstats.Report, tmp_path: Path) -> None:
    """As documented: every call writes the whole curve again (TensorBoard shows the latest)."""
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 0)
        sink.write_report(report, 100)
    steps = [e.step for e in load(tmp_path).Scalars("propagation/act_rms")]
    assert steps == list(range(9)) * 2


def test_forward_only_report_has_no_gradient_tags(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rep = actstats.probe(Mixed(), torch.randn(16, 4), batches=1, backward=False)
    assert all(layer.grad is None for layer in rep.layers)
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(rep, 0)
    tags = load(tmp_path).Tags()["scalars"]
    assert not [t for t in tags if t.startswith("grad_std/")]
    assert "propagation/grad_rms" not in tags
    assert "propagation/act_rms" in tags


def test_non_finite_values_are_skipped(report: actstats.Report, tmp_path: Path) -> None:
    fc1 = report.layers[0]
    broken = dataclasses.replace(
        fc1,
        act=dataclasses.replace(fc1.act, std=math.nan, rms=math.inf),
        grad=dataclasses.replace(fc1.grad, std=math.inf),
    )
    rep = dataclasses.replace(report, layers=(broken, *report.layers[1:]))
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(rep, 3)
    acc = load(tmp_path)
    tags = acc.Tags()["scalars"]
    assert "act_std/fc1" not in tags and "grad_std/fc1" not in tags
    assert [e.value for e in acc.Scalars("act_mean/fc1")] == [f32(fc1.act.mean)]
    assert [e.step for e in acc.Scalars("propagation/act_rms")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("propagation/grad_rms")] == list(range(9))


# --- histograms -----------------------------------------------------------------------------

def make_histogram(values: np.ndarray, bins: np.ndarray) -> Histogram:
    counts, edges = np.histogram(values, bins=bins)
    return Histogram(edges, counts, values.min(), values.max(), values.size, values.sum(), values @ values)


def test_histogram_round_trip(report: actstats.Report, tmp_path: Path) -> None:
    # 10 values over bins [-2,-1) [-1,0) [0,1) [1,2]: counts 1, 2, 3, 4 (2.0 falls in the closed last bin)
    acts = np.array([-1.5, -0.5, -0.25, 0.0, 0.5, 0.75, 1.0, 1.5, 1.75, 2.0])
    grads = np.array([-0.25, 0.25, 0.25])  # bins [-1,0) [0,1): counts 1, 2
    act_hist = make_histogram(acts, np.array([-2.0, -1.0, 0.0, 1.0, 2.0]))
    grad_hist = make_histogram(grads, np.array([-1.0, 0.0, 1.0]))
    assert act_hist.counts == (1.0, 2.0, 3.0, 4.0)
    histograms = {name: (act_hist, grad_hist if name.startswith("relu") else None) for name in RECORDS}
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 0, histograms=histograms)
        sink.write_report(report, 5, histograms=histograms)
    acc = load(tmp_path)
    assert set(acc.Tags()["histograms"]) == (
        {f"activations/{t}" for t in TAGS}
        | {"gradients/relu", "gradients/relu-1", "gradients/relu-fn", "gradients/relu-fn-1"}
    )
    events = acc.Histograms("activations/relu-fn-1")
    assert [e.step for e in events] == [0, 5]
    h = events[0].histogram_value
    assert h.bucket_limit == [-1.0, 0.0, 1.0, 2.0]  # right edge of each bin
    assert h.bucket == [1.0, 2.0, 3.0, 4.0]
    # sum = -2.25 + 0 + 0.5 + 0.75 + 1 + 1.5 + 1.75 + 2 = 5.25
    # sum of squares = 2.25 + 0.25 + 0.0625 + 0 + 0.25 + 0.5625 + 1 + 2.25 + 3.0625 + 4 = 13.6875
    assert (h.min, h.max, h.num, h.sum, h.sum_squares) == (-1.5, 2.0, 10, 5.25, 13.6875)
    g = acc.Histograms("gradients/relu")[0].histogram_value
    assert (g.bucket_limit, g.bucket) == ([0.0, 1.0], [1.0, 2.0])
    assert (g.min, g.max, g.num, g.sum, g.sum_squares) == (-0.25, 0.25, 3, 0.25, 0.1875)
    # What TensorBoard's histogram plugin draws (EventFileLoader applies data_compat): one
    # (left, right, count) per bin, the outer edges being the exact min and max.
    (events_file,) = tmp_path.glob("events.out.tfevents.*")
    drawn = [
        tensor_util.make_ndarray(value.tensor).tolist()
        for event in EventFileLoader(str(events_file)).Load()
        for value in event.summary.value
        if value.tag == "activations/fc1"
    ]
    assert drawn[0] == [[-1.5, -1.0, 1.0], [-1.0, 0.0, 2.0], [0.0, 1.0, 3.0], [1.0, 2.0, 4.0]]


def test_empty_or_non_finite_histograms_are_skipped(report: actstats.Report, tmp_path: Path) -> None:
    good = make_histogram(np.array([0.5]), np.array([0.0, 1.0]))
    empty = Histogram([0.0, 1.0], [0], 0.0, 0.0, 0, 0.0, 0.0)
    nan = Histogram([0.0, 1.0], [1], math.nan, math.nan, 1, math.nan, math.nan)
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 0, histograms={"fc1": (good, empty), "fc2": (nan, None)})
    assert load(tmp_path).Tags()["histograms"] == ["activations/fc1"]


def test_histogram_validation() -> None:
    with pytest.raises(ValueError, match=r"^a histogram needs at least one bin and len\(edges\)"):
        Histogram([0.0, 1.0], [1, 2], 0, 1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"^histogram edges must be finite and strictly increasing"):
        Histogram([0.0, 0.0], [1], 0, 0, 1, 0, 0)
    h = Histogram(np.array([0.0, 1.0]), torch.tensor([3]), 0.5, 0.5, 3, 1.5, 0.75)
    assert h.edges == (0.0, 1.0) and h.counts == (3.0,) and h.bucket_limits() == [1.0]


def test_histograms_for_unknown_records_are_refused(report: actstats.Report, tmp_path: Path) -> None:
    good = make_histogram(np.array([0.5]), np.array([0.0, 1.0]))
    with TensorBoardSink(tmp_path) as sink, pytest.raises(ValueError, match=r"^histograms given for \['fc9'\]"):
        sink.write_report(report, 0, histograms={"fc9": (good, None)})
    assert load(tmp_path).Tags()["scalars"] == []  # refused before writing anything


# --- flags and layout -----------------------------------------------------------------------

def flag_texts(acc: ea.EventAccumulator) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("flags")]


def test_flags_as_text(report: actstats.Report, tmp_path: Path) -> None:
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 4)
        sink.write_report(dataclasses.replace(report, flags=()), 6)
    acc = load(tmp_path)
    assert "flags" in acc.PluginTagToContent("text")
    (step, text), (step2, text2) = flag_texts(acc)
    assert (step, step2) == (4, 6)
    assert text.startswith("| kind | layer | message |")
    assert len(text.splitlines()) == 2 + len(report.flags)
    for flag in report.flags:
        assert f"| `{flag.kind}` | `{flag.layer}` |" in text
        assert flag.message.split(";")[0] in text
    assert text2 == "no flags raised"


def test_custom_scalars_layout_written_once(report: actstats.Report, tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with TensorBoardSink(writer=writer) as sink:
        sink.write_report(report, 0)
        sink.write_report(report, 1)
        sink.write_layout(report)
    with TensorBoardSink(writer=writer) as again:  # another sink on the same run adds no second layout
        again.write_report(report, 2)
    writer.close()
    acc = load(tmp_path)
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    configs = acc.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout.FromString(configs[0].tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["actstats"]
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert charts == {
        "act_std": [r"act_std/.*"],
        "act_mean": [r"act_mean/.*"],
        "grad_std": [r"grad_std/.*"],
        "dead_frac": [r"dead_frac/.*"],
        "saturation": [r"saturation/.*"],
        "propagation": ["propagation/act_rms", "propagation/grad_rms"],
    }
    tags = acc.Tags()["scalars"]
    for chart, regexes in charts.items():  # every chart selects something (the plugin uses re.match)
        assert any(re.match(rx, t) for rx in regexes for t in tags), chart


# --- writer ownership -----------------------------------------------------------------------

def test_existing_writer_is_not_closed(report: actstats.Report, tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    sink.write_report(report, 0)
    sink.close()
    sink.close()
    assert sink.writer is writer
    writer.add_scalar("user/loss", 0.5, 1)  # still the same open event file
    writer.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    acc = load(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("user/loss")] == [(1, 0.5)]
    assert "act_std/relu-fn" in acc.Tags()["scalars"]


def test_logdir_sink_creates_directory_and_closes(report: actstats.Report, tmp_path: Path) -> None:
    logdir = tmp_path / "runs" / "exp"
    sink = TensorBoardSink(logdir)
    assert logdir.is_dir() and sink.logdir == str(logdir)
    sink.write_report(report, 0)
    assert "act_std/fc1" in load(logdir).Tags()["scalars"]  # flushed: readable before close
    sink.close()
    assert sink.writer.file_writer is None  # SummaryWriter.close() drops its file writer
    sink.close()
    with pytest.raises(ValueError, match=r"^this TensorBoardSink .* is closed"):
        sink.write_report(report, 1)


@pytest.mark.parametrize("kwargs", [{}, {"logdir": "x", "writer": object()}], ids=["neither", "both"])
def test_exactly_one_of_logdir_and_writer(kwargs: dict) -> None:
    with pytest.raises(TypeError, match=r"^TensorBoardSink takes exactly one of logdir and writer"):
        TensorBoardSink(**kwargs)


def test_import_does_not_load_tensorboard() -> None:
    code = "import sys, actstats, actstats.tensorboard; print('torch.utils.tensorboard' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runs_of_empty_buckets_are_written_as_one(report: actstats.Report, tmp_path: Path) -> None:
    # 8 unit bins over [0, 8]: counts 0 0 2 0 0 0 1 0 -> each empty run becomes one bucket
    # ending where the run ends; the non-empty bins keep their exact ranges.
    hist = Histogram(np.arange(9.0), [0, 0, 2, 0, 0, 0, 1, 0], 2.2, 6.5, 3, 11.0, 43.0)
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 0, histograms={"fc1": (hist, None)})
    h = load(tmp_path).Histograms("activations/fc1")[0].histogram_value
    assert (h.bucket_limit, h.bucket) == ([2.0, 3.0, 6.0, 7.0, 8.0], [0.0, 2.0, 0.0, 1.0, 0.0])
    assert (h.min, h.max, h.num) == (2.2, 6.5, 3)


def test_a_histogram_without_empty_buckets_is_written_as_it_is(report: actstats.Report, tmp_path: Path) -> None:
    hist = Histogram(np.arange(4.0), [1, 2, 1], 0.5, 2.5, 4, 6.0, 10.5)
    with TensorBoardSink(tmp_path) as sink:
        sink.write_report(report, 0, histograms={"fc1": (hist, None)})
    h = load(tmp_path).Histograms("activations/fc1")[0].histogram_value
    assert (h.bucket_limit, h.bucket) == ([1.0, 2.0, 3.0], [1.0, 2.0, 1.0])


def test_a_sink_frames_records_with_the_compiled_checksum_and_the_same_bytes(tmp_path, report, reduction_path):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from actstats import native

    with TensorBoardSink(tmp_path / "run") as sink:
        expected = "_RecordBuffer" if reduction_path == "kernels" else "_AsyncWriter"  # TensorBoard's own
        assert type(sink.writer._get_file_writer().event_writer._async_writer).__name__ == expected
        sink.writer.add_scalar("x", 1.5, 0)
        sink.write_report(report, 3)  # flushes: the records are in the file now
        data = next((tmp_path / "run").glob("events.out.tfevents.*")).read_bytes()
        assert b"act_std/" in data
        sink.writer.add_scalar("y", 2.5, 4)
    assert len(next((tmp_path / "run").glob("events.out.tfevents.*")).read_bytes()) > len(data)  # close flushes
    data = next((tmp_path / "run").glob("events.out.tfevents.*")).read_bytes()
    records, at = 0, 0
    while at < len(data):  # every record's two checksums, recomputed by TensorBoard's own function
        (length,) = struct.unpack("<Q", data[at:at + 8])
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(data[at:at + 8])
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body)
        at += 16 + length
        records += 1
    assert records >= 2 and at == len(data)
    for size in (0, 1, 9, 4099):
        payload = bytes(random.Random(size).randrange(256) for _ in range(size))
        assert native.kernels.masked_crc32c(payload) == masked_crc32c(payload)
