"""Named weight-initialization schemes and :func:`init_weights` (SPEC 7).

A scheme is written ``name`` or ``name:key=value,key=value`` (``kaiming:mode=fan_out``,
``constant:val=0.0042,bias=0.0042``). Weights are laid out as ``torch.nn.init``
assumes (``[fan_out, fan_in, *kernel]``) and fans come from
:func:`actstats.theory.fans`. Kaiming and orthogonal take their gain from the
activation that follows each layer; recurrent gates and attention projections
are initialized chunk by chunk, each with its own fans and gate nonlinearity.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import init
from torch.nn.parameter import is_lazy

from actstats.errors import InitError, UnknownSchemeError
from actstats.theory import Activation, fans, gain, he_std, lecun_std, module_activation, xavier_std

_COMMON = ("bias", "lstm_forget_bias")

#: Canonical scheme name -> the parameters it accepts (SPEC 7).
SCHEME_PARAMS: Mapping[str, tuple[str, ...]] = {
    "default": (),
    "torch_default": _COMMON,
    "zeros": _COMMON,
    "constant": ("val", *_COMMON),
    "normal": ("std", *_COMMON),
    "uniform": ("a", *_COMMON),
    "xavier_uniform": ("gain", *_COMMON),
    "xavier_normal": ("gain", *_COMMON),
    "kaiming_uniform": ("mode", *_COMMON),
    "kaiming_normal": ("mode", *_COMMON),
    "lecun_normal": _COMMON,
    "lecun_uniform": _COMMON,
    "orthogonal": _COMMON,
    "trunc_normal": ("std", *_COMMON),
    "lsuv": ("tol", *_COMMON),
}

#: The canonical scheme names, in the order of SPEC 7.
SCHEME_NAMES: tuple[str, ...] = tuple(SCHEME_PARAMS)

#: Alias -> canonical scheme name.
ALIASES: Mapping[str, str] = {
    "xavier": "xavier_normal", "glorot": "xavier_normal",
    "kaiming": "kaiming_normal", "he": "kaiming_normal", "msra": "kaiming_normal",
    "lecun": "lecun_normal",
}

_REQUIRED = {"constant": "val", "normal": "std", "uniform": "a", "trunc_normal": "std"}
_POSITIVE = {"std", "a", "tol"}
_CHOICES = {"mode": ("fan_in", "fan_out"), "gain": ("auto",)}
_LSUV_TOL, _LSUV_MAX_ITER = 0.01, 10


@dataclass(frozen=True)
class SchemeSpec:
    """A parsed init scheme.

    Attributes:
        name: the canonical scheme name (aliases resolved).
        params: the parameters given, as numbers (``mode`` and ``gain=auto`` as strings).
        text: the scheme as the user wrote it.
    """

    name: str
    params: dict[str, float | str] = field(default_factory=dict, hash=False)
    text: str = ""

    @property
    def canonical(self) -> str:
        """The scheme written with its canonical name: ``kaiming_normal:mode=fan_out``."""
        args = ",".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.name}:{args}" if args else self.name


@dataclass(frozen=True)
class InitSummary:
    """What :func:`init_weights` did, by parameter name as in ``model.named_parameters()``.

    Attributes:
        scheme: the scheme as given.
        initialized: parameters the scheme set.
        untouched: parameters left alone because their module type is unknown.
    """

    scheme: str
    initialized: tuple[str, ...] = ()
    untouched: tuple[str, ...] = ()


def parse_scheme(text: str) -> SchemeSpec:
    """Parse ``name`` or ``name:key=value,...`` into a :class:`SchemeSpec`.

    Raises:
        UnknownSchemeError: an unknown name or parameter, a missing or malformed value.

    Example:
        >>> parse_scheme("he:mode=fan_out").params
        {'mode': 'fan_out'}
    """
    raw_name, _, raw_args = text.strip().partition(":")
    name = ALIASES.get(raw_name.strip().lower(), raw_name.strip().lower())
    if name not in SCHEME_PARAMS:
        known = sorted((*SCHEME_NAMES, *ALIASES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownSchemeError(
            f"unknown init scheme {raw_name.strip()!r}; expected one of: {', '.join(known)}{hint}"
        )
    allowed = SCHEME_PARAMS[name]
    accepts = f"{name} accepts: {', '.join(allowed)}" if allowed else f"{name} accepts no parameters"
    params: dict[str, float | str] = {}
    for item in filter(None, (part.strip() for part in raw_args.split(","))):
        key, _, value = (s.strip() for s in item.partition("="))
        key = key.lower()
        if key not in allowed:
            raise UnknownSchemeError(f"unknown parameter {key!r} in init scheme {text!r}; {accepts}")
        if key in params:
            raise UnknownSchemeError(f"parameter {key!r} is given twice in init scheme {text!r}")
        if not value:
            raise UnknownSchemeError(
                f"parameter {key!r} in init scheme {text!r} has no value; write {key}=VALUE"
            )
        params[key] = _parse_value(key, value, text)
    required = _REQUIRED.get(name)
    if required is not None and required not in params:
        raise UnknownSchemeError(
            f"init scheme {text!r} needs parameter {required!r} (e.g. '{name}:{required}=0.1'); {accepts}"
        )
    return SchemeSpec(name, params, text)


def _parse_value(key: str, value: str, text: str) -> float | str:
    choices = _CHOICES.get(key, ())
    if value.lower() in choices:
        return value.lower()
    if key == "mode":
        raise UnknownSchemeError(
            f"parameter 'mode' in init scheme {text!r} must be one of: fan_in, fan_out, got {value!r}"
        )
    try:
        number = float(value)
    except ValueError:
        also = " or 'auto'" if choices else ""
        raise UnknownSchemeError(
            f"parameter {key!r} in init scheme {text!r} must be a number{also}, got {value!r}"
        ) from None
    if not math.isfinite(number) or (key in _POSITIVE and number <= 0):
        kind = "a positive number" if key in _POSITIVE else "a finite number"
        raise UnknownSchemeError(f"parameter {key!r} in init scheme {text!r} must be {kind}, got {value!r}")
    return number


# --- which activation follows which layer ---------------------------------------------

_NORMS: tuple[type[nn.Module], ...] = tuple(
    cls for cls in (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if cls is not None
)
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)
_LSUV_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def static_following_activations(model: nn.Module) -> dict[nn.Module, Activation]:
    """Guess the activation module that follows each parametric layer, from registration order.

    The fallback used when no traced execution order is given: walking
    ``model.named_modules()``, each module that owns parameters (norm layers
    excepted) is paired with the first activation module registered after it
    and before the next such layer; norm, dropout, pooling and other modules in
    between are skipped. Functional activations (``F.relu`` inside ``forward``)
    are invisible to it, and layers it pairs with nothing get gain 1.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        >>> static_following_activations(net)[net[0]].nonlinearity
        'relu'
    """
    following: dict[nn.Module, Activation] = {}
    pending: nn.Module | None = None
    for _, module in model.named_modules():
        activation = module_activation(module)
        if activation is not None:
            if pending is not None:
                following[pending] = activation
                pending = None
        elif _owns_parameters(module) and not isinstance(module, _NORMS):
            pending = module
    return following


# --- per-module initialization ---------------------------------------------------------

Fill = Callable[[torch.Tensor, float], None]


def _weight_filler(spec: SchemeSpec, generator: torch.Generator | None) -> Fill:
    """Return ``fill(weight, gain)`` for ``spec``; ``gain`` is that of the following nonlinearity.

    Kaiming (He et al. 2015): ``std = gain / sqrt(fan)``, fan_in or fan_out per ``mode``.
    Xavier (Glorot & Bengio 2010): ``std = gain * sqrt(2 / (fan_in + fan_out))``, gain 1
    unless ``gain=auto`` (the nonlinearity's) or a number. LeCun (1998):
    ``std = 1 / sqrt(fan_in)``. Uniform variants draw from ``U(-sqrt(3) std, sqrt(3) std)``.
    Orthogonal (Saxe et al. 2014) is scaled by the gain; ``trunc_normal:std=S`` draws
    N(0, S²) truncated at ±2S (timm/ViT), so its sample std is about 0.88 S.
    """
    name, params = spec.name, spec.params

    def fill(weight: torch.Tensor, act_gain: float) -> None:
        if weight.numel() == 0:
            return
        if name == "zeros":
            weight.zero_()
        elif name == "constant":
            weight.fill_(float(params["val"]))
        elif name == "normal":
            init.normal_(weight, 0.0, float(params["std"]), generator=generator)
        elif name == "uniform":
            bound = float(params["a"])
            init.uniform_(weight, -bound, bound, generator=generator)
        elif name == "trunc_normal":
            std = float(params["std"])
            init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
        elif name in ("orthogonal", "lsuv"):
            init.orthogonal_(weight, gain=act_gain, generator=generator)
        else:
            fan_in, fan_out = fans(weight)
            if name.startswith("xavier"):
                scale = params.get("gain", 1.0)
                std = (act_gain if scale == "auto" else float(scale)) * xavier_std(fan_in, fan_out)
            elif name.startswith("kaiming"):
                std = he_std(fan_out if params.get("mode") == "fan_out" else fan_in, act_gain)
            else:
                std = lecun_std(fan_in)
            if name.endswith("_uniform"):
                bound = math.sqrt(3.0) * std
                init.uniform_(weight, -bound, bound, generator=generator)
            else:
                init.normal_(weight, 0.0, std, generator=generator)

    return fill


_WEIGHT_CHUNKS = ("weight_ih", "weight_hh", "in_proj_weight")
_WHOLE_WEIGHTS = ("weight_hr", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_CHUNK_BIASES = ("bias_ih", "bias_hh", "in_proj_bias", "bias_k", "bias_v")


def _chunk_nonlinearities(module: nn.Module) -> tuple[str, ...]:
    """The nonlinearity applied to each row chunk of a stacked weight."""
    mode = getattr(module, "mode", None)  # RNNBase: LSTM, GRU, RNN_TANH or RNN_RELU
    if mode == "LSTM":
        return ("sigmoid", "sigmoid", "tanh", "sigmoid")  # i, f, g, o
    if mode == "GRU":
        return ("sigmoid", "sigmoid", "tanh")  # r, z, n
    if mode in ("RNN_TANH", "RNN_RELU"):
        return (mode[4:].lower(),)
    return ("linear", "linear", "linear")  # MultiheadAttention's q, k, v


def _init_chunked(module: nn.Module, fill: Fill | None, bias: float | None, forget: float | None) -> set[str]:
    """RNN/LSTM/GRU per gate chunk and MultiheadAttention per q, k, v chunk, each with its own fans."""
    gates = _chunk_nonlinearities(module)
    done: set[str] = set()
    for name, param in module.named_parameters(recurse=False):
        if name.startswith(_WEIGHT_CHUNKS):
            chunks = list(zip(param.chunk(len(gates)), gates))
        elif name.startswith(_WHOLE_WEIGHTS):  # LSTM projection, separate q/k/v: nothing nonlinear follows
            chunks = [(param, "linear")]
        elif name.startswith(_CHUNK_BIASES):
            chunks = []
            if bias is not None:
                param.fill_(bias)
            if forget is not None and len(gates) == 4:  # LSTM
                # The gate sees bias_ih + bias_hh: the whole forget bias goes into bias_ih.
                size = param.shape[0] // 4
                param[size:2 * size].fill_(forget if name.startswith("bias_ih") else 0.0)
        else:
            continue
        if fill is not None:
            for chunk, nonlinearity in chunks:
                fill(chunk, gain(nonlinearity))
        done.add(name)
    return done


def _init_module(
    module: nn.Module, fill: Fill | None, bias: float | None, forget: float | None, act_gain: float
) -> set[str] | None:
    """Initialize the parameters ``module`` owns; return the names set, or None for an unknown type."""
    names = {name for name, _ in module.named_parameters(recurse=False)}
    if isinstance(module, _NORMS):
        if "weight" in names:
            module.weight.fill_(1.0)
        if "bias" in names:
            module.bias.zero_()
        reset_stats = getattr(module, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()
        return names & {"weight", "bias"}
    if isinstance(module, _WEIGHTED):
        if "weight" in names and fill is not None:
            fill(module.weight, act_gain)
            padding_idx = getattr(module, "padding_idx", None)
            if padding_idx is not None:
                module.weight[padding_idx].zero_()
        if "bias" in names and bias is not None:
            module.bias.fill_(bias)
        return names & {"weight", "bias"}
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return _init_chunked(module, fill, bias, forget)
    return None


def _reset_all(model: nn.Module, generator: torch.Generator | None) -> set[int]:
    """Call each parameter owner's ``reset_parameters``, children before parents as at construction."""
    done: set[int] = set()
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    seed = None
    if generator is not None:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:  # only the generators the model's parameters draw from
            torch.random.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        for module in reversed(list(model.modules())):
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if _owns_parameters(module) and callable(reset):
                reset()
                done.update(id(p) for p in module.parameters(recurse=False))
    return done


# --- LSUV ------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by an LSUV hook once the layer's output is seen: the rest of the forward is not needed."""


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _execution_order(model: nn.Module, inputs: Any) -> list[nn.Module]:
    order: list[nn.Module] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if module not in order:  # a layer called twice is normalized at its first call
            order.append(module)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, _LSUV_LAYERS)]
    try:
        _call(model, inputs)
    except Exception as err:
        raise InitError(f"lsuv: forward of the model ({type(model).__name__}) failed: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    return order


def _output_variance(model: nn.Module, layer: nn.Module, name: str, inputs: Any) -> float | None:
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            seen.append(output.detach().double().var(correction=0))
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        _call(model, inputs)
    except _StopForward:
        pass
    except Exception as err:
        raise InitError(f"lsuv: forward failed while normalizing layer {name!r}: {err}") from err
    finally:
        handle.remove()
    return float(seen[0]) if seen else None


def _lsuv(model: nn.Module, inputs: Any, tol: float) -> None:
    """Mishkin & Matas (2015), "All you need is a good init": unit output variance per layer.

    Each Linear/Conv/ConvTranspose layer, in execution order, has its weight scaled
    by ``1 / sqrt(Var[output])`` (population variance over the whole output on the
    probe batch) until ``|Var - 1| < tol``, at most 10 times. The forward runs in the
    model's own mode (call ``model.eval()`` first to keep dropout out of the
    variances); every module's ``training`` flag is restored and norm layers'
    running statistics are reset afterwards.
    """
    names = {module: name or type(module).__name__ for name, module in model.named_modules()}
    modes = {module: module.training for module in model.modules()}
    try:
        for layer in _execution_order(model, inputs):
            if not isinstance(getattr(layer, "weight", None), nn.Parameter):
                continue
            for _ in range(_LSUV_MAX_ITER):
                var = _output_variance(model, layer, names[layer], inputs)
                if var is None or abs(var - 1.0) < tol:
                    break
                if var == 0.0 or not math.isfinite(var):
                    why = "all outputs equal" if var == 0.0 else "non-finite outputs"
                    raise InitError(
                        f"lsuv cannot normalize layer {names[layer]!r}: its output variance on the probe "
                        f"batch is {var} ({why}); check the inputs or use another scheme"
                    )
                layer.weight.mul_(var ** -0.5)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for module in model.modules():  # the probe forwards must not leave running statistics behind
            if isinstance(module, _NORMS) and callable(getattr(module, "reset_running_stats", None)):
                module.reset_running_stats()


# --- entry point -----------------------------------------------------------------------

def init_weights(
    model: nn.Module,
    scheme: str | SchemeSpec,
    *,
    generator: torch.Generator | None = None,
    nonlinearities: Mapping[nn.Module, Activation] | None = None,
    inputs: Any = None,
) -> InitSummary:
    """Re-initialize ``model`` in place with a named scheme (SPEC 7).

    Known modules: Linear, Conv/ConvTranspose 1-3d, Bilinear, Embedding(Bag) (the
    ``padding_idx`` row stays zero), RNN/LSTM/GRU (per gate chunk, the gate's
    sigmoid/tanh giving the gain), MultiheadAttention (per q, k, v chunk, gain 1)
    and norm layers (weight 1, bias 0, running statistics reset). Biases are set
    to 0, or to ``bias=V``. PReLU keeps its learned slope (in neither list).
    Parameters owned by any other module are left alone and listed in ``untouched``.

    Args:
        model: the module to initialize; changed in place under ``torch.no_grad()``.
        scheme: a scheme string (see :func:`parse_scheme`) or a parsed :class:`SchemeSpec`.
        generator: the source of every random draw, on the parameters' device
            (``torch_default``: it seeds a forked global RNG, which is left as it was).
        nonlinearities: the activation following each layer (absent: identity, gain 1);
            None falls back to :func:`static_following_activations`.
        inputs: one batch for ``lsuv``: a tensor, a tuple of positional tensors or a dict of kwargs.

    Returns:
        The parameter names initialized and those left alone (``default``: both empty;
        ``torch_default``: the parameters of every module with a ``reset_parameters``).

    Raises:
        UnknownSchemeError: a malformed scheme, before the model is touched.
        InitError: ``lsuv`` without inputs, or a layer whose output variance is 0 or not
            finite (the model's parameters and buffers are then restored).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> init_weights(net, "kaiming").initialized
        ('0.weight', '0.bias', '2.weight', '2.bias')
    """
    spec = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    if not isinstance(scheme, str):
        parse_scheme(spec.canonical)  # validate a hand-built spec before touching the model
    text = spec.text or spec.canonical
    if spec.name == "lsuv" and inputs is None:
        raise InitError(
            "init scheme 'lsuv' needs a probe batch: pass inputs= (a tensor, a tuple of "
            "positional tensors or a dict of keyword arguments), or use another scheme"
        )
    if spec.name == "default":
        return InitSummary(text)
    following = static_following_activations(model) if nonlinearities is None else nonlinearities
    params = spec.params
    reset = spec.name == "torch_default"
    fill = None if reset else _weight_filler(spec, generator)
    bias = params.get("bias", None if reset else 0.0)
    forget = params.get("lstm_forget_bias")
    tensors = (*model.parameters(), *model.buffers())
    saved = [(t, t.detach().clone()) for t in tensors] if spec.name == "lsuv" else []
    done: set[int] = set()
    skipped: set[int] = set()
    with torch.no_grad():
        if reset:
            done |= _reset_all(model, generator)
        for module in model.modules():
            own = list(module.named_parameters(recurse=False))
            if not own or isinstance(module, nn.PReLU):
                continue
            activation = following.get(module)
            act_gain = 1.0 if activation is None else gain(activation.nonlinearity, activation.param)
            lazy = any(is_lazy(p) for _, p in own)
            handled = None if lazy else _init_module(
                module, fill, None if bias is None else float(bias),
                None if forget is None else float(forget), act_gain,
            )
            for name, param in own:
                (done if handled is not None and name in handled else skipped).add(id(param))
        if spec.name == "lsuv":
            try:
                _lsuv(model, inputs, float(params.get("tol", _LSUV_TOL)))
            except InitError:
                for tensor, value in saved:
                    tensor.copy_(value)
                raise
    named = list(model.named_parameters())
    return InitSummary(
        text,
        tuple(name for name, p in named if id(p) in done),
        tuple(name for name, p in named if id(p) in skipped and id(p) not in done),
    )
