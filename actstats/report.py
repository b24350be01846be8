"""The probe's result: :class:`Report`, and its table, JSON and CSV forms (SPEC 6).

JSON follows the schema ``actstats.report/1``; non-finite numbers are written
as null (the per-record ``nonfinite`` counts say how many there were), so the
output is always valid JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import operator
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from actstats.stats import ActStats, GradStats

SCHEMA = "actstats.report/1"
COMPARE_SCHEMA = "actstats.compare/1"


@dataclass(frozen=True)
class Histogram:
    """A histogram computed on the device and brought to the host.

    ``counts[i]`` values fell in ``[edges[i], edges[i+1])`` (the last bin
    closed); ``min``, ``max``, ``num``, ``sum`` and ``sum_squares`` are exact
    figures of all values, not derived from the bins. Sequences (lists, numpy
    arrays, CPU tensors) are stored as tuples of floats.

    Example, from values on the host::

        counts, edges = np.histogram(values, bins=30)
        Histogram(edges, counts, values.min(), values.max(), values.size,
                  values.sum(), values @ values)
    """

    edges: Sequence[float]
    counts: Sequence[float]
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        edges, counts = _floats(self.edges), _floats(self.counts)
        if not counts or len(edges) != len(counts) + 1:
            raise ValueError(
                f"a histogram needs at least one bin and len(edges) == len(counts) + 1; "
                f"got {len(edges)} edges and {len(counts)} counts"
            )
        # plain Python on a few dozen floats: numpy's per-call cost would be most of a report's
        if not all(map(math.isfinite, edges)) or not all(map(operator.lt, edges, edges[1:])):
            raise ValueError(
                f"histogram edges must be finite and strictly increasing; got {edges} "
                f"(for constant data widen the range, e.g. [v - 1, v + 1])"
            )
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "counts", counts)
        for name in ("min", "max", "num", "sum", "sum_squares"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def finite(self) -> bool:
        """Whether every figure is finite and there is at least one value (what TensorBoard can draw)."""
        figures = (self.min, self.max, self.num, self.sum, self.sum_squares, *self.counts)
        return self.num > 0 and all(map(math.isfinite, figures))

    def bucket_limits(self) -> list[float]:
        """The right edge of each bin: TensorBoard's ``bucket_limit`` (``len(counts)`` values).

        TensorBoard's ``HistogramProto`` stores only right edges; readers take
        ``min`` as the left edge of the first non-empty bucket and ``max`` as the
        right edge of the last (``tensorboard/data_compat.py``), so ``edges[0]``
        is not needed.
        """
        return list(self.edges[1:])


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    """``values`` (a list, tuple, numpy array or CPU tensor, nested or not) flattened into a tuple of
    floats; a flat list or tuple of numbers without numpy's per-call cost (a report builds two
    histograms per record)."""
    if type(values) in (list, tuple):
        try:
            return tuple(map(float, values))
        except TypeError:  # nested: numpy flattens it
            pass
    return tuple(np.asarray(values, dtype=np.float64).reshape(-1).tolist())


def make_histogram(counts: Sequence[float], low: float, high: float, vmin: float, vmax: float,
                   num: float, total: float, sumsq: float) -> Histogram | None:
    """Assemble a host-side :class:`Histogram`; None when nothing finite was counted.

    ``counts`` is a list of floats or a numpy array. Edges are ``np.linspace(low, high, bins + 1)``,
    computed in Python. When each bin is wider than 8 ulps of the range's largest magnitude,
    no rounding can make two edges meet (an edge is off by less than 2.5 ulps), so the
    constructor's checks are skipped; a narrower range goes through them.
    """
    if not num > 0 or not (math.isfinite(low) and math.isfinite(high) and high > low):
        return None
    counts = _floats(counts)
    bins = len(counts)
    if not bins:
        return None
    step = (high - low) / bins
    edges = [low + i * step for i in range(bins)] + [high]  # as np.linspace(low, high, bins + 1)
    if math.isfinite(step) and step > 8 * math.ulp(max(-low, high)):  # max(-low, high): max(|low|, |high|)
        return _checked_histogram(tuple(edges), counts, vmin, vmax, num, total, sumsq)
    try:
        return Histogram(edges, counts, vmin, vmax, num, total, sumsq)
    except ValueError:  # edges not strictly increasing: a range narrower than the float spacing
        return None


def make_histograms(counts: np.ndarray, lows: Sequence[float], highs: Sequence[float], vmins: Sequence[float],
                    vmaxs: Sequence[float], nums: Sequence[float], totals: Sequence[float],
                    sumsqs: Sequence[float]) -> list[Histogram | None]:
    """:func:`make_histogram` of each row of ``counts`` (``[k, bins]``) with the k-th figures:
    the same histograms, with every row's edges in one numpy operation (the same float64
    arithmetic, so the same edges) instead of a Python loop per histogram."""
    k, bins = counts.shape
    if not k or not bins:
        return [None] * k
    low, high = np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64)
    with np.errstate(all="ignore"):  # rows that are not usable go through make_histogram's checks
        step = (high - low) / bins
        edges = (low[:, None] + np.arange(bins, dtype=np.float64) * step[:, None]).tolist()
        fast = (np.isfinite(low) & np.isfinite(high) & (high > low) & np.isfinite(step)
                & (step > 8 * np.spacing(np.maximum(-low, high)))).tolist()
    rows = counts.tolist()
    out: list[Histogram | None] = []
    for r in range(k):
        if fast[r] and nums[r] > 0:
            out.append(_checked_histogram(tuple(edges[r]) + (highs[r],), tuple(rows[r]), vmins[r], vmaxs[r],
                                          nums[r], totals[r], sumsqs[r]))
        else:
            out.append(make_histogram(rows[r], lows[r], highs[r], vmins[r], vmaxs[r], nums[r], totals[r], sumsqs[r]))
    return out


def _checked_histogram(edges: tuple[float, ...], counts: tuple[float, ...], vmin: float, vmax: float,
                       num: float, total: float, sumsq: float) -> Histogram:
    """A :class:`Histogram` from tuples of floats, ``len(edges) == len(counts) + 1``, whose edges
    are known finite and strictly increasing: built without running the constructor's checks
    (a step's hundred histograms each paid about 15 µs for them)."""
    hist = object.__new__(Histogram)
    hist.__dict__.update(edges=edges, counts=counts, min=float(vmin), max=float(vmax),
                         num=float(num), sum=float(total), sum_squares=float(sumsq))
    return hist


@dataclass(frozen=True)
class Flag:
    """One diagnosis: ``kind`` raised at ``layer`` because ``value`` crossed ``threshold``."""

    kind: str
    layer: str
    message: str
    value: float | None
    threshold: float | None


@dataclass(frozen=True)
class WeightInfo:
    """A parametric layer's weight held against theory (SPEC 5).

    ``std`` is the population std of the weight, ``predicted_gain`` is
    ``sqrt(fan_in) * weight_rms``, ``measured_gain`` is ``act.rms / input_rms``.
    ``parts`` holds the same figures per gate / projection for LSTM, GRU and
    MultiheadAttention (``weight_ih_l0[i]``, ``in_proj_weight[q]``, ...).
    """

    std: float
    fan_in: int
    fan_out: int
    xavier_std: float
    he_std: float
    lecun_std: float
    expected_std: float
    reference: str
    nonlinearity: str
    predicted_gain: float
    measured_gain: float | None
    parts: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class LayerReport:
    """One record: one call of a module or of a functional activation."""

    name: str
    type: str
    index: int
    act: ActStats
    input_rms: float
    grad: GradStats | None
    dead_frac: float | None
    saturation: float | None
    weight: WeightInfo | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputInfo:
    """The first input tensor: full shape of one batch (batch dim included) and rms over all batches."""

    shape: tuple[int, ...]
    rms: float
    nonfinite: int = 0


@dataclass(frozen=True)
class Report:
    """Everything one probe measured and concluded.

    Attributes:
        layers: one :class:`LayerReport` per record, in execution order.
        flags: the raised :class:`Flag` objects.
        untouched: parameters an ``init`` scheme left alone.
        notices: remarks for the user (forward-only probing, ...); the CLI writes them to stderr.
        histograms: per record, the device-computed activation and gradient
            histograms when the probe was asked for them (for TensorBoard).
    """

    model: str
    device: str
    batches: int
    batch_size: int | None
    input: InputInfo
    layers: tuple[LayerReport, ...]
    flags: tuple[Flag, ...] = ()
    init: str = "default"
    untouched: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    schema: str = SCHEMA
    #: record name -> (activation, gradient) histograms, when they were asked for; not serialized.
    histograms: Mapping[str, tuple[Histogram | None, Histogram | None]] = field(
        default_factory=dict, repr=False, compare=False)

    def layer(self, name: str) -> LayerReport:
        """Return the record called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no record named {name!r}; records: {', '.join(l.name for l in self.layers)}")

    def flagged(self, kind: str | None = None) -> list[str]:
        """Names of the layers flagged (with ``kind``, when given), in flag order."""
        return [f.layer for f in self.flags if kind is None or f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict following ``actstats.report/1`` (non-finite numbers as None)."""
        return clean({
            "schema": self.schema,
            "model": self.model,
            "init": self.init,
            "device": self.device,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "input": {"shape": list(self.input.shape), "rms": self.input.rms,
                      "nonfinite": self.input.nonfinite},
            "layers": [_layer_dict(layer) for layer in self.layers],
            "flags": [asdict(f) for f in self.flags],
            "untouched": list(self.untouched),
            "notices": list(self.notices),
        })

    def to_json(self, indent: int | None = 2) -> str:
        """Serialize :meth:`to_dict` as strict JSON (no NaN/Infinity literals)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_csv(self) -> str:
        """One row per record with flattened columns (``act.mean``, ``grad.std``, ``weight.he_std``, ...)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for layer in self.layers:
            flat = _flatten(_layer_dict(layer))
            writer.writerow(["" if flat.get(c) is None else flat[c] for c in CSV_COLUMNS])
        return buffer.getvalue()


CSV_COLUMNS: tuple[str, ...] = (
    ("name", "type", "index")
    + tuple(f"act.{f.name}" for f in fields(ActStats))
    + ("input_rms",)
    + tuple(f"grad.{f.name}" for f in fields(GradStats))
    + ("dead_frac", "saturation")
    + tuple(f"weight.{f.name}" for f in fields(WeightInfo) if f.name != "parts")
    + ("flags",)
)


def _layer_dict(layer: LayerReport) -> dict[str, Any]:
    return clean({
        "name": layer.name,
        "type": layer.type,
        "index": layer.index,
        "act": asdict(layer.act),
        "input_rms": layer.input_rms,
        "grad": asdict(layer.grad) if layer.grad is not None else None,
        "dead_frac": layer.dead_frac,
        "saturation": layer.saturation,
        "weight": _weight_dict(layer.weight),
        "flags": list(layer.flags),
    })


def _weight_dict(weight: WeightInfo | None) -> dict[str, Any] | None:
    if weight is None:
        return None
    out = {f.name: getattr(weight, f.name) for f in fields(weight) if f.name != "parts"}
    if weight.parts:
        out["parts"] = [dict(p) for p in weight.parts]
    return out


def clean(obj: Any) -> Any:
    """Replace NaN/Inf by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, list):
            if key != "parts":
                out[name] = " ".join(str(v) for v in value)
        else:
            out[name] = value
    return out
