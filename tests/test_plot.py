"""The signal-propagation picture: files, figure content, and the report loaders."""

from __future__ import annotations

import copy
import json
import math
import re
import sys

import pytest
import torch
from torch import nn

import actstats
from actstats.errors import ActStatsError
from actstats.plot import (
    GRAD_FLAG_KINDS,
    MISSING_MATPLOTLIB,
    REFERENCE_LABEL,
    load_report,
    load_reports,
    plot_reports,
)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEPTH, WIDTH = 10, 32


def relu_mlp(init: str) -> nn.Sequential:
    """DEPTH x (Linear(WIDTH, WIDTH), ReLU): records 0, 2, ..., 18 are Linear, the odd ones ReLU."""
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        linear = nn.Linear(WIDTH, WIDTH)
        if init == "kaiming":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def _probe(model: nn.Module, x: torch.Tensor, init: str = "default") -> dict:
    report = actstats.probe(model, x, batches=1).to_dict()
    report["init"] = init  # as `actstats probe --init` would record it
    return report


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    torch.manual_seed(0)
    x = torch.randn(16, WIDTH)
    out = {
        "default": _probe(relu_mlp("default"), x, "default"),
        "kaiming": _probe(relu_mlp("kaiming"), x, "kaiming"),
    }
    # One +inf weight in Linear record 4: its output is the first non-finite one
    # (inf, then inf - inf = nan downstream); backward, W4^T g puts inf/nan into
    # the gradient of record 3, the first non-finite gradient on the way back.
    broken = relu_mlp("kaiming")
    with torch.no_grad():
        broken[4].weight[0, 0] = float("inf")
    out["nan"] = _probe(broken, x, "kaiming")
    return out


def _lines(ax, gid: str) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _expected_flagged(report: dict, field: str) -> list[int]:
    """Records with a flag of this panel and a finite, positive value there (SPEC: null = non-finite)."""
    out = []
    for record in report["layers"]:
        kinds = [k for k in record["flags"] if k != "nonfinite"]
        kinds = [k for k in kinds if (k in GRAD_FLAG_KINDS) == (field == "grad")]
        value = (record[field] or {}).get("rms")
        if kinds and value is not None and value > 0:
            out.append(record["index"])
    return out


def test_png_is_written_small_with_two_log_panels(reports, tmp_path):
    out = tmp_path / "spp.png"
    fig = plot_reports([reports["default"], reports["kaiming"]], out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) < 150_000
    assert tuple(fig.get_size_inches() * fig.dpi) == (800, 500)
    assert len(fig.axes) == 2
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert [ax.get_title() for ax in fig.axes] == ["activation rms", "gradient rms"]


def test_one_curve_per_report_and_legend_names_them(reports, tmp_path):
    default, kaiming = reports["default"], reports["kaiming"]
    fig = plot_reports([default, kaiming], tmp_path / "spp.png", labels=["torch", "he"])
    ax_act, ax_grad = fig.axes
    for ax, field in ((ax_act, "act"), (ax_grad, "grad")):
        curves = _lines(ax, "curve")
        assert [c.get_label() for c in curves] == ["torch", "he"]
        assert list(curves[1].get_xdata()) == list(range(2 * DEPTH))
        assert list(curves[1].get_ydata()) == [r[field]["rms"] for r in kaiming["layers"]]
        # Both reports probed one batch of the same model: they share one reference line.
        assert len(ax.get_lines()) == 2 + 1 + (1 if _lines(ax, "flagged") else 0)
    assert [t.get_text() for t in ax_act.get_legend().get_texts()] == ["torch", "he"]
    assert REFERENCE_LABEL in [t.get_text() for t in ax_grad.get_legend().get_texts()]
    # Theory: the input's rms kept along the path; the output gradient's rms kept back to the input.
    (ref_act,) = _lines(ax_act, "reference")
    (ref_grad,) = _lines(ax_grad, "reference")
    assert list(ref_act.get_ydata()) == [default["input"]["rms"]] * 2
    assert list(ref_grad.get_ydata()) == [default["layers"][-1]["grad"]["rms"]] * 2
    assert fig.texts[0].get_text() == "Sequential \N{EM DASH} compared: torch, he"


def test_flagged_records_get_one_marker_each(reports, tmp_path):
    default = reports["default"]
    fig = plot_reports([default], tmp_path / "spp.png")
    ax_act, ax_grad = fig.axes
    (act_marks,) = _lines(ax_act, "flagged")
    (grad_marks,) = _lines(ax_grad, "flagged")
    assert list(act_marks.get_xdata()) == _expected_flagged(default, "act")
    assert list(grad_marks.get_xdata()) == _expected_flagged(default, "grad")
    # torch's default Linear init has std 1/sqrt(3 * 32) = 0.102 against He's
    # sqrt(2 / 32) = 0.25, a factor 2.45 > 2: init_mismatch on every Linear.
    assert set(range(0, 2 * DEPTH, 2)) <= set(act_marks.get_xdata())
    assert grad_marks.get_xdata().size >= 1  # the gradient vanishes too
    assert "flagged" in [t.get_text() for t in ax_grad.get_legend().get_texts()]
    assert fig.texts[0].get_text() == "Sequential"


def test_no_flag_no_marker(reports, tmp_path):
    fig = plot_reports([reports["kaiming"]], tmp_path / "spp.png", title="He init")
    assert all(not _lines(ax, "flagged") for ax in fig.axes)
    assert fig.texts[0].get_text() == "He init"


def test_nonfinite_values_leave_a_gap_and_mark_the_first(reports, tmp_path):
    nan = reports["nan"]
    out = tmp_path / "nan.png"
    fig = plot_reports([nan], out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    ax_act, ax_grad = fig.axes
    act_y = _lines(ax_act, "curve")[0].get_ydata()
    assert not math.isnan(act_y[3]) and math.isnan(act_y[4])
    (first_act,) = _lines(ax_act, "nonfinite")
    (first_grad,) = _lines(ax_grad, "nonfinite")
    assert list(first_act.get_xdata()) == [4, 4]  # the inf weight's Linear
    assert list(first_grad.get_xdata()) == [3, 3]  # the record feeding it, going backward
    # Records after 4 hold NaN/Inf: their flags (dead_relu on garbage) get no circle.
    marks = [x for line in _lines(ax_act, "flagged") for x in line.get_xdata()]
    assert marks == _expected_flagged(nan, "act")
    assert all(x < 4 for x in marks)


def test_zero_rms_sits_on_the_bottom_edge(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    report = actstats.probe(model, torch.randn(8, 4), batches=1).to_dict()  # act rms 0, 0
    fig = plot_reports([report], tmp_path / "zero.png")
    (zeros,) = _lines(fig.axes[0], "zero")
    assert list(zeros.get_xdata()) == [0, 1]


def test_forward_only_report_and_report_objects(tmp_path):
    torch.manual_seed(0)
    report = actstats.probe(relu_mlp("kaiming"), torch.randn(4, WIDTH), batches=1)
    doc = report.to_dict()
    for record in doc["layers"]:
        record["grad"] = None
    fig = plot_reports([report, doc], tmp_path / "spp.png", labels=["both", "forward"])
    assert [c.get_label() for c in _lines(fig.axes[0], "curve")] == ["both", "forward"]
    assert all(math.isnan(y) for y in _lines(fig.axes[1], "curve")[1].get_ydata())


def test_missing_matplotlib_says_how_to_install(reports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = tmp_path / "spp.png"
    with pytest.raises(ActStatsError, match=r"^actstats plot needs matplotlib: pip install 'actstats\[plot\]'$"):
        plot_reports([reports["kaiming"]], out)
    assert MISSING_MATPLOTLIB == "actstats plot needs matplotlib: pip install 'actstats[plot]'"
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reports": []}, r"^nothing to plot: no reports given; pass at least one actstats.report/1 report$"),
        ({"labels": ["a", "b"]}, r"^got 2 labels for 1 report\(s\); pass one label per report$"),
        ({"dpi": 0}, r"^dpi must be a positive integer, got 0$"),
        ({"reports": [{"schema": "actstats.compare/1"}]},
         r"^report 1 \('report'\) is not an actstats report: found schema 'actstats.compare/1', "
         r"expected 'actstats.report/1' \(from actstats probe --format json\)$"),
    ],
    ids=["no-reports", "labels-mismatch", "bad-dpi", "compare-document"],
)
def test_plot_reports_rejects_bad_arguments(reports, tmp_path, kwargs, message):
    kwargs = {"reports": [reports["kaiming"]], **kwargs}
    with pytest.raises(ActStatsError, match=message):
        plot_reports(kwargs.pop("reports"), tmp_path / "spp.png", **kwargs)


def test_unwritable_output_is_one_sentence(reports, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "spp.png"
    with pytest.raises(ActStatsError, match=rf"^cannot write the plot to {re.escape(repr(str(out)))}: "):
        plot_reports([reports["kaiming"]], out)


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_report_round_trips(reports, tmp_path):
    path = _write(tmp_path, "r.json", json.dumps(reports["nan"], allow_nan=False))
    assert load_report(path) == reports["nan"]


def test_load_report_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(ActStatsError, match=(
        rf"^report file {re.escape(repr(str(path)))} does not exist; "
        rf"write one with: actstats probe MODEL_SPEC --json {re.escape(str(path))}$"
    )):
        load_report(path)


def test_load_report_bad_json(tmp_path):
    path = _write(tmp_path, "bad.json", '{"schema": "actstats.report/1",\n  "layers": [}')
    with pytest.raises(ActStatsError, match=(
        rf"^report file {re.escape(repr(str(path)))} is not valid JSON: "
        r"Expecting value at line 2, column 14$"
    )):
        load_report(path)


@pytest.mark.parametrize(
    ("text", "seen"),
    [('{"schema": "other/2", "layers": []}', "schema 'other/2'"),
     ('{"layers": []}', "schema None"),
     ("[1, 2]", "a JSON array")],
    ids=["other-schema", "no-schema", "array"],
)
def test_load_report_wrong_schema(tmp_path, text, seen):
    path = _write(tmp_path, "other.json", text)
    with pytest.raises(ActStatsError, match=(
        rf"^report file {re.escape(repr(str(path)))} is not an actstats report: "
        rf"found {re.escape(seen)}, expected 'actstats.report/1' \(from actstats probe --format json\)$"
    )):
        load_report(path)


def test_load_report_points_compare_documents_to_load_reports(tmp_path):
    path = _write(tmp_path, "cmp.json", '{"schema": "actstats.compare/1", "reports": {}}')
    with pytest.raises(ActStatsError, match=(
        rf"^report file {re.escape(repr(str(path)))} holds an actstats.compare/1 document "
        r"with several reports; read it with load_reports\(\)$"
    )):
        load_report(path)


def test_load_reports_expands_a_compare_document(reports, tmp_path):
    doc = {"schema": "actstats.compare/1", "best": "kaiming", "rows": [],
           "reports": {"default": reports["default"], "kaiming": reports["kaiming"]}}
    path = _write(tmp_path, "cmp.json", json.dumps(doc))
    loaded = load_reports(path)
    assert [label for label, _ in loaded] == ["default", "kaiming"]
    assert [report for _, report in loaded] == [reports["default"], reports["kaiming"]]
    labels, docs = zip(*loaded)
    fig = plot_reports(docs, tmp_path / "cmp.png", labels=labels)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["default", "kaiming"]


def test_load_reports_labels_a_plain_report_by_init_or_stem(reports, tmp_path):
    kaiming = _write(tmp_path, "run1.json", json.dumps(reports["kaiming"]))
    default = _write(tmp_path, "baseline.json", json.dumps(reports["default"]))
    assert [label for label, _ in load_reports(kaiming)] == ["kaiming"]
    assert [label for label, _ in load_reports(default)] == ["baseline"]


def test_load_reports_rejects_a_bad_report_inside_a_compare_document(reports, tmp_path):
    bad = copy.deepcopy(reports["kaiming"])
    bad["layers"] = None
    doc = {"schema": "actstats.compare/1", "reports": {"default": reports["default"], "x": bad}}
    path = _write(tmp_path, "cmp.json", json.dumps(doc))
    with pytest.raises(ActStatsError, match=(
        rf"^report file {re.escape(repr(str(path)))}, scheme 'x', is not an actstats report: "
        r"'layers' is not a list of records$"
    )):
        load_reports(path)
