"""Hold the measured statistics against theory and raise flags that say the fix (SPEC 5).

Inputs are the merged records of a probe (execution order) and the model's
modules; outputs are the report's ``weight`` blocks and its flags. Decisions
where the SPEC is silent (also in the README, "Reading the flags"):

* The nonlinearity that follows a layer is the first activation record after
  it in execution order, looking through normalization, dropout, pooling,
  padding and reshape layers; another parametric layer or anything else
  first means none (``linear``).
* The main path of the forward signal is what each layer *receives*: the
  ``input_rms`` of every record (a residual join is measured by the layer that
  consumes the sum, never by a zero-initialized branch), then the output of
  the last record. Its reference point is the network input, or the output of
  an input embedding (token ids have no meaningful rms).
* Gradients run from the output (the last record with a gradient) back to
  the first record with one, as per-sample norms (``grad.rms * sqrt(units)``),
  which He's fan_in init preserves through width changes and max pooling;
  average pooling's ``1/sqrt(k)`` is divided out, and the gradient between a
  layer and the norm right after it (it scales as ``1/weight``) is skipped.
* A vanishing/exploding flag names the layer from which the signal stays
  beyond the threshold to the deepest point.
* ``init_mismatch`` judges layers whose weight scale compounds with depth: not
  layers next to a normalization (a norm right after it, or a norm among the
  records since the parametric layer before the previous one, as in pre-LN
  blocks), and not embeddings, whose scale is a modelling choice. For layers
  followed by no nonlinearity, both Xavier and LeCun are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from torch import nn

from actstats import theory
from actstats.hooks import RecordSummary
from actstats.report import Flag, InputInfo, LayerReport, WeightInfo
from actstats.weights import WeightFigures, parametric_modules, unit_dim, weight_figures, weight_info

FLAG_KINDS = (
    "vanishing", "exploding", "vanishing_grad", "exploding_grad", "init_mismatch",
    "dead_relu", "saturated", "symmetric", "nonfinite",
)

_TRANSPARENT = theory.NORM_TYPES + (
    nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.ZeroPad2d, nn.Upsample, nn.PixelShuffle,
    nn.ChannelShuffle,
)
_AVERAGING = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
_PROBABILITY_OUTPUTS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
_INIT_OPTION = {"he": "kaiming", "lecun": "lecun", "xavier": "xavier"}
_REFERENCE_NAME = {"he": "He", "lecun": "LeCun", "xavier": "Xavier"}


@dataclass(frozen=True)
class Thresholds:
    """Flag thresholds (SPEC 5 defaults); set any of them from Python or ``--threshold KIND=V``.

    Attributes:
        vanishing, exploding: factor of rms change between the network input and
            the deepest point of the main path.
        vanishing_grad, exploding_grad: the same for gradient rms, output to first layer.
        init_mismatch: factor between a weight's std and its ``expected_std``.
        dead_relu: fraction of units that never fired.
        saturated: fraction of outputs within ``eps`` of an asymptote.
    """

    vanishing: float = 10.0
    exploding: float = 10.0
    vanishing_grad: float = 10.0
    exploding_grad: float = 10.0
    init_mismatch: float = 2.0
    dead_relu: float = 0.5
    saturated: float = 0.5

    @classmethod
    def from_mapping(cls, values: Mapping[str, float] | Thresholds | None) -> Thresholds:
        """Build from a dict of overrides, checking names and values."""
        if values is None:
            return cls()
        if isinstance(values, Thresholds):
            return values
        known = [f.name for f in fields(cls)]
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown threshold {key!r}; expected one of: {', '.join(known)}")
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"threshold {key}={value!r} must be a positive number")
        return cls(**{k: float(v) for k, v in values.items()})


@dataclass(slots=True)
class _Layer:
    """What diagnosis needs about one record."""

    summary: RecordSummary
    module: nn.Module | None
    following: theory.Activation | None
    normalized: bool


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.3g}"


def _kind_of(module: nn.Module | None, summary: RecordSummary) -> str:
    if summary.activation is not None:
        return "activation"
    if module is None:
        return "other"
    if isinstance(module, _TRANSPARENT):
        return "norm" if isinstance(module, theory.NORM_TYPES) else "transparent"
    if theory.is_parametric(module):
        return "parametric"
    return "other"


def _context(summaries: Sequence[RecordSummary], modules: Mapping[str, nn.Module]) -> list[_Layer]:
    """Find, for every record, the activation that follows it and whether a norm is near."""
    mods = [modules.get(s.module_name) if s.module_name is not None else None for s in summaries]
    kinds = [_kind_of(m, s) for m, s in zip(mods, summaries)]
    out = []
    for i, (summary, module) in enumerate(zip(summaries, mods)):
        following = None
        norm_after = False
        for j in range(i + 1, len(summaries)):
            if kinds[j] == "activation":
                following = summaries[j].activation
                break
            if kinds[j] == "norm":
                norm_after = True
            elif kinds[j] != "transparent":
                break
        norm_before = False
        parametric_seen = 0
        for j in range(i - 1, -1, -1):
            if kinds[j] == "norm":
                norm_before = True
                break
            if kinds[j] == "parametric":
                parametric_seen += 1
                if parametric_seen == 2:
                    break
        out.append(_Layer(summary, module, following, norm_after or norm_before))
    return out


def following_activations(
    summaries: Sequence[RecordSummary], modules: Mapping[str, nn.Module]
) -> dict[nn.Module, theory.Activation]:
    """Map each module of a traced forward to the activation that follows it (first call wins)."""
    found: dict[nn.Module, theory.Activation] = {}
    for layer in _context(summaries, modules):
        if layer.module is not None and layer.following is not None:
            found.setdefault(layer.module, layer.following)
    return found


def _mismatch(part: Mapping[str, object]) -> float:
    """Ratio ``std / accepted std``, the accepted std being the closest acceptable reference."""
    std = float(part["std"])  # type: ignore[arg-type]
    accepted = [float(part["expected_std"])]  # type: ignore[arg-type]
    if part["nonlinearity"] == "linear":
        accepted.append(float(part["lecun_std"]))  # type: ignore[arg-type]
    return min((std / a for a in accepted), key=lambda r: abs(math.log(r)) if r > 0 else math.inf)


def _suffix_start(values: Sequence[float], beyond) -> int:  # noqa: ANN001
    """Index of the first value from which every later value is beyond the threshold."""
    start = len(values) - 1
    for i in range(len(values) - 1, -1, -1):
        if not beyond(values[i]):
            break
        start = i
    return start


def _worst_parametric(layers: Sequence[_Layer], weights: Sequence[WeightInfo | None],
                      span: range) -> int | None:
    """The parametric record in ``span`` whose weight std is furthest from theory."""
    best, score = None, -1.0
    for j in span:
        w = weights[j]
        if w is None or isinstance(layers[j].module, nn.Embedding):  # its scale is a modelling choice
            continue
        off = abs(math.log(w.std / w.expected_std)) if w.std > 0 and w.expected_std > 0 else math.inf
        if off > score:
            best, score = j, off
    return best


def _propagation_flags(layers: Sequence[_Layer], weights: Sequence[WeightInfo | None],
                       t: Thresholds) -> list[Flag]:
    # Position of a point = parametric layers before it: the input of record i sits at
    # before[i], its output at before[i + 1].
    before = [0]
    for w in weights:
        before.append(before[-1] + (w is not None))
    # A normalization layer rescales what it receives, so the signal between a layer and
    # the norm right after it (and the gradient there, which scales as 1/weight) is off the
    # main path: the norm's output is what propagates.
    def feeds_norm(i: int) -> bool:
        return i + 1 < len(layers) and isinstance(layers[i + 1].module, theory.NORM_TYPES)

    # Forward: what every layer receives, then the output of the last record.
    points = [(i, before[i], l.summary.input_rms) for i, l in enumerate(layers)
              if not isinstance(l.module, (nn.Embedding, *theory.NORM_TYPES))
              and not math.isnan(l.summary.input_rms)]
    if layers and not isinstance(layers[-1].module, _PROBABILITY_OUTPUTS):
        points.append((len(layers) - 1, before[-1], layers[-1].summary.act.rms))
    flags = _series_flags("forward", (t.vanishing, t.exploding), points, layers, weights)
    # Backward: the per-sample gradient norm (rms * sqrt(units)), from the output back to
    # the first layer. He's fan_in init preserves this norm through width changes, strides
    # and max pooling, where the per-element rms changes with the number of units. Average
    # pooling over k values divides it by sqrt(k) once, whatever the init: undone here.
    grads: list[tuple[int, int, float]] = []
    scale = 1.0
    for i in range(len(layers) - 1, -1, -1):
        s = layers[i].summary
        if s.grad is not None and not feeds_norm(i):
            grads.append((i, before[i + 1], s.grad.rms * math.sqrt(s.act.numel) * scale))
        if isinstance(layers[i].module, _AVERAGING) and s.act.numel:
            scale *= math.sqrt(s.input_numel / s.act.numel)
    flags += _series_flags("backward", (t.vanishing_grad, t.exploding_grad), grads, layers, weights)
    return flags


def _series_flags(direction: str, factors: tuple[float, float], points: Sequence[tuple[int, int, float]],
                  layers: Sequence[_Layer], weights: Sequence[WeightInfo | None]) -> list[Flag]:
    """Flag a series of (record, position, rms) that ends more than a factor from where it started."""
    if len(points) < 2 or not (points[0][2] > 0 and math.isfinite(points[0][2])):
        return []
    base = points[0][2]
    finite = [(i, pos, rms / base) for i, pos, rms in points if not math.isnan(rms)]  # NaN: `nonfinite`
    deepest = finite[-1][2]
    low, high = factors
    if deepest < 1 / low:
        kind, threshold, verb, beyond = "vanishing", 1 / low, "shrink", (lambda r: r < 1 / low)
    elif deepest > high:
        kind, threshold, verb, beyond = "exploding", high, "grow", (lambda r: r > high)
    else:
        return []
    forward = direction == "forward"
    if not forward:
        kind += "_grad"
    at = _suffix_start([r for _, _, r in finite], beyond)
    (first, first_pos, _), (crossing, crossing_pos, reached), (deep, deep_pos, _) = finite[0], finite[at], finite[-1]
    steps = max(1, abs(crossing_pos - first_pos))
    total = max(1, abs(deep_pos - first_pos))
    per_layer = reached ** (1 / steps) if 0 < reached < math.inf else reached
    name = layers[crossing].summary.name
    worst = _worst_parametric(layers, weights, range(min(first, deep), max(first, deep) + 1))
    if worst is not None:
        w = weights[worst]
        ref = _REFERENCE_NAME[w.reference]  # type: ignore[union-attr]
        clause = (f"{ref} predicts x1.00 for {w.nonlinearity}; at {layers[worst].summary.name} "  # type: ignore[union-attr]
                  f"fan_in={w.fan_in}, weight std {_fmt(w.std)} vs {ref} {_fmt(w.expected_std)}")  # type: ignore[union-attr]
        option = _INIT_OPTION[w.reference]  # type: ignore[union-attr]
        # Weights within 5% of theory cannot explain the drift: the architecture does.
        matched = w.std > 0 and abs(math.log(w.std / w.expected_std)) < math.log(1.05)  # type: ignore[union-attr]
    else:
        clause, option, matched = "no parametric layer to hold it against", "kaiming", False
    fix = f"Try --init {option}."
    if matched:
        fix = ("The weights already match theory: add normalization (BatchNorm/LayerNorm) or "
               f"residual connections, or try --init {option}.")
    if forward:
        what, origin, signal = "activations", "the input", "signal"
        consequence = ("deeper layers receive almost no signal and learn slowly" if verb == "shrink"
                       else "the signal overflows and training diverges")
    else:
        what, origin, signal = "gradients", "the output gradient", "gradient"
        consequence = ("early layers get almost no gradient and stop learning" if verb == "shrink"
                       else "early layers get huge updates and training diverges")
    message = (f"{name}: {what} {verb} x{_fmt(per_layer)} per layer ({clause}); after {total} "
               f"layers the {signal} is {_fmt(deepest)} of {origin}, so {consequence}. {fix}")
    return [Flag(kind, name, message, deepest, threshold)]


def _layer_flags(layers: Sequence[_Layer], weights: Sequence[WeightInfo | None],
                 figures: Mapping[nn.Module, WeightFigures], input_info: InputInfo, batches: int,
                 t: Thresholds, eps: float) -> list[Flag]:
    flags: list[Flag] = []
    # Non-finite values: the first record of the forward pass, and of the backward pass.
    if input_info.nonfinite:
        flags.append(Flag("nonfinite", "input",
                          f"input: {input_info.nonfinite} input values are NaN or Inf before the first "
                          "layer, so every statistic downstream is unusable. Clean the data (check "
                          "for missing values, divisions by zero in preprocessing).",
                          float(input_info.nonfinite), 0.0))
    else:
        for layer in layers:
            act = layer.summary.act
            if act.nonfinite:
                flags.append(Flag("nonfinite", layer.summary.name,
                                  f"{layer.summary.name}: {act.nonfinite} of {act.numel} outputs are NaN or "
                                  "Inf, the first non-finite values of the forward pass; every layer after "
                                  "it computes on garbage. If the signal grows before this layer, fix the "
                                  "init (try --init kaiming or xavier); otherwise guard the operation "
                                  "(an eps in divisions and logs) or compute it in float32.",
                                  float(act.nonfinite), 0.0))
                break
    for layer in reversed(layers):
        grad = layer.summary.grad
        if grad is not None and grad.nonfinite:
            flags.append(Flag("nonfinite", layer.summary.name,
                              f"{layer.summary.name}: the gradient w.r.t. its output holds {grad.nonfinite} "
                              "NaN or Inf values, the first non-finite gradient of the backward pass; no "
                              "parameter before it gets a usable update. Fix the forward overflow first, "
                              "or lower the loss scale.",
                              float(grad.nonfinite), 0.0))
            break
    judged: set[int] = set()
    for layer, w in zip(layers, weights):
        s = layer.summary
        if s.dead_frac is not None and s.dead_frac > t.dead_relu:
            flags.append(Flag("dead_relu", s.name,
                              f"{s.name}: {100 * s.dead_frac:.0f}% of units never produced a positive output "
                              f"over {batches} batch(es); a dead ReLU passes no gradient and never recovers. "
                              "He init with zero biases keeps half of each unit's pre-activations positive: "
                              "check for large negative biases or inputs shifted far below zero. "
                              "Try --init kaiming.", s.dead_frac, t.dead_relu))
        if s.saturation is not None and s.saturation > t.saturated:
            a = s.activation
            flags.append(Flag("saturated", s.name,
                              f"{s.name}: {100 * s.saturation:.0f}% of outputs lie within {eps} of the "
                              f"asymptotes {_fmt(a.low)} and {_fmt(a.high)}, where the derivative is nearly 0, "  # type: ignore[union-attr]
                              "so gradients die here. Xavier keeps pre-activations near unit variance, in "
                              "the near-linear range. Try --init xavier, or normalize the inputs.",
                              s.saturation, t.saturated))
        module = layer.module
        if w is None or module is None or id(module) in judged:
            continue
        judged.add(id(module))
        fig = figures[module]
        if fig.symmetric:
            w0 = (fig.sources or theory.weight_parts(module))[0].tensor
            units = w0.shape[1] if isinstance(module, nn.Embedding) else w0.shape[unit_dim(module)]
            value = fig.first
            flags.append(Flag("symmetric", s.name,
                              f"{s.name}: all {units} units have identical weights (every weight {_fmt(value)}) "
                              "and biases, so they compute the same function and receive the same gradient: "
                              "training can never tell them apart. Try --init kaiming (random weights).",
                              w.std, 0.0))
            continue
        if layer.normalized or isinstance(module, nn.Embedding):
            continue
        parts = list(w.parts) if w.parts else [{
            "name": "weight", "std": w.std, "expected_std": w.expected_std, "lecun_std": w.lecun_std,
            "nonlinearity": w.nonlinearity, "reference": w.reference, "fan_in": w.fan_in, "fan_out": w.fan_out}]
        worst = max(parts, key=lambda p: abs(math.log(_mismatch(p))) if _mismatch(p) > 0 else math.inf)
        ratio = _mismatch(worst)
        if ratio > 0 and abs(math.log(ratio)) > math.log(t.init_mismatch):
            ref = _REFERENCE_NAME[worst["reference"]]  # type: ignore[index]
            where = "" if worst["name"] == "weight" else f" ({worst['name']})"
            flags.append(Flag("init_mismatch", s.name,
                              f"{s.name}{where}: weight std {_fmt(float(worst['std']))} is x{_fmt(ratio)} the "  # type: ignore[arg-type]
                              f"{ref} std {_fmt(float(worst['expected_std']))} for {worst['nonlinearity']} "  # type: ignore[arg-type]
                              f"(fan_in={worst['fan_in']}, fan_out={worst['fan_out']}); without a "
                              f"normalization each such layer scales the signal by about x{_fmt(ratio)}, "
                              f"compounding with depth. Try --init {_INIT_OPTION[worst['reference']]}.",  # type: ignore[index]
                              ratio, t.init_mismatch))
    return flags


def diagnose(
    summaries: Sequence[RecordSummary],
    modules: Mapping[str, nn.Module],
    input_info: InputInfo,
    *,
    batches: int,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    eps: float = 0.01,
    figures: Mapping[nn.Module, WeightFigures] | None = None,
) -> tuple[tuple[LayerReport, ...], tuple[Flag, ...]]:
    """Compute every record's ``weight`` block and the report's flags.

    ``figures`` are the weights' measured figures (:func:`weight_figures`); when
    None they are measured here, with a transfer of their own.

    Returns:
        The layers (execution order, each with its weight block and the kinds
        flagged on it) and the flags (forward/backward non-finite first, then
        propagation, then per-layer flags in execution order).
    """
    t = Thresholds.from_mapping(thresholds)
    if figures is None:
        vector, decode = weight_figures(parametric_modules([s.module_name for s in summaries], modules))
        figures = decode(vector.cpu().numpy()) if vector is not None else {}
    layers = _context(summaries, modules)
    weights = [weight_info(layer.module, layer.following, layer.summary, figures) for layer in layers]
    per_layer = _layer_flags(layers, weights, figures, input_info, batches, t, eps)
    propagation = _propagation_flags(layers, weights, t)
    nonfinite = [f for f in per_layer if f.kind == "nonfinite"]
    others = [f for f in per_layer if f.kind != "nonfinite"]
    flags = tuple(nonfinite + propagation + others)
    kinds: dict[str, list[str]] = {}
    for flag in flags:
        kinds.setdefault(flag.layer, []).append(flag.kind)
    reports = tuple(
        LayerReport(name=s.name, type=s.type, index=s.index, act=s.act, input_rms=s.input_rms,
                    grad=s.grad, dead_frac=s.dead_frac, saturation=s.saturation, weight=w,
                    flags=tuple(dict.fromkeys(kinds.get(s.name, ()))))
        for s, w in zip(summaries, weights)
    )
    return reports, flags


__all__ = ["FLAG_KINDS", "Thresholds", "diagnose", "following_activations"]
