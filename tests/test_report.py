"""Report serialization: the actstats.report/1 schema, strict JSON, CSV and the 80-column table."""

import csv
import io
import json
import math

import numpy as np
import pytest

import torch
from torch import nn

import actstats
from actstats.report import CSV_COLUMNS, Histogram, make_histogram, make_histograms
from actstats.table import number, render, shorten

LAYER_KEYS = {"name", "type", "index", "act", "input_rms", "grad", "dead_frac", "saturation", "weight", "flags"}
ACT_KEYS = {"mean", "std", "rms", "min", "max", "zero_frac", "numel", "nonfinite"}
GRAD_KEYS = {"mean", "std", "rms", "nonfinite"}
TOP_KEYS = {"schema", "model", "init", "device", "batches", "batch_size", "input", "layers", "flags", "untouched"}


def validate_report(doc: dict) -> None:
    """Check a JSON report against the field names and types of SPEC section 6."""
    assert TOP_KEYS <= set(doc), TOP_KEYS - set(doc)
    assert doc["schema"] == "actstats.report/1"
    assert isinstance(doc["input"]["shape"], list) and "rms" in doc["input"]
    assert isinstance(doc["flags"], list) and isinstance(doc["untouched"], list)
    for i, layer in enumerate(doc["layers"]):
        assert set(layer) == LAYER_KEYS and layer["index"] == i
        assert set(layer["act"]) == ACT_KEYS
        assert layer["grad"] is None or set(layer["grad"]) == GRAD_KEYS
        assert isinstance(layer["flags"], list)
    for flag in doc["flags"]:
        assert set(flag) == {"kind", "layer", "message", "value", "threshold"}


def _report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sigmoid())
    return actstats.probe(model, torch.randn(16, 4), batches=2)


def test_json_follows_the_schema_and_round_trips_the_numbers():
    report = _report()
    doc = json.loads(report.to_json())
    validate_report(doc)
    assert doc == report.to_dict()
    assert doc["layers"][1]["dead_frac"] == report.layers[1].dead_frac
    assert doc["layers"][3]["saturation"] == report.layers[3].saturation
    assert doc["layers"][0]["act"]["std"] == report.layers[0].act.std
    assert doc["input"]["shape"] == [16, 4] and doc["batch_size"] == 16 and doc["batches"] == 2


def test_non_finite_numbers_become_null():
    x = torch.full((2, 3), float("inf"))
    doc = json.loads(actstats.probe(nn.Linear(3, 3), x, batches=1).to_json())
    validate_report(doc)
    assert doc["layers"][0]["act"]["mean"] is None and doc["layers"][0]["act"]["nonfinite"] == 6
    assert doc["input"]["rms"] is None and doc["input"]["nonfinite"] == 6


def test_csv_has_one_row_per_record_and_fixed_columns():
    report = _report()
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["name"] for r in rows] == [l.name for l in report.layers]
    assert float(rows[2]["act.std"]) == report.layers[2].act.std
    assert rows[0]["dead_frac"] == "" and float(rows[1]["dead_frac"]) == report.layers[1].dead_frac


def test_table_fits_80_columns_for_a_50_layer_model():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_with_a_long_name = nn.Sequential(
                *[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(50)])

        def forward(self, x):
            return self.encoder_with_a_long_name(x)

    report = actstats.probe(Deep(), torch.randn(4, 8), batches=1)
    text = render(report)
    lines = text.splitlines()
    assert len(report.layers) == 100 and len(lines) >= 102
    assert max(len(line) for line in lines) <= 80
    assert "encoder…" in lines[2]  # long names shortened in the middle, not wrapped
    assert "\x1b[" not in text  # no colour unless asked


def test_number_format_is_at_most_seven_characters():
    for x in [0.0, 1.0, -0.0123, 123.456, -999.9, 1.234e-5, -1.234e-12, 5.6e7, float("nan"), None]:
        assert len(number(x)) <= 7, number(x)
    assert number(1.234e-5) == "1.2e-5" and number(0.5) == "0.5" and number(None) == "-"
    assert shorten("layer1.0.downsample.conv", 12) == "layer…e.conv"


@pytest.mark.parametrize("low, high", [(-1.5, 2.25), (1e-3, 7.0), (-3.3, -0.1)])
def test_made_histogram_edges_are_numpys_linspace(low, high):
    hist = make_histogram(np.ones(64), low, high, low, high, 64.0, 0.0, 1.0)
    assert list(hist.edges) == np.linspace(low, high, 65).tolist()


def test_made_histogram_equals_the_checked_constructor():
    counts = np.array([3.0, 0.0, 5.0, 1.0])
    made = make_histogram(counts, -1.0, 3.0, -0.9, 2.5, 9.0, 4.25, 11.5)
    checked = Histogram(np.linspace(-1.0, 3.0, 5), counts, -0.9, 2.5, 9, 4.25, 11.5)
    assert made == checked and hash(made) == hash(checked)
    assert type(made.edges) is tuple and type(made.counts) is tuple and type(made.num) is float


@pytest.mark.parametrize("low", [1.0, -3.0, 1e6, -2.5e-7])
@pytest.mark.parametrize("ulps_per_bin", [0.5, 1, 2, 3, 5, 8, 9, 16, 1000])
def test_made_histogram_near_the_float_spacing_equals_the_checked_constructor_or_none(low, ulps_per_bin):
    # bins a few ulps wide: the unchecked construction must agree with the constructor's checks
    bins = 64
    high = low + bins * ulps_per_bin * math.ulp(abs(low))
    counts = np.arange(bins, dtype=np.float64)
    made = make_histogram(counts, low, high, low, high, 5.0, 1.0, 2.0)
    edges = [low + i * ((high - low) / bins) for i in range(bins)] + [high]
    try:
        checked = Histogram(edges, counts, low, high, 5, 1.0, 2.0)
    except ValueError:
        checked = None
    assert made == checked
    if made is not None:
        assert made.edges == tuple(np.linspace(low, high, bins + 1).tolist())
        assert type(made.counts) is tuple and all(type(c) is float for c in made.counts)


def test_made_histograms_equal_made_histogram_row_by_row():
    bins = 16
    rows = [  # low, high, num: usable, narrow (a few ulps per bin), collapsed, empty, not finite, reversed
        (-1.5, 2.25, 10.0), (1.0, 1.0 + bins * 3 * math.ulp(1.0), 4.0), (1.0, 1.0 + 1e-15, 4.0),
        (0.0, 1.0, 0.0), (-math.inf, 1.0, 3.0), (math.nan, 1.0, 3.0), (2.0, 1.0, 3.0), (-1e308, 1e308, 3.0),  # the last: high - low overflows
        (1e-3, 7.0, 2.0),
    ]
    counts = np.arange(len(rows) * bins, dtype=np.float64).reshape(len(rows), bins)
    lows, highs, nums = zip(*rows)
    vmins, vmaxs = [l - 1 for l in lows], [h + 1 for h in highs]
    totals, sumsqs = [0.5 * k for k in range(len(rows))], [2.0 * k for k in range(len(rows))]
    made = make_histograms(counts, lows, highs, vmins, vmaxs, nums, totals, sumsqs)
    one_by_one = [make_histogram(counts[k], lows[k], highs[k], vmins[k], vmaxs[k], nums[k], totals[k], sumsqs[k])
                  for k in range(len(rows))]
    assert made == one_by_one
    assert [h is None for h in made] == [False, False, True, True, True, True, True, True, False]
    assert made[0].edges == tuple(np.linspace(-1.5, 2.25, bins + 1).tolist())


def test_a_range_narrower_than_the_float_spacing_gives_no_histogram():
    assert make_histogram(np.ones(64), 1.0, 1.0 + 1e-15, 1.0, 1.0, 64.0, 64.0, 64.0) is None
