"""Initialization theory: activation families, gains, fans and the Xavier/He/LeCun stds.

Pure functions of modules and numbers; nothing here runs a model.

Conventions follow ``torch.nn.init``:

* fans come from ``torch.nn.init._calculate_fan_in_and_fan_out`` on the weight
  as stored (``[fan_out, fan_in, *kernel]`` for Linear/Conv, which makes
  ConvTranspose's "fan_in" its ``out_channels / groups * prod(kernel)``);
* gains are ``torch.nn.init.calculate_gain``'s, extended to the ReLU-like
  activations it does not name (GELU, SiLU, ELU, Mish, ... take ReLU's sqrt(2));
* ``xavier_std = sqrt(2 / (fan_in + fan_out))`` (Glorot & Bengio 2010, gain 1),
  ``he_std = gain / sqrt(fan_in)`` (He et al. 2015),
  ``lecun_std = 1 / sqrt(fan_in)`` (LeCun et al. 1998; Klambauer et al. 2017 for SELU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

Reference = Literal["he", "lecun", "xavier"]

#: The nonlinearity names actstats knows, with ``"linear"`` meaning none.
NONLINEARITIES = (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu",
    "mish", "hardswish", "softplus", "tanh", "sigmoid", "hardtanh", "softsign",
)

_RELU_LIKE = {"relu", "relu6", "elu", "gelu", "silu", "mish", "hardswish", "softplus"}


@dataclass(frozen=True)
class Activation:
    """An activation function as actstats classifies it.

    Attributes:
        nonlinearity: one of :data:`NONLINEARITIES`.
        param: the negative slope of a leaky ReLU / PReLU, else None.
        family: ``"relu"`` (dead units counted), ``"saturating"`` (saturation
            counted) or ``"other"``.
        low, high: the asymptotes of a saturating activation.
    """

    nonlinearity: str
    param: float | None = None
    family: Literal["relu", "saturating", "other"] = "other"
    low: float = 0.0
    high: float = 0.0


def gain(nonlinearity: str, param: float | None = None) -> float:
    """Return the gain of ``nonlinearity`` as ``torch.nn.init.calculate_gain`` defines it.

    ReLU-like activations that torch does not name take ReLU's ``sqrt(2)``;
    ``hardtanh`` and ``softsign`` are treated like ``tanh``'s linear regime, gain 1.

    Example:
        >>> gain("leaky_relu", 0.2) == math.sqrt(2 / (1 + 0.2**2))
        True
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(
            f"unknown nonlinearity {nonlinearity!r}; expected one of: {', '.join(NONLINEARITIES)}"
        )
    if nonlinearity in _RELU_LIKE:
        return math.sqrt(2.0)
    if nonlinearity in ("hardtanh", "softsign"):
        return 1.0
    return float(torch.nn.init.calculate_gain(nonlinearity, param))  # type: ignore[arg-type]


def reference_scheme(nonlinearity: str) -> Reference:
    """Return the init scheme that suits ``nonlinearity``: he, lecun or xavier (SPEC 5)."""
    if nonlinearity in _RELU_LIKE or nonlinearity == "leaky_relu":
        return "he"
    if nonlinearity == "selu":
        return "lecun"
    return "xavier"


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` of a weight exactly as ``torch.nn.init`` computes them."""
    return torch.nn.init._calculate_fan_in_and_fan_out(weight)


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Glorot & Bengio (2010): ``sqrt(2 / (fan_in + fan_out))``, gain 1."""
    return math.sqrt(2.0 / (fan_in + fan_out))


def he_std(fan_in: int, gain_value: float) -> float:
    """He et al. (2015), fan_in mode: ``gain / sqrt(fan_in)``."""
    return gain_value / math.sqrt(fan_in)


def lecun_std(fan_in: int) -> float:
    """LeCun normal: ``1 / sqrt(fan_in)``."""
    return 1.0 / math.sqrt(fan_in)


def expected_std(reference: Reference, fan_in: int, fan_out: int, gain_value: float) -> float:
    """Return the std of the ``reference`` scheme for a layer with these fans."""
    if reference == "he":
        return he_std(fan_in, gain_value)
    if reference == "lecun":
        return lecun_std(fan_in)
    return xavier_std(fan_in, fan_out)


# --- activation taxonomy ----------------------------------------------------------

_RELU = Activation("relu", family="relu")
_RELU6 = Activation("relu6", family="relu", low=0.0, high=6.0)
_SIGMOID = Activation("sigmoid", family="saturating", low=0.0, high=1.0)
_TANH = Activation("tanh", family="saturating", low=-1.0, high=1.0)

_MODULE_ACTIVATIONS: dict[type, Activation] = {
    nn.ReLU: _RELU,
    nn.ReLU6: _RELU6,
    nn.ELU: Activation("elu"),
    nn.CELU: Activation("elu"),
    nn.SELU: Activation("selu"),
    nn.GELU: Activation("gelu"),
    nn.SiLU: Activation("silu"),
    nn.Mish: Activation("mish"),
    nn.Hardswish: Activation("hardswish"),
    nn.Softplus: Activation("softplus"),
    nn.Sigmoid: _SIGMOID,
    nn.Hardsigmoid: Activation("sigmoid", family="saturating", low=0.0, high=1.0),
    nn.Tanh: _TANH,
    nn.Softsign: Activation("softsign", family="saturating", low=-1.0, high=1.0),
}


def module_activation(module: nn.Module) -> Activation | None:
    """Classify an activation module, or return None for anything else."""
    if isinstance(module, nn.LeakyReLU):
        return Activation("leaky_relu", param=float(module.negative_slope))
    if isinstance(module, nn.PReLU):
        # The learned slope; its mean stands for all channels.
        return Activation("leaky_relu", param=float(module.weight.detach().mean()))
    if isinstance(module, nn.ReLU6):  # ReLU6 subclasses Hardtanh: test it first
        return _RELU6
    if isinstance(module, nn.Hardtanh):
        return Activation(
            "hardtanh", family="saturating", low=float(module.min_val), high=float(module.max_val)
        )
    for cls in type(module).__mro__:
        if cls in _MODULE_ACTIVATIONS:
            return _MODULE_ACTIVATIONS[cls]
    return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: float) -> float:
    if len(args) > index and not isinstance(args[index], bool):
        return float(args[index])
    value = kwargs.get(name, default)
    return float(value)


#: Functional activations recorded inside ``forward``: function -> (type name, nonlinearity).
FUNCTIONAL_ACTIVATIONS: dict[Any, tuple[str, str]] = {}


def _register(func: Any, type_name: str, nonlinearity: str) -> None:
    if func is not None:
        FUNCTIONAL_ACTIVATIONS[func] = (type_name, nonlinearity)


for _name in ("relu", "relu_", "relu6", "gelu", "silu", "leaky_relu", "leaky_relu_", "elu",
              "elu_", "selu", "selu_", "hardtanh", "hardtanh_", "tanh", "sigmoid", "mish",
              "hardswish", "hardsigmoid", "softplus", "celu", "softsign"):
    _nl = {"relu_": "relu", "leaky_relu_": "leaky_relu", "elu_": "elu", "selu_": "selu",
           "hardtanh_": "hardtanh", "hardsigmoid": "sigmoid", "celu": "elu"}.get(_name, _name)
    _register(getattr(F, _name, None), f"F.{_name}", _nl)
for _name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "selu", "selu_"):
    _register(getattr(torch, _name, None), f"torch.{_name}", _name.rstrip("_"))
for _name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"):
    _register(getattr(torch.Tensor, _name, None), f"Tensor.{_name}", _name.rstrip("_"))


def functional_activation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Activation:
    """Classify a call of a function in :data:`FUNCTIONAL_ACTIVATIONS`."""
    nonlinearity = FUNCTIONAL_ACTIVATIONS[func][1]
    if nonlinearity == "leaky_relu":
        return Activation("leaky_relu", param=_arg(args, kwargs, 1, "negative_slope", 0.01))
    if nonlinearity == "hardtanh":
        low = _arg(args, kwargs, 1, "min_val", -1.0)
        high = _arg(args, kwargs, 2, "max_val", 1.0)
        return Activation("hardtanh", family="saturating", low=low, high=high)
    if nonlinearity == "relu":
        return _RELU
    if nonlinearity == "relu6":
        return _RELU6
    if nonlinearity == "sigmoid":
        return _SIGMOID
    if nonlinearity == "tanh":
        return _TANH
    if nonlinearity == "softsign":
        return Activation("softsign", family="saturating", low=-1.0, high=1.0)
    return Activation(nonlinearity)


# --- parametric layers ---------------------------------------------------------------

#: Normalization layers: they rescale whatever they receive, so the weight scale
#: of the layer before them does not compound across depth.
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}
_GATE_NONLINEARITY = {"i": "sigmoid", "f": "sigmoid", "o": "sigmoid", "r": "sigmoid", "z": "sigmoid",
                      "g": "tanh", "n": "tanh"}


@dataclass(frozen=True)
class WeightPart:
    """A weight (or a chunk of one) that theory judges on its own.

    Attributes:
        name: ``weight`` for a plain layer; ``weight_ih_l0[f]`` for an LSTM gate,
            ``in_proj_weight[q]`` for an attention projection.
        tensor: the weight values (a view into the parameter).
        nonlinearity: the activation applied to this part's output inside the
            layer (an RNN gate's sigmoid/tanh, ``linear`` for attention
            projections), or None when it is whatever follows the layer.
    """

    name: str
    tensor: torch.Tensor
    nonlinearity: str | None = None


def is_parametric(module: nn.Module) -> bool:
    """True for the layer types theory judges (SPEC 5)."""
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.Bilinear,
                               nn.RNNBase, nn.MultiheadAttention))


def weight_parts(module: nn.Module) -> list[WeightPart]:
    """Split a parametric layer's weights into the parts theory judges separately.

    Linear, ConvNd, ConvTransposeNd, Embedding and Bilinear have one part. RNN,
    LSTM and GRU have one part per gate chunk of every ``weight_ih_l*`` and
    ``weight_hh_l*`` (LSTM chunks ``[i, f, g, o]``, GRU ``[r, z, n]``, the layout
    of ``torch.nn.LSTM``). MultiheadAttention has q, k and v parts (chunks of
    ``in_proj_weight``, or the separate ``*_proj_weight``) and ``out_proj``.
    """
    if isinstance(module, nn.RNNBase):
        parts = []
        gates = _GATES.get(module.mode)
        for name, param in module.named_parameters(recurse=False):
            if not name.startswith("weight_"):
                continue
            if name.startswith("weight_hr"):  # LSTM projection: a plain linear map
                parts.append(WeightPart(name, param.detach(), "linear"))
            elif gates is None:  # RNN_TANH / RNN_RELU
                parts.append(WeightPart(name, param.detach(), "relu" if module.mode == "RNN_RELU" else "tanh"))
            else:
                for gate, chunk in zip(gates, param.detach().chunk(len(gates), 0)):
                    parts.append(WeightPart(f"{name}[{gate}]", chunk, _GATE_NONLINEARITY[gate]))
        return parts
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            q, k, v = module.in_proj_weight.detach().chunk(3, 0)
            parts = [WeightPart(f"in_proj_weight[{n}]", t, "linear") for n, t in zip("qkv", (q, k, v))]
        else:
            parts = [WeightPart(f"{n}_proj_weight", getattr(module, f"{n}_proj_weight").detach(), "linear")
                     for n in "qkv"]
        parts.append(WeightPart("out_proj.weight", module.out_proj.weight.detach(), None))
        return parts
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return [WeightPart("weight", weight.detach())]
    return []
