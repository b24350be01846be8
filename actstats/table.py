"""The human-readable table of a Report, sized for an 80-column terminal.

Long layer names are shortened in the middle and numbers written in at most
seven characters, so a row never wraps; colour is added only when asked
(the CLI asks when stdout is a terminal).
"""

from __future__ import annotations

import math
import textwrap

from actstats.report import LayerReport, Report

#: Messages shown per flag kind before the rest are summarized in one line.
MESSAGES_PER_KIND = 3

#: One-letter codes for the flags column, in the order they are listed.
FLAG_CODES = {
    "nonfinite": "N",
    "exploding": "E",
    "vanishing": "V",
    "exploding_grad": "e",
    "vanishing_grad": "v",
    "init_mismatch": "M",
    "dead_relu": "D",
    "saturated": "S",
    "symmetric": "=",
}

_COLUMNS = (  # (title, width, right-aligned)
    ("#", 3, True), ("layer", 15, False), ("type", 9, False), ("mean", 7, True),
    ("std", 7, True), ("grad std", 8, True), ("dead", 4, True), ("sat", 4, True),
    ("gain/He", 9, True), ("flags", 5, False),
)


def number(x: float | None) -> str:
    """Format a number in at most 7 characters: ``0.0123``, ``123``, ``1.2e-5``; ``-`` for none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 0.01 <= abs(x) < 1000:
        return f"{x:.3g}"
    for digits in (1, 0):
        mantissa, exponent = f"{x:.{digits}e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
        if len(text) <= 7:
            break
    return text


def shorten(text: str, width: int) -> str:
    """Shorten ``text`` to ``width`` characters by cutting its middle (``encoder.l…out_proj``)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[-tail:]


def _percent(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.0f}"


def _four(x: float) -> str:
    """A non-negative number in at most four characters: ``0.41``, ``22.6``, ``512``, ``3e5``."""
    if not math.isfinite(x):
        return "inf" if x > 0 else "-"
    if x != 0 and x < 0.005:
        return f"{x:.0e}".replace("e-0", "e-")[:4]
    for limit, text in ((9.995, f"{x:.2f}"), (99.95, f"{x:.1f}"), (9999.5, f"{x:.0f}")):
        if x < limit:
            return text
    return f"{x:.0e}".replace("e+0", "e").replace("e+", "e")


def _gain(layer: LayerReport) -> str:
    """Measured gain (output rms / input rms) against He's gain for the following nonlinearity."""
    w = layer.weight
    if w is None or w.measured_gain is None or math.isnan(w.measured_gain):
        return "-"
    return f"{_four(w.measured_gain)}/{_four(w.he_std * math.sqrt(w.fan_in))}"


def _cell(text: str, width: int, right: bool) -> str:
    text = shorten(text, width)
    return text.rjust(width) if right else text.ljust(width)


def render(report: Report, *, color: bool = False, width: int = 80) -> str:
    """Render ``report`` as a table, then its flags with their messages."""
    from click import style  # click is a dependency; imported here to keep report code free of it

    header = (
        f"{report.model} on {report.device}: {report.batches} batch(es) of {report.batch_size}, "
        f"input {tuple(report.input.shape)} rms {number(report.input.rms)}, init {report.init}"
    )
    lines = textwrap.wrap(header, width) or [""]
    lines.append(" ".join(_cell(t, w, r) for t, w, r in _COLUMNS).rstrip())
    for layer in report.layers:
        codes = "".join(code for kind, code in FLAG_CODES.items() if kind in layer.flags)
        cells = (
            str(layer.index), layer.name, layer.type, number(layer.act.mean), number(layer.act.std),
            number(layer.grad.std) if layer.grad else "-", _percent(layer.dead_frac),
            _percent(layer.saturation), _gain(layer), codes,
        )
        row = " ".join(_cell(c, w, r) for c, (_, w, r) in zip(cells, _COLUMNS)).rstrip()
        if color and codes:
            row = style(row, fg="red" if set(codes) & set("NEVev") else "yellow")
        lines.append(row)
    used = [f"{code} {kind}" for kind, code in FLAG_CODES.items() if kind in {f.kind for f in report.flags}]
    if used:
        lines.append(shorten("flags: " + ", ".join(used), width))
    if report.flags:
        lines.append("")
        shown: dict[str, list[str]] = {}
        for flag in report.flags:
            layers = shown.setdefault(flag.kind, [])
            layers.append(flag.layer)
            if len(layers) <= MESSAGES_PER_KIND:
                title = style(flag.kind, bold=True) if color else flag.kind
                lines.extend(textwrap.wrap(f"{title}: {flag.message}", width, subsequent_indent="  "))
        for kind, layers in shown.items():
            if len(layers) > MESSAGES_PER_KIND:
                rest = layers[MESSAGES_PER_KIND:]
                lines.extend(textwrap.wrap(
                    f"{kind}: also on {len(rest)} more layer(s): {', '.join(rest)} (all in --format json)",
                    width, subsequent_indent="  "))
    else:
        lines.append("no flags raised")
    return "\n".join(lines)


def render_comparison(comparison, *, color: bool = False, width: int = 80) -> str:  # noqa: ANN001
    """One row per scheme: output/input rms, worst layer gain vs theory, first-layer
    gradient ratio, dead %, saturated %, number of flags, verdict; the best marked ``*``."""
    from click import style

    columns = (("scheme", 18, False), ("out/in", 7, True), ("gain", 7, True),
               ("grad", 7, True), ("dead%", 5, True), ("sat%", 5, True),
               ("flags", 5, True), ("verdict", 19, False))
    lines = [" ".join(_cell(t, w, r) for t, w, r in columns).rstrip()]
    for row in comparison.rows:
        best = row.scheme == comparison.best
        kinds = row.verdict.split(", ")
        verdict = kinds[0] if len(kinds) == 1 else f"{kinds[0]} +{len(kinds) - 1}"
        cells = (("* " if best else "  ") + row.scheme, number(row.output_ratio), number(row.worst_gain),
                 number(row.first_grad_ratio), _pct(row.dead_pct), _pct(row.saturated_pct),
                 str(row.flags), verdict)
        text = " ".join(_cell(c, w, r) for c, (_, w, r) in zip(cells, columns)).rstrip()
        lines.append(style(text, bold=True) if color and best else text)
    lines.append("")
    lines.extend(textwrap.wrap(
        f"best: {comparison.best} (fewest severe flags, then fewest flags, then the layer gain "
        "closest to theory). out/in: output rms / input rms; gain: the layer gain furthest from "
        "theory's (1 = as predicted); grad: first-layer / output gradient rms; verdict: the most "
        "severe flag kind and how many more kinds (--format json has every report).", width))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0f}"
