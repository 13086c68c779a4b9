r"""Weight initialization: variance-preserving schemes per tensor, for a whole model, and LSUV.

A layer :math:`y = W x` with i.i.d. zero-mean weights of variance :math:`v` and inputs of second
moment :math:`E[x^2]` has :math:`\mathrm{Var}(y) = \mathrm{fan\_in}\cdot v\cdot E[x^2]`. Choosing
:math:`v` so that this equals the previous layer's pre-activation variance keeps the signal from
vanishing or exploding with depth; the schemes differ in the nonlinearity they assume and in
whether they also balance the backward pass (``fan_out``).

* Xavier/Glorot (Glorot & Bengio 2010): variance :math:`2g^2/(\mathrm{fan\_in}+\mathrm{fan\_out})`.
* Kaiming/He (He et al. 2015): variance :math:`g^2/\mathrm{fan}`; ReLU has :math:`g^2 = 2`.
* LeCun (LeCun et al. 1998; Klambauer et al. 2017 for SELU): variance :math:`1/\mathrm{fan\_in}`.
* Orthogonal (Saxe et al. 2014): :math:`g\cdot Q` with :math:`Q` a Haar-random orthogonal matrix.
* LSUV (Mishkin & Matas 2016): orthogonal, then each layer rescaled to unit output variance on a
  real batch.

:math:`g` is :func:`calculate_gain` of the nonlinearity. The per-tensor functions keep the names,
argument order and defaults of their ``torch.nn.init`` namesakes; ``xavier_*`` and ``kaiming_*``
also draw the same numbers as torch's for the same generator state (tested). All of them fill the
tensor in place under ``torch.no_grad`` and return it; a zero-element tensor is returned as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "NONLINEARITIES",
    "SCHEMES",
    "LSUVLayerReport",
    "calculate_gain",
    "compute_fans",
    "initialize",
    "kaiming_normal_",
    "kaiming_uniform_",
    "lecun_normal_",
    "lecun_uniform_",
    "lsuv",
    "orthogonal_",
    "xavier_normal_",
    "xavier_uniform_",
]

_LINEAR_NAMES = (
    "linear",
    "identity",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
NONLINEARITIES = (*_LINEAR_NAMES, "sigmoid", "tanh", "relu", "leaky_relu", "selu")
SCHEMES = ("xavier", "kaiming", "lecun", "orthogonal")

# Layers whose weight an init scheme sets. ConvTranspose is included; its weight is laid out
# (in, out/groups, *kernel), so the fans computed from the tensor are swapped, exactly as in torch.
_WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# Activation modules recognised by the nonlinearity inference of `initialize`. Smooth ReLU-like
# activations get ReLU's gain: they pass about half the variance of a symmetric input, which is the
# property the gain corrects for.
_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.GELU: "relu",
    nn.SiLU: "relu",
    nn.ELU: "relu",
    nn.CELU: "relu",
    nn.Mish: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
}


# ----------------------------------------------------------------------------------------------
# fans and gains


def compute_fans(tensor: Tensor) -> tuple[int, int]:
    r"""``(fan_in, fan_out)`` of a Linear or ConvNd weight.

    For a weight of shape ``(out, in, *kernel)``, with receptive field
    :math:`r = \prod \mathrm{kernel}`: :math:`\mathrm{fan\_in} = \mathrm{in}\cdot r` (inputs summed
    into one output) and :math:`\mathrm{fan\_out} = \mathrm{out}\cdot r`. Grouped convolutions
    store ``in / groups`` in dim 1, so their ``fan_in`` is per group; ``fan_out`` is not divided
    by ``groups`` (torch's convention, kept for drop-in equality).

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions (a bias or a norm scale has no
            fans).
    """
    if tensor.dim() < 2:
        raise ValueError(
            f"compute_fans: a weight needs at least 2 dims (out, in, *kernel) to have fan_in and "
            f"fan_out, got shape {list(tensor.shape)}; initialize 1-D biases and norm scales "
            "with zeros_/ones_ instead"
        )
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    r"""The factor :math:`g` that makes a weight variance of :math:`g^2/\mathrm{fan}` preserve
    the pre-activation variance across ``Linear -> nonlinearity`` (same values as torch's).

    * ``linear``, ``identity``, ``conv{1,2,3}d``, ``conv_transpose{1,2,3}d``: 1 (the identity
      passes the variance unchanged).
    * ``sigmoid``: 1 (torch's value; sigmoid is not zero-centred and has no variance-preserving
      gain).
    * ``tanh``: 5/3 (keeps tanh nets near a non-trivial fixed point of the variance map).
    * ``relu``: :math:`\sqrt 2`, since :math:`E[\mathrm{relu}(z)^2] = \mathrm{Var}(z)/2` for a
      symmetric :math:`z` (He et al. 2015).
    * ``leaky_relu``: :math:`\sqrt{2/(1+a^2)}`, since :math:`E[f(z)^2] = (1+a^2)\mathrm{Var}(z)/2`.
    * ``selu``: 3/4 (torch's value, a compromise for gradient flow); a self-normalizing SELU net
      needs gain 1, i.e. :func:`lecun_normal_` (Klambauer et al. 2017).

    Args:
        nonlinearity: one of the names above.
        param: the negative slope :math:`a` for ``leaky_relu`` (default 0.01).

    Raises:
        ValueError: for an unknown nonlinearity or a non-numeric ``param``.
    """
    if nonlinearity in _LINEAR_NAMES or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, bool) or not isinstance(param, (int, float)) or math.isnan(param):
            raise ValueError(
                f"calculate_gain: leaky_relu's negative slope must be a number, got {param!r}"
            )
        else:
            slope = float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(
        f"calculate_gain: unknown nonlinearity {nonlinearity!r}; choose one of "
        f"{', '.join(NONLINEARITIES)}"
    )


def _fan(tensor: Tensor, mode: str) -> int:
    fan_in, fan_out = compute_fans(tensor)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(
        f"mode={mode!r} is not a fan mode; use 'fan_in' (preserves the forward variance) or "
        "'fan_out' (preserves the backward variance)"
    )


# ----------------------------------------------------------------------------------------------
# per-tensor schemes


def xavier_uniform_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`U(-b, b)`, :math:`b = g\sqrt{6/(\mathrm{fan\_in} +
    \mathrm{fan\_out})}` (Glorot & Bengio 2010, "Understanding the difficulty of training deep
    feedforward neural networks", eq. 16).

    The variance :math:`b^2/3 = 2g^2/(\mathrm{fan\_in}+\mathrm{fan\_out})` is the compromise
    between preserving the forward variance (:math:`1/\mathrm{fan\_in}`) and the backward one
    (:math:`1/\mathrm{fan\_out}`) for a linear or tanh-like unit near 0.

    Returns:
        ``tensor``, for chaining.
    """
    fan_in, fan_out = compute_fans(tensor)
    if tensor.numel() == 0:
        return tensor
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return _uniform_(tensor, math.sqrt(3.0) * std, generator)


def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`N(0, \sigma^2)`,
    :math:`\sigma = g\sqrt{2/(\mathrm{fan\_in} + \mathrm{fan\_out})}` (Glorot & Bengio 2010).

    Returns:
        ``tensor``, for chaining.
    """
    fan_in, fan_out = compute_fans(tensor)
    if tensor.numel() == 0:
        return tensor
    return _normal_(tensor, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


def kaiming_uniform_(
    tensor: Tensor,
    a: float = 0.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`U(-b, b)`, :math:`b = g\sqrt{3/\mathrm{fan}}`
    (He et al. 2015, "Delving Deep into Rectifiers", eq. 10 in uniform form).

    Args:
        tensor: a weight with at least 2 dims.
        a: negative slope of a leaky ReLU (used when ``nonlinearity='leaky_relu'``); the default
            0 gives ReLU's gain :math:`\sqrt 2`.
        mode: ``'fan_in'`` preserves the forward variance, ``'fan_out'`` the backward one.
        nonlinearity: see :func:`calculate_gain`.
        generator: optional random generator.

    Returns:
        ``tensor``, for chaining.
    """
    fan = _fan(tensor, mode)
    gain = calculate_gain(nonlinearity, a)
    if tensor.numel() == 0:
        return tensor
    return _uniform_(tensor, math.sqrt(3.0) * gain / math.sqrt(fan), generator)


def kaiming_normal_(
    tensor: Tensor,
    a: float = 0.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    nonlinearity: str = "leaky_relu",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`N(0, g^2/\mathrm{fan})` (He et al. 2015, eq. 10).

    With ReLU, :math:`\mathrm{Var}(y_l) = \mathrm{fan\_in}\cdot\mathrm{Var}(w)\cdot
    \mathrm{Var}(y_{l-1})/2`, so :math:`\mathrm{Var}(w) = 2/\mathrm{fan\_in}` keeps every layer's
    pre-activation variance equal. Arguments as :func:`kaiming_uniform_`.

    Returns:
        ``tensor``, for chaining.
    """
    fan = _fan(tensor, mode)
    gain = calculate_gain(nonlinearity, a)
    if tensor.numel() == 0:
        return tensor
    return _normal_(tensor, gain / math.sqrt(fan), generator)


def lecun_normal_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`N(0, g^2/\mathrm{fan\_in})` (LeCun et al. 1998,
    "Efficient BackProp", Sec. 4.6).

    With gain 1 this is the initialization of self-normalizing SELU networks (Klambauer et al.
    2017): :math:`\sum_j w_j^2 \approx 1` makes (mean 0, variance 1) the attracting fixed point of
    every layer. torch has no namesake; it equals ``kaiming_normal_(nonlinearity='linear')``.

    Returns:
        ``tensor``, for chaining.
    """
    fan_in, _ = compute_fans(tensor)
    if tensor.numel() == 0:
        return tensor
    return _normal_(tensor, gain / math.sqrt(fan_in), generator)


def lecun_uniform_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place from :math:`U(-b, b)`, :math:`b = g\sqrt{3/\mathrm{fan\_in}}`:
    the uniform twin of :func:`lecun_normal_` (same variance :math:`g^2/\mathrm{fan\_in}`).

    Returns:
        ``tensor``, for chaining.
    """
    fan_in, _ = compute_fans(tensor)
    if tensor.numel() == 0:
        return tensor
    return _uniform_(tensor, gain * math.sqrt(3.0 / fan_in), generator)


def orthogonal_(
    tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Fill ``tensor`` in place with :math:`g\cdot Q`, :math:`Q` a uniformly random (Haar)
    semi-orthogonal matrix (Saxe, McClelland & Ganguli 2014, "Exact solutions to the nonlinear
    dynamics of learning in deep linear neural networks").

    The tensor is viewed as a matrix of shape ``(rows, cols) = (shape[0], numel / shape[0])``;
    afterwards :math:`W W^\top = g^2 I` if rows <= cols, else :math:`W^\top W = g^2 I`. A deep
    linear stack of square orthogonal layers preserves every input's norm exactly, not just in
    expectation.

    Numerics:
        :math:`Q` comes from the QR factorization of a Gaussian matrix, computed in float32
        (float64 for float64 tensors) because QR has no half-precision kernel. Each column of
        :math:`Q` is multiplied by the sign of :math:`R`'s diagonal entry: without it the
        distribution depends on the QR routine's sign convention and is not Haar (Mezzadri 2007).

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions.

    Returns:
        ``tensor``, for chaining.
    """
    if tensor.dim() < 2:
        raise ValueError(
            f"orthogonal_: needs a tensor with at least 2 dims, got shape {list(tensor.shape)}"
        )
    if tensor.numel() == 0:
        return tensor
    rows = tensor.shape[0]
    cols = tensor.numel() // rows
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    gaussian = torch.empty(max(rows, cols), min(rows, cols), dtype=dtype, device=tensor.device)
    gaussian.normal_(0.0, 1.0, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)
    if rows < cols:
        q = q.T
    with torch.no_grad():
        tensor.copy_(q.reshape(tensor.shape).mul_(gain))
    return tensor


def _uniform_(tensor: Tensor, bound: float, generator: torch.Generator | None) -> Tensor:
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def _normal_(tensor: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


# ----------------------------------------------------------------------------------------------
# whole models


def _weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"initialize: layer {name!r} ({type(module).__name__}) is lazy and has no "
                    "weight shape yet; run one forward pass before initializing"
                )
            yield name, module


def _infer_nonlinearities(model: nn.Module, default: str) -> dict[str, tuple[str, float | None]]:
    """Per weight layer: the first activation module after it and before the next weight layer."""
    found: dict[str, tuple[str, float | None]] = {}
    pending: list[str] = []
    any_activation = False
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS):
            pending.append(name)
            # Only the most recent weight layer feeds the next activation; earlier pending ones
            # were followed by another weight layer first.
            for earlier in pending[:-1]:
                found.setdefault(earlier, ("linear", None))
            pending = pending[-1:]
            continue
        kind = next((k for cls, k in _ACTIVATIONS.items() if isinstance(module, cls)), None)
        if kind is None:
            continue
        any_activation = True
        slope: float | None = None
        if isinstance(module, nn.LeakyReLU):
            slope = module.negative_slope
        elif isinstance(module, nn.PReLU):
            slope = float(module.weight.detach().mean())
        for earlier in pending:
            found[earlier] = (kind, slope)
        pending = []
    for earlier in pending:
        found.setdefault(earlier, ("linear", None))
    if not any_activation:
        # Activations are called functionally (F.relu in forward): nothing to read, so every layer
        # gets the nonlinearity the scheme is designed for.
        found = {name: (default, None) for name in found}
    return found


def initialize(
    model: nn.Module,
    scheme: str,
    nonlinearity: str | None = None,
    *,
    negative_slope: float | None = None,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    distribution: Literal["uniform", "normal"] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, str]:
    """Initialize every Linear/Conv weight of ``model`` with ``scheme`` and zero its bias.

    Schemes: ``"xavier"`` (:func:`xavier_uniform_`, gain from the nonlinearity), ``"kaiming"``
    (:func:`kaiming_normal_` with ``mode``), ``"lecun"`` (:func:`lecun_normal_`, always gain 1:
    the self-normalizing choice, whatever the nonlinearity), ``"orthogonal"`` (:func:`orthogonal_`
    with the nonlinearity's gain).

    Nonlinearity inference (when ``nonlinearity`` is None): modules are visited in
    ``model.named_modules()`` order, which is registration order and equals forward order for
    ``nn.Sequential``-style models. Each Linear/Conv takes the first activation module that comes
    after it and before the next Linear/Conv (norm, dropout, pooling and other modules in between
    are skipped): ReLU, ReLU6 -> ``relu``; LeakyReLU, PReLU -> ``leaky_relu`` with the module's
    slope; Tanh -> ``tanh``; Sigmoid -> ``sigmoid``; SELU -> ``selu``; GELU, SiLU, ELU, CELU,
    Mish -> ``relu`` (ReLU-like). A layer with no activation after it (an output layer) gets
    ``linear``. If the model has no activation module at all (activations called functionally in
    ``forward``), every layer gets the scheme's own regime: ``relu`` for kaiming, ``linear``
    otherwise. Models whose forward order differs from registration order should pass
    ``nonlinearity``.

    Other modules are not touched: norm layers keep their weight 1 / bias 0 (and deliberate
    choices such as a zero-initialized last norm of a residual branch survive); embeddings and
    custom layers keep their own initialization.

    Args:
        model: the model, initialized in place.
        scheme: ``"xavier"``, ``"kaiming"``, ``"lecun"`` or ``"orthogonal"``.
        nonlinearity: one name for every layer (see :func:`calculate_gain`), or None to infer.
        negative_slope: slope used with ``nonlinearity="leaky_relu"`` (default 0.01).
        mode: fan mode for ``"kaiming"``.
        distribution: ``"uniform"`` or ``"normal"`` for xavier/kaiming/lecun; None picks the
            paper's (xavier: uniform; kaiming, lecun: normal).
        generator: optional random generator, for reproducible initialization.

    Returns:
        ``{layer name: nonlinearity used}`` in module order, to check what was inferred.

    Raises:
        ValueError: for an unknown scheme, nonlinearity, mode or distribution, or a lazy layer.
    """
    if scheme not in SCHEMES:
        raise ValueError(
            f"initialize: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)} "
            "(for data-driven LSUV call normlab.init.lsuv(model, batch))"
        )
    if distribution not in (None, "uniform", "normal"):
        raise ValueError(
            f"initialize: distribution={distribution!r} must be 'uniform', 'normal' or None"
        )
    if scheme == "kaiming" and mode not in ("fan_in", "fan_out"):
        raise ValueError(f"initialize: mode={mode!r} must be 'fan_in' or 'fan_out'")
    if nonlinearity is not None:
        calculate_gain(nonlinearity, negative_slope)  # validate before any weight changes
    layers = dict(_weight_layers(model))
    default = "relu" if scheme == "kaiming" else "linear"
    if nonlinearity is None:
        chosen = _infer_nonlinearities(model, default)
    else:
        chosen = {name: (nonlinearity, negative_slope) for name in layers}
    used: dict[str, str] = {}
    for name, layer in layers.items():
        kind, slope = chosen[name]
        weight = layer.weight
        if scheme == "xavier":
            if distribution == "normal":
                xavier_normal_(weight, calculate_gain(kind, slope), generator)
            else:
                xavier_uniform_(weight, calculate_gain(kind, slope), generator)
        elif scheme == "kaiming":
            init_fn = kaiming_uniform_ if distribution == "uniform" else kaiming_normal_
            # kaiming_*'s `a` is leaky_relu's slope; it is ignored for other nonlinearities.
            init_fn(weight, slope if slope is not None else 0.01, mode, kind, generator)
        elif scheme == "lecun":
            if distribution == "uniform":
                lecun_uniform_(weight, 1.0, generator)
            else:
                lecun_normal_(weight, 1.0, generator)
        else:
            orthogonal_(weight, calculate_gain(kind, slope), generator)
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.zero_()
        used[name] = kind
    return used


# ----------------------------------------------------------------------------------------------
# LSUV


@dataclass(frozen=True)
class LSUVLayerReport:
    """What :func:`lsuv` did to one layer.

    Attributes:
        name: the layer's name in ``model.named_modules()``.
        variance: its output variance on the batch after the last rescale.
        iterations: how many times its weight was rescaled (0: already within ``tol``).
        converged: whether ``|variance - 1| < tol``.
    """

    name: str
    variance: float
    iterations: int
    converged: bool


class _StopForward(Exception):
    """Raised by a measuring hook: the layers after the measured one need not run."""


def _call(model: nn.Module, batch: Tensor | tuple[Tensor, ...]) -> None:
    if isinstance(batch, tuple):
        model(*batch)
    else:
        model(batch)


def _forward_order(
    model: nn.Module, batch: Tensor | tuple[Tensor, ...]
) -> list[tuple[str, nn.Module]]:
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    handles = []

    def record(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                order.append((name, module))

        return hook

    try:
        for name, layer in _weight_layers(model):
            handles.append(layer.register_forward_hook(record(name)))
        _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _output_variance(
    model: nn.Module, layer: nn.Module, batch: Tensor | tuple[Tensor, ...]
) -> float:
    captured: list[float] = []

    def hook(module: nn.Module, args: object, output: Tensor) -> None:
        captured.append(float(output.detach().to(torch.float64).var(correction=0)))
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        _call(model, batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def _measure(
    model: nn.Module, name: str, layer: nn.Module, batch: Tensor | tuple[Tensor, ...]
) -> float:
    var = _output_variance(model, layer, batch)
    if not (math.isfinite(var) and var > 0):
        raise RuntimeError(
            f"lsuv: layer {name!r} has output variance {var} on this batch, which no rescale "
            "can bring to 1; pass a batch of varied real samples (not constant), and check for "
            "dead or non-finite inputs"
        )
    return var


def lsuv(
    model: nn.Module,
    batch: Tensor | tuple[Tensor, ...],
    tol: float = 0.1,
    max_iter: int = 10,
    *,
    generator: torch.Generator | None = None,
) -> list[LSUVLayerReport]:
    r"""Layer-sequential unit-variance initialization (Mishkin & Matas 2016, "All you need is a
    good init", Alg. 1).

    1. Every Linear/Conv weight is set by :func:`orthogonal_` (gain 1) and every bias to 0.
    2. In forward order, each layer's output variance :math:`v` on ``batch`` is measured and its
       weight divided by :math:`\sqrt v` until :math:`|v - 1| < \mathrm{tol}` or ``max_iter``
       rescales. Earlier layers are final by then, so each layer sees the real distribution of
       its inputs, whatever the nonlinearities, pooling or input scale.

    Forward passes run under ``torch.no_grad`` in eval mode, so dropout is off and no batch-norm
    running statistics change; the train/eval flag of every submodule is restored afterwards
    (also on error), and no hook is left behind. Passes stop right after the measured layer.
    Forward order is the order of first calls on ``batch``; a layer used twice is measured at its
    first call, and layers the batch does not reach are orthogonal but not rescaled.

    Args:
        model: the model, initialized in place.
        batch: a representative input batch (a tensor, or a tuple of positional arguments).
            More samples give a steadier variance estimate; the paper uses one mini-batch.
        tol: tolerance on the output variance (> 0).
        max_iter: the most rescales per layer (>= 1).
        generator: optional random generator for the orthogonal draw.

    Returns:
        One :class:`LSUVLayerReport` per layer reached, in forward order.

    Raises:
        ValueError: for a non-positive ``tol`` or ``max_iter``.
        RuntimeError: if a layer's output variance on the batch is 0 or not finite (a constant
            batch or dead inputs), which no rescale can fix.
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"lsuv: tol={tol!r} must be a number > 0")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lsuv: max_iter={max_iter!r} must be a positive int")
    modes = [(module, module.training) for module in model.modules()]
    report: list[LSUVLayerReport] = []
    try:
        model.eval()
        with torch.no_grad():
            initialize(model, "orthogonal", "linear", generator=generator)
            for name, layer in _forward_order(model, batch):
                var = _measure(model, name, layer, batch)
                iterations = 0
                while abs(var - 1.0) >= tol and iterations < max_iter:
                    layer.weight.mul_(1.0 / math.sqrt(var))
                    iterations += 1
                    var = _measure(model, name, layer, batch)
                report.append(LSUVLayerReport(name, var, iterations, abs(var - 1.0) < tol))
    finally:
        for module, training in modes:
            module.training = training
    return report
