"""The signal-propagation picture (SPEC 2.7): activation and gradient rms across depth.

Two panels share one x axis, the record ``index`` (execution order): on the
left the rms of every record's output (``act.rms``), on the right the rms of
the gradient w.r.t. that output (``grad.rms``), both on a log scale, one
colour per report. Theory (He for ReLU nets, Xavier/LeCun otherwise) predicts
that a well-initialized network keeps the rms of the main path at the level it
started from, so each panel carries a dashed reference line: the network
input's rms (``input.rms``) on the left, the output gradient's rms (the last
record's ``grad.rms``) on the right. A curve that leaves its line by decades is
the vanishing or exploding signal the report's flags describe.

Non-finite statistics (null in the JSON) leave a gap in the curve; a dotted
vertical line in the report's colour marks the first non-finite record of the
forward pass (left) and of the backward pass (right, the last record in
execution order whose gradient holds NaN/Inf). Flagged records get a hollow red
circle: flags of kind ``vanishing_grad`` and ``exploding_grad`` on the gradient
panel, the other kinds on the activation panel (``nonfinite`` is shown by the
dotted line instead, its value having no place on the axis). An rms of exactly
0 cannot sit on a log axis and is drawn as a triangle on the bottom edge.

matplotlib is the optional ``plot`` extra; it is imported only when a figure is
drawn, and only its object-oriented API with the Agg canvas is used, so
pyplot's global state and the user's backend are left alone.

Artists carry a ``gid`` so that tests and callers can find them:
``"curve"`` (one line per report and panel, labelled with the report's label),
``"reference"``, ``"flagged"`` (one per panel, all reports together),
``"nonfinite"`` and ``"zero"``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actstats.errors import ActStatsError
from actstats.report import COMPARE_SCHEMA, SCHEMA

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from actstats.report import Report

MISSING_MATPLOTLIB = "actstats plot needs matplotlib: pip install 'actstats[plot]'"
REFERENCE_LABEL = "He/Xavier prediction (rms preserved)"
FLAGGED_LABEL = "flagged"
NONFINITE_LABEL = "first non-finite (NaN/Inf region shaded)"
ZERO_LABEL = "rms = 0 (off the log scale)"
# Flag kinds about the backward pass: marked on the gradient panel.
GRAD_FLAG_KINDS = frozenset({"vanishing_grad", "exploding_grad"})
# Size in inches: 800 x 500 pixels at the default dpi, a PNG of a few tens of KB.
FIGSIZE = (8.0, 5.0)


def require_matplotlib() -> None:
    """Raise the one-sentence error when the plot extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ActStatsError(MISSING_MATPLOTLIB) from err


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one ``actstats.report/1`` JSON document, as written by ``actstats probe --format json``.

    Args:
        path: the JSON file.

    Returns:
        The report as a dict (non-finite numbers are None, as written).

    Raises:
        ActStatsError: the file is missing or unreadable, is not valid JSON, or
            is not an ``actstats.report/1`` document (a compare document is
            refused with a pointer to :func:`load_reports`).
    """
    doc = _read_json(path)
    where = f"report file {str(path)!r}"
    if isinstance(doc, Mapping) and doc.get("schema") == COMPARE_SCHEMA:
        raise ActStatsError(
            f"{where} holds an {COMPARE_SCHEMA} document with several reports; "
            f"read it with load_reports()"
        )
    return _check_report(doc, where)


def load_reports(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """Read a report or a compare document as a list of ``(label, report)`` pairs.

    An ``actstats.compare/1`` document (``actstats compare --format json``)
    expands into its per-scheme reports, in the document's order, each labelled
    by its scheme. A plain ``actstats.report/1`` document gives one pair,
    labelled by its ``init`` field when an init scheme was applied and by the
    file's stem (``runs/kaiming.json`` -> ``kaiming``) when it is ``default``.

    Raises:
        ActStatsError: as :func:`load_report`; also for a compare document
            whose ``reports`` is not an object of reports.
    """
    doc = _read_json(path)
    where = f"report file {str(path)!r}"
    if isinstance(doc, Mapping) and doc.get("schema") == COMPARE_SCHEMA:
        reports = doc.get("reports")
        if not isinstance(reports, Mapping) or not reports:
            raise ActStatsError(
                f"{where} is an {COMPARE_SCHEMA} document without reports; "
                f"expected 'reports' to map each scheme to its {SCHEMA} report"
            )
        return [
            (str(scheme), _check_report(report, f"{where}, scheme {scheme!r},"))
            for scheme, report in reports.items()
        ]
    report = _check_report(doc, where, also=COMPARE_SCHEMA)
    init = report.get("init")
    label = str(init) if init and init != "default" else Path(path).stem
    return [(label, report)]


def plot_reports(
    reports: Sequence[Mapping[str, Any] | Report],
    output: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Draw the signal-propagation picture of one or more reports and save it to ``output``.

    The left panel plots ``act.rms`` and the right panel ``grad.rms`` against
    the record ``index`` on a log scale, one line per report; the legend of the
    left panel names the reports, the right one explains the marks (reference
    lines, flagged records, first non-finite record). See the module docstring
    for what each mark means.

    Args:
        reports: report dicts (``Report.to_dict()``, :func:`load_report`) or
            :class:`~actstats.report.Report` objects, overlaid in one figure.
        output: the image file; its suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        labels: one legend label per report; by default each report's ``init``
            field, numbered (``"1: default"``) when two would read the same.
        title: the figure title; by default the model name, followed by
            ``compared: a, b, c`` when there are several reports.
        dpi: resolution of raster output; the figure is 8 x 5 inches.

    Returns:
        The matplotlib ``Figure`` (not registered with pyplot), whose
        ``axes[0]`` and ``axes[1]`` are the activation and gradient panels.

    Raises:
        ActStatsError: no reports, a document that is not an
            ``actstats.report/1`` report, labels that do not match the
            reports, a bad ``dpi``, matplotlib missing, or ``output`` not writable.

    Example:
        >>> a = actstats.probe(model, x).to_dict()                    # doctest: +SKIP
        >>> actstats.init_weights(model, "kaiming")                    # doctest: +SKIP
        >>> b = actstats.probe(model, x).to_dict()                    # doctest: +SKIP
        >>> plot_reports([a, b], "spp.png", labels=["default", "kaiming"])  # doctest: +SKIP
    """
    docs = [r.to_dict() if hasattr(r, "to_dict") else r for r in reports]
    if not docs:
        raise ActStatsError(f"nothing to plot: no reports given; pass at least one {SCHEMA} report")
    if labels is None:
        labels = _default_labels(docs)
    elif isinstance(labels, str) or len(labels) != len(docs):
        got = "a string" if isinstance(labels, str) else f"{len(labels)} labels"
        raise ActStatsError(f"got {got} for {len(docs)} report(s); pass one label per report")
    labels = [str(label) for label in labels]
    docs = [_check_report(doc, f"report {i} ({label!r})")
            for i, (doc, label) in enumerate(zip(docs, labels), start=1)]
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ActStatsError(f"dpi must be a positive integer, got {dpi!r}")

    try:
        import matplotlib  # noqa: F401  (fails first, whatever submodules are cached)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as err:
        raise ActStatsError(MISSING_MATPLOTLIB) from err

    fig = Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_act, ax_grad = fig.subplots(1, 2, sharex=True)
    colors = [f"C{i % 10}" for i in range(len(docs))]

    act_refs = [_finite((doc.get("input") or {}).get("rms")) for doc in docs]
    grad_refs = [_output_grad_rms(doc) for doc in docs]
    used: set[str] = set()
    used |= _panel(ax_act, docs, labels, colors, "act", act_refs)
    used |= _panel(ax_grad, docs, labels, colors, "grad", grad_refs)

    ax_act.set_title("activation rms")
    ax_grad.set_title("gradient rms")
    ax_act.set_xlabel("record index (execution order)")
    ax_grad.set_xlabel("record index (backward runs right to left)")
    ax_act.set_ylabel("rms (log scale)")
    curves = [line for line in ax_act.get_lines() if line.get_gid() == "curve"]
    ax_act.legend(handles=curves, loc="best", fontsize="small")
    if all(_finite((r.get("grad") or {}).get("rms")) is None for doc in docs for r in doc["layers"]):
        ax_grad.text(0.5, 0.5, "no gradient statistics\n(probed forward-only)",
                     transform=ax_grad.transAxes, ha="center", va="center", color="0.4")
    key = _key_handles(used, Line2D)
    if key:
        ax_grad.legend(handles=key, loc="best", fontsize="small")
    fig.suptitle(title if title is not None else _default_title(docs, labels))

    try:
        fig.savefig(os.fspath(output), dpi=dpi)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ActStatsError(f"cannot write the plot to {os.fspath(output)!r}: {reason}") from err
    return fig


def _panel(
    ax: Axes,
    docs: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    colors: Sequence[str],
    field: str,
    refs: Sequence[float | None],
) -> set[str]:
    """Draw one panel (``field`` is ``"act"`` or ``"grad"``); return the kinds of marks drawn."""
    used: set[str] = set()
    ax.set_yscale("log")
    flagged_x: list[float] = []
    flagged_y: list[float] = []
    zero_x: list[float] = []
    for doc, label, color in zip(docs, labels, colors):
        layers = doc["layers"]
        xs = [_index(record, pos) for pos, record in enumerate(layers)]
        values = [_finite((record.get(field) or {}).get("rms")) for record in layers]
        # NaN breaks the line, so a null value leaves a gap instead of a bridge.
        ys = [v if v is not None and v > 0 else math.nan for v in values]
        ax.plot(xs, ys, color=color, marker="o", markersize=2.5, linewidth=1.2,
                label=label, gid="curve")
        zero_x += [x for x, v in zip(xs, values) if v == 0]
        for x, y, record in zip(xs, ys, layers):
            if not math.isnan(y) and _panel_flags(record, field):
                flagged_x.append(x)
                flagged_y.append(y)
        first = _first_nonfinite(layers, xs, field)
        if first is not None:
            ax.axvline(first, color=color, linestyle=":", linewidth=1.5, gid="nonfinite",
                       label=NONFINITE_LABEL if "nonfinite" not in used else "_nolegend_")
            # Shade the records computed on NaN/Inf: after it forward, before it backward.
            end = max(xs) if field == "act" else min(xs)
            if end != first:
                ax.axvspan(first, end, color=color, alpha=0.07, linewidth=0, zorder=0)
            used.add("nonfinite")
    # One reference line per distinct value: several reports of one model share it.
    distinct: dict[str, tuple[float, str]] = {}
    for value, color in zip(refs, colors):
        if value is not None and value > 0:
            distinct.setdefault(f"{value:.9g}", (value, color))
    for value, color in distinct.values():
        ax.axhline(value, color="0.35" if len(distinct) == 1 else color, linestyle="--",
                   linewidth=1.0, zorder=1, gid="reference",
                   label=REFERENCE_LABEL if "reference" not in used else "_nolegend_")
        used.add("reference")
    if flagged_x:
        ax.plot(flagged_x, flagged_y, linestyle="none", marker="o", markersize=6,
                markerfacecolor="none", markeredgecolor="red", markeredgewidth=1.0,
                zorder=3, gid="flagged", label=FLAGGED_LABEL)
        used.add("flagged")
    if zero_x:
        # x in data, y in axes coordinates: the bottom edge of the panel.
        ax.plot(zero_x, [0.0] * len(zero_x), transform=ax.get_xaxis_transform(),
                linestyle="none", marker="v", markersize=5, color="0.2", clip_on=False,
                gid="zero", label=ZERO_LABEL)
        used.add("zero")
    if not any(line.get_gid() == "curve" and _has_positive(line.get_ydata())
               for line in ax.get_lines()) and "reference" not in used:
        ax.set_ylim(0.1, 10.0)  # nothing to autoscale a log axis on
    else:
        # At least two decades, so that a healthy network reads as flat rather
        # than as a zigzag blown up to fill the panel.
        low, high = ax.get_ylim()
        if high < 100 * low:
            center = math.sqrt(low * high)
            ax.set_ylim(center / 10, center * 10)
    ax.grid(True, which="major", alpha=0.3)
    return used


def _key_handles(used: set[str], Line2D: Any) -> list[Any]:
    """Proxy artists explaining the marks, in a fixed order, for those drawn on either panel."""
    proxies = {
        "reference": Line2D([], [], color="0.35", linestyle="--", linewidth=1.0,
                            label=REFERENCE_LABEL),
        "flagged": Line2D([], [], linestyle="none", marker="o", markersize=6,
                          markerfacecolor="none", markeredgecolor="red", label=FLAGGED_LABEL),
        "nonfinite": Line2D([], [], color="0.2", linestyle=":", linewidth=1.5,
                            label=NONFINITE_LABEL),
        "zero": Line2D([], [], linestyle="none", marker="v", color="0.2", label=ZERO_LABEL),
    }
    return [proxy for kind, proxy in proxies.items() if kind in used]


def _panel_flags(record: Mapping[str, Any], field: str) -> list[str]:
    """The record's flags that belong on the ``field`` panel (``nonfinite`` excluded)."""
    flags = [str(kind) for kind in record.get("flags") or () if kind != "nonfinite"]
    if field == "grad":
        return [kind for kind in flags if kind in GRAD_FLAG_KINDS]
    return [kind for kind in flags if kind not in GRAD_FLAG_KINDS]


def _first_nonfinite(
    layers: Sequence[Mapping[str, Any]], xs: Sequence[float], field: str
) -> float | None:
    """Index of the first record holding NaN/Inf: in execution order for
    activations, in backward order (the last in execution order) for gradients."""
    hits = [x for x, record in zip(xs, layers) if ((record.get(field) or {}).get("nonfinite") or 0) > 0]
    if not hits:
        return None
    return min(hits) if field == "act" else max(hits)


def _output_grad_rms(doc: Mapping[str, Any]) -> float | None:
    """The rms of the gradient at the output: the last record's ``grad.rms``."""
    layers = doc["layers"]
    return _finite((layers[-1].get("grad") or {}).get("rms")) if layers else None


def _index(record: Mapping[str, Any], position: int) -> float:
    index = record.get("index")
    return index if isinstance(index, (int, float)) and not isinstance(index, bool) else position


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (JSON writes NaN/Inf as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _has_positive(values: Any) -> bool:
    return any(v > 0 for v in values if not math.isnan(v))


def _default_labels(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [str(doc.get("init") or "report") if isinstance(doc, Mapping) else "report"
             for doc in docs]
    if len(set(names)) == len(names):
        return names
    return [f"{i}: {name}" for i, name in enumerate(names, start=1)]


def _default_title(docs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    models = list(dict.fromkeys(str(doc.get("model") or "model") for doc in docs))
    title = " / ".join(models)
    if len(docs) > 1:
        title += f" \N{EM DASH} compared: {', '.join(labels)}"
    return title


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_json(path: str | os.PathLike[str]) -> Any:
    where = f"report file {os.fspath(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ActStatsError(
            f"{where} does not exist; write one with: actstats probe MODEL_SPEC --json {os.fspath(path)}"
        ) from err
    except UnicodeDecodeError as err:
        raise ActStatsError(f"{where} is not valid JSON: it is not UTF-8 text") from err
    except OSError as err:
        raise ActStatsError(f"cannot read {where}: {err.strerror or err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ActStatsError(
            f"{where} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err


def _check_report(doc: Any, where: str, also: str | None = None) -> dict[str, Any]:
    """Return ``doc`` when it is an ``actstats.report/1`` document, else raise naming ``where``.

    ``also`` names a second schema the caller accepts, for the message only.
    """
    schema = doc.get("schema") if isinstance(doc, Mapping) else None
    if schema != SCHEMA:
        seen = f"schema {schema!r}" if isinstance(doc, Mapping) else f"a JSON {_json_type(doc)}"
        expected = f"{SCHEMA!r} (from actstats probe --format json)"
        if also is not None:
            expected += f" or {also!r} (from actstats compare --format json)"
        raise ActStatsError(f"{where} is not an actstats report: found {seen}, expected {expected}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(r, Mapping) for r in layers):
        raise ActStatsError(f"{where} is not an actstats report: 'layers' is not a list of records")
    return dict(doc)
