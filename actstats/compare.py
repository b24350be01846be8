"""Compare init schemes on one model: the same batches, one probe per scheme, a verdict.

Each scheme starts from a fresh deep copy of the model as built, so schemes
never see each other's weights; every probe uses the same seed and therefore
the same batches, cotangents and dropout masks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from actstats.diagnose import Thresholds
from actstats.errors import InputError
from actstats.inputs import materialize
from actstats.probe import probe
from actstats.report import COMPARE_SCHEMA, Report, clean
from actstats.schemes import parse_scheme

#: Flag kinds that make a scheme unusable; any one of them outweighs all milder flags.
SEVERE = ("nonfinite", "exploding", "vanishing", "exploding_grad", "vanishing_grad", "symmetric")


@dataclass(frozen=True)
class CompareRow:
    """One scheme's summary.

    Attributes:
        output_ratio: rms of the last record's output over the network input's rms
            (over the first record's output when the input is token ids).
        worst_gain: the parametric layer's measured gain divided by the gain its
            reference scheme predicts (``sqrt(fan_in) * expected_std``) that is
            furthest from 1; 1.0 means every layer behaves as theory says.
        first_grad_ratio: gradient rms at the first record over that at the last.
        dead_pct, saturated_pct: mean ``dead_frac`` / ``saturation`` over the
            records that have one, in percent (None when there are none).
        flags: number of flags raised.
        verdict: ``ok`` or the kinds raised, most severe first.
    """

    scheme: str
    output_ratio: float
    worst_gain: float
    first_grad_ratio: float
    dead_pct: float | None
    saturated_pct: float | None
    flags: int
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`: rows in the order given, the best scheme, every report."""

    rows: tuple[CompareRow, ...]
    best: str
    reports: Mapping[str, Report]

    def to_dict(self) -> dict[str, Any]:
        """The ``actstats.compare/1`` document (non-finite numbers as None)."""
        return {
            "schema": COMPARE_SCHEMA,
            "best": self.best,
            "rows": clean([asdict(row) for row in self.rows]),
            "reports": {scheme: report.to_dict() for scheme, report in self.reports.items()},
        }


def _mean(values: Sequence[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def summarize(scheme: str, report: Report) -> CompareRow:
    """Reduce one report to its comparison row."""
    layers = report.layers
    base = report.input.rms
    if layers and layers[0].type == "Embedding":
        base = layers[0].act.rms
    output_ratio = layers[-1].act.rms / base if layers and base else math.nan
    gains = []
    for layer in layers:
        w = layer.weight
        if w is not None and w.measured_gain is not None and w.expected_std > 0:
            gains.append(w.measured_gain / (math.sqrt(w.fan_in) * w.expected_std))
    finite = [g for g in gains if math.isfinite(g) and g > 0]
    if len(finite) < len(gains):
        worst = math.nan if any(math.isnan(g) for g in gains) else (0.0 if 0.0 in gains else math.inf)
    else:
        worst = max(finite, key=lambda g: abs(math.log(g)), default=math.nan)
    grads = [layer.grad.rms for layer in layers if layer.grad is not None]
    first_grad = grads[0] / grads[-1] if len(grads) >= 2 and grads[-1] else math.nan
    kinds = list(dict.fromkeys(flag.kind for flag in report.flags))
    kinds.sort(key=lambda k: (k not in SEVERE, SEVERE.index(k) if k in SEVERE else 0))
    return CompareRow(
        scheme=scheme,
        output_ratio=output_ratio,
        worst_gain=worst,
        first_grad_ratio=first_grad,
        dead_pct=_mean([l.dead_frac for l in layers if l.dead_frac is not None]),
        saturated_pct=_mean([l.saturation for l in layers if l.saturation is not None]),
        flags=len(report.flags),
        verdict=", ".join(kinds) if kinds else "ok",
    )


def _score(row: CompareRow, report: Report) -> tuple[float, float, float]:
    severe = sum(1 for f in report.flags if f.kind in SEVERE)
    off = abs(math.log(row.worst_gain)) if math.isfinite(row.worst_gain) and row.worst_gain > 0 else math.inf
    return (severe, row.flags, off)


def compare(
    model: nn.Module,
    inputs: Any,
    schemes: Sequence[str],
    *,
    batches: int | None = 4,
    batch_size: int = 32,
    backward: bool = True,
    device: str | None = None,
    seed: int = 0,
    train: bool = True,
    eps: float = 0.01,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    histogram_bins: int = 0,
) -> Comparison:
    """Probe a copy of ``model`` under each scheme on the same batches and rank them.

    The best scheme raises the fewest severe flags (non-finite, exploding,
    vanishing, symmetric), then the fewest flags, then has the layer gain
    closest to theory. ``model`` itself is never changed.

    Example:
        >>> result = compare(net, x, ["default", "kaiming"])
        >>> result.best
        'kaiming'
    """
    if not schemes:
        raise InputError("compare needs at least one init scheme, e.g. default,kaiming")
    for scheme in schemes:
        parse_scheme(scheme)  # every scheme is checked before any probe runs
    # Made once, so that every scheme sees exactly the same batches.
    made = materialize(inputs, batches=batches, batch_size=batch_size,
                       generator=torch.Generator().manual_seed(seed))
    reports: dict[str, Report] = {}
    for scheme in schemes:
        reports[scheme] = probe(
            copy.deepcopy(model), made, batches=None, backward=backward, device=device,
            seed=seed, train=train, eps=eps, thresholds=thresholds, init=scheme,
            histogram_bins=histogram_bins,
        )
    rows = tuple(summarize(scheme, reports[scheme]) for scheme in schemes)
    best = min(rows, key=lambda row: _score(row, reports[row.scheme])).scheme
    return Comparison(rows, best, reports)
