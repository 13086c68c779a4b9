r"""Fused normalization: residual-add + layer/RMS norm, and batch/group norm + activation.

Each fused op computes exactly what its unfused chain computes, in one sweep over the data where a
kernel applies (see :mod:`normlab.kernels`), and saves only what the plain norm saves:

* ``add_layer_norm`` / ``add_rms_norm``: :math:`s = x + r`, returns ``(\phi(norm(s)), s)`` with
  :math:`\phi` an optional activation (below; the identity by default). The sum is the residual
  stream a transformer block passes on, so it is an output rather than a temporary. Backward:
  :math:`\partial L/\partial x = \partial L/\partial r = \partial L/\partial s +
  \mathrm{norm}'(s)^\top (\phi'(z)\,\partial L/\partial y)` with :math:`z = \mathrm{norm}(s)`
  recomputed as for the norm + activation ops. Saves ``s`` (an output anyway), the parameters and
  the per-row ``mean``/``invstd``.
* ``batch_norm_act`` / ``group_norm_act``: :math:`y = \phi(z)`, :math:`z = \gamma\hat x + \beta`
  with :math:`\phi` one of ReLU, SiLU, GELU (erf form). Backward recomputes :math:`z` from the
  saved input and statistics instead of saving it, then runs the norm's backward on
  :math:`\partial L/\partial z = \phi'(z)\,\partial L/\partial y`.

The reference implementations below compose the primitive of
:mod:`normlab.functional._normalize` with a hand-written backward; fast kernels register for the
op names ``"add_layer_norm"``, ``"add_rms_norm"``, ``"batch_norm_act"`` and ``"group_norm_act"``
with these reference signatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from normlab import kernels
from normlab.functional import _validate as v
from normlab.functional._normalize import (
    Layout,
    _graph_stats,
    grouped_layout,
    needs_graph,
    normalize_backward,
    normalize_forward,
    once_differentiable_backward,
    trailing_layout,
)
from normlab.functional.batch_norm import (
    check_batch_norm_args,
    check_values_per_channel,
    commit_running_stats,
)
from normlab.functional.moments import compute_dtype

__all__ = ["ACTIVATIONS", "add_layer_norm", "add_rms_norm", "batch_norm_act", "group_norm_act"]

ACTIVATIONS = (None, "relu", "silu", "gelu")


def _check_activation(op: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}"
        )


def _act(z: Tensor, activation: str | None) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return z


def _act_grad(z: Tensor, activation: str | None) -> Tensor:
    """d activation(z) / dz, elementwise."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * torch.exp(-0.5 * z * z)
    return torch.ones_like(z)


# ------------------------------------------------------------------------------------------------
# Reference kernels (signatures that fast kernels for the fused ops share).


def add_norm_forward(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Layout,
    eps: float, activation: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(out, sum, mean, var, invstd)`` with ``sum = x + residual`` and
    ``out = activation(norm(sum))``."""
    s = x + residual
    z, mean, var, invstd = normalize_forward(s, weight, bias, layout, eps)
    return _act(z, activation), s, mean, var, invstd


def add_norm_backward(
    grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor, weight: Tensor | None,
    bias: Tensor | None, mean: Tensor, invstd: Tensor, layout: Layout,
    needs: tuple[bool, bool, bool], activation: str | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reference: ``(grad_sum_total, grad_weight, grad_bias)``; the first is the gradient of both
    the input and the residual. ``bias`` is read only to recompute the pre-activation."""
    if grad_out is None:
        # No gradient reaches the output, so the activation's derivative cannot matter.
        grad_out, activation = torch.zeros_like(s), None
    if activation is None:
        grad_s, grad_weight, grad_bias = normalize_backward(
            grad_out, s, weight, mean, invstd, layout, True, needs
        )
    else:
        grad_s, grad_weight, grad_bias = norm_act_backward(
            grad_out, s, weight, bias, mean, invstd, layout, True, needs, activation
        )
    if grad_s is not None and grad_sum is not None:
        grad_s = grad_s + grad_sum
    return grad_s, grad_weight, grad_bias


def norm_act_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Layout, eps: float,
    stats: tuple[Tensor, Tensor] | None, activation: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(activation(norm(x)), mean, var, invstd)``."""
    z, mean, var, invstd = normalize_forward(x, weight, bias, layout, eps, stats)
    return _act(z, activation), mean, var, invstd


def norm_act_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    invstd: Tensor, layout: Layout, batch_stats: bool, needs: tuple[bool, bool, bool],
    activation: str | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reference: recompute the pre-activation ``z``, then the norm's backward on
    ``grad_out * activation'(z)``."""
    cdtype = mean.dtype
    xc = x.to(cdtype)
    z = (xc - mean).mul_(invstd) if layout.center else xc * invstd
    if weight is not None:
        z.mul_(weight.to(cdtype).view(layout.param_shape))
    if bias is not None:
        z.add_(bias.to(cdtype).view(layout.param_shape))
    grad_z = (grad_out.to(cdtype) * _act_grad(z, activation)).to(x.dtype)
    return normalize_backward(grad_z, x, weight, mean, invstd, layout, batch_stats, needs)


_ADD_NORM_REFERENCE = kernels.Kernel(forward=add_norm_forward, backward=add_norm_backward)
_NORM_ACT_REFERENCE = kernels.Kernel(forward=norm_act_forward, backward=norm_act_backward)


# ------------------------------------------------------------------------------------------------
# Autograd functions.


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
        op: str, layout: Layout, eps: float, activation: str | None,
    ) -> tuple[Tensor, Tensor]:
        kernel = kernels.select(op, x, _ADD_NORM_REFERENCE)
        out, s, mean, _var, invstd = kernel.forward(x, residual, weight, bias, layout, eps,
                                                    activation)
        ctx.save_for_backward(s, weight, bias, mean, invstd)
        ctx.kernel, ctx.layout, ctx.activation = kernel, layout, activation
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.set_materialize_grads(False)
        return out, s

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, grad_sum: Tensor | None) -> tuple[Any, ...]:
        return once_differentiable_backward(_add_norm_backward, ctx, grad_out, grad_sum)


def _add_norm_backward(ctx: Any, grad_out: Tensor | None,
                       grad_sum: Tensor | None) -> tuple[Any, ...]:
    s, weight, bias, mean, invstd = ctx.saved_tensors
    need_input = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    needs = (need_input, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if grad_out is not None:
        grad_out = grad_out.contiguous()
    if grad_sum is not None:
        grad_sum = grad_sum.contiguous()
    grad_s, grad_weight, grad_bias = ctx.kernel.backward(
        grad_out, grad_sum, s, weight, bias, mean, invstd, ctx.layout, needs, ctx.activation
    )
    if grad_bias is not None:
        grad_bias = kernels.as_param_grad(grad_bias, *ctx.bias_meta)
    return (grad_s if ctx.needs_input_grad[0] else None,
            grad_s if ctx.needs_input_grad[1] else None,
            grad_weight, grad_bias, None, None, None, None)


class _NormAct(torch.autograd.Function):
    # As _Normalize: one output, the statistics through `stats_out`.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, op: str,
        layout: Layout, eps: float, fixed_mean: Tensor | None, fixed_var: Tensor | None,
        activation: str | None, stats_out: list[Tensor],
    ) -> Tensor:
        kernel = kernels.select(op, x, _NORM_ACT_REFERENCE)
        stats = _graph_stats(fixed_mean, fixed_var)
        out, mean, var, invstd = kernel.forward(x, weight, bias, layout, eps, stats, activation)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.kernel, ctx.layout, ctx.batch_stats = kernel, layout, stats is None
        ctx.activation = activation
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        stats_out += (mean, var)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        return once_differentiable_backward(_norm_act_backward, ctx, grad_out)


def _norm_act_backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
    x, weight, bias, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = ctx.kernel.backward(
        kernels.like(x, grad_out), x, weight, bias, mean, invstd, ctx.layout, ctx.batch_stats,
        (needs[0], needs[1], needs[2]), ctx.activation,
    )
    if grad_bias is not None:
        grad_bias = kernels.as_param_grad(grad_bias, *ctx.bias_meta)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _norm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, op: str, layout: Layout,
              eps: float, fixed_mean: Tensor | None, fixed_var: Tensor | None,
              activation: str | None) -> tuple[Tensor, Tensor, Tensor]:
    if not needs_graph(x, weight, bias):  # inference: no autograd node
        stats = None if fixed_mean is None else (fixed_mean, fixed_var)
        kernel = kernels.select(op, x, _NORM_ACT_REFERENCE)
        out, mean, var, _invstd = kernel.forward(x, weight, bias, layout, eps, stats, activation)
        return out, mean, var
    stats_out: list[Tensor] = []
    out = _NormAct.apply(x, weight, bias, op, layout, eps, fixed_mean, fixed_var, activation,
                         stats_out)
    return out, stats_out[0], stats_out[1]


# ------------------------------------------------------------------------------------------------
# Public functions.


def _add_norm(op: str, name: str, input: Tensor, residual: Tensor,
              normalized_shape: Sequence[int] | int, weight: Tensor | None,
              bias: Tensor | None, eps: float, center: bool,
              activation: str | None) -> tuple[Tensor, Tensor]:
    _check_activation(name, activation)
    v.check_float_input(name, input)
    v.check_float_input(name, residual)
    if residual.shape != input.shape or residual.dtype != input.dtype:
        raise ValueError(
            f"{name}: residual must match the input's shape and dtype, got "
            f"{list(residual.shape)} {residual.dtype} for input {list(input.shape)} {input.dtype}"
        )
    if residual.device != input.device:
        raise ValueError(f"{name}: residual is on {residual.device} but input on {input.device}")
    shape = v.as_normalized_shape(name, normalized_shape)
    v.check_trailing_shape(name, input, shape)
    v.check_eps(name, eps)
    v.check_param(name, "weight", weight, input, shape)
    v.check_param(name, "bias", bias, input, shape)
    layout = trailing_layout(input.dim(), shape, center)
    if not needs_graph(input, residual, weight, bias):  # inference: no autograd node
        kernel = kernels.select(op, input, _ADD_NORM_REFERENCE)
        out, s, *_ = kernel.forward(input, residual, weight, bias, layout, eps, activation)
        return out, s
    return _AddNorm.apply(input, residual, weight, bias, op, layout, eps, activation)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add, layer norm, optional activation: returns
    ``(activation(layer_norm(input + residual)), input + residual)``.

    Same result as the eager chain ``s = input + residual; activation(layer_norm(s, ...))``, with
    the add, the norm and the activation fused into one sweep over the data on the kernel path.
    ``residual`` must match the input's shape and dtype.

    Args:
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"`` (erf
            form, torch's default).

    Raises:
        TypeError: non-floating input or residual, incompatible parameter dtype.
        ValueError: residual shape/dtype/device mismatch, trailing dims differ from
            `normalized_shape`, parameter shape mismatch, invalid eps, unknown activation.
    """
    return _add_norm("add_layer_norm", "add_layer_norm", input, residual, normalized_shape,
                     weight, bias, eps, True, activation)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add, RMS norm, optional activation: returns
    ``(activation(rms_norm(input + residual)), input + residual)``, the activation fused into the
    same sweep as the add and the norm on the kernel path.

    Args:
        eps: None (torch's default) means the machine epsilon of the compute dtype.
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"``.

    Raises:
        As :func:`add_layer_norm`.
    """
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    return _add_norm("add_rms_norm", "add_rms_norm", input, residual, normalized_shape, weight,
                     None, eps, False, activation)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    *,
    on_nonfinite: str = "error",
) -> Tensor:
    """``activation(batch_norm(input, ...))`` with batch_norm's contract (running buffers are
    updated in place in training) and one fused sweep on the kernel path.

    Args:
        activation: ``"relu"``, ``"silu"``, ``"gelu"`` (erf form, torch's default) or None.

    Raises:
        As :func:`normlab.functional.batch_norm`, and ValueError for an unknown activation.
    """
    return batch_norm_act_with_status(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
        on_nonfinite,
    )[0]


def batch_norm_act_with_status(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str | None,
    on_nonfinite: str = "error",
) -> tuple[Tensor, bool | Tensor]:
    """:func:`batch_norm_act`, also saying whether the running statistics were updated."""
    op = "batch_norm_act"
    _check_activation(op, activation)
    layout = check_batch_norm_args(
        op, input, running_mean, running_var, weight, bias, training, momentum, eps, on_nonfinite
    )
    if not training:
        assert running_mean is not None and running_var is not None
        return _norm_act(input, weight, bias, op, layout, eps,
                         running_mean, running_var, activation)[0], False
    count = check_values_per_channel(op, input)
    out, mean, var = _norm_act(input, weight, bias, op, layout, eps, None, None, activation)
    committed = False
    if running_mean is not None and running_var is not None and count > 0:
        committed = commit_running_stats(
            op, running_mean, running_var, mean, var, count, momentum, on_nonfinite
        )
    return out, committed


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "relu",
) -> Tensor:
    """``activation(group_norm(input, num_groups, ...))`` in one fused sweep on the kernel path.

    Raises:
        As :func:`normlab.functional.group_norm`, and ValueError for an unknown activation.
    """
    op = "group_norm_act"
    _check_activation(op, activation)
    v.check_float_input(op, input)
    v.check_min_dim(op, input, 2, "(N, C, *)")
    v.check_positive_int(op, "num_groups", num_groups)
    v.check_eps(op, eps)
    c = input.shape[1]
    if c % num_groups:
        raise ValueError(f"{op}: num_channels={c} is not divisible by num_groups={num_groups}")
    v.check_param(op, "weight", weight, input, (c,))
    v.check_param(op, "bias", bias, input, (c,))
    grouped = input.unflatten(1, (num_groups, c // num_groups))
    layout = grouped_layout(grouped.dim(), num_groups, c // num_groups)
    out = _norm_act(grouped, weight, bias, op, layout, eps, None, None, activation)[0]
    return out.flatten(1, 2)
