r"""The normalize primitive every norm is built from: explicit forward, hand-derived backward.

Every normalization layer in normlab is one call of this primitive with a different
:class:`Layout`: the dimensions the statistics are taken over (``reduce_dims``), how weight and bias
broadcast against the input (``param_shape``), and whether the mean is subtracted (``center``;
False for RMS norm).

Forward, with statistics over the reduction set :math:`S` of size :math:`M`:

.. math::
    \mu = \tfrac1M \sum_S x, \quad \sigma^2 = \tfrac1M \sum_S (x-\mu)^2, \quad
    r = (\sigma^2 + \epsilon)^{-1/2}, \quad \hat x = (x-\mu)\,r, \quad y = \gamma \hat x + \beta

Backward, with :math:`g = \gamma\,\partial L/\partial y` and means over :math:`S`:

.. math::
    \partial L/\partial x = r\,\bigl(g - \overline{g} - \hat x\,\overline{g \hat x}\bigr)

(drop :math:`\overline{g}` when the mean is not subtracted). When the statistics are constants
(batch norm in eval mode, running statistics), :math:`\partial L/\partial x = g\,r`.
:math:`\partial L/\partial\gamma = \sum \partial L/\partial y\cdot\hat x` and
:math:`\partial L/\partial\beta = \sum \partial L/\partial y` over the dimensions the parameters
broadcast along.

Memory: the backward saves the input (which autograd holds for the previous layer anyway), the
weight and the per-group ``mean`` and ``invstd`` in the compute dtype, never the normalized tensor;
:math:`\hat x` is recomputed, which is one cheap pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from normlab import kernels
from normlab.functional.moments import compute_dtype, moments


@dataclass(frozen=True)
class Layout:
    """How one norm's statistics and parameters line up with its input.

    Attributes:
        reduce_dims: dimensions of the (possibly viewed) input the statistics average over.
        param_shape: shape weight/bias are viewed as so they broadcast against the input.
        center: subtract the mean (False for RMS norm, which normalizes by the root mean square).
    """

    reduce_dims: tuple[int, ...]
    param_shape: tuple[int, ...]
    center: bool = True


# Layouts are interned per geometry (cached factories): building one per call costs more than the
# lookup, and the kernels' plan caches key on them.


@functools.lru_cache(maxsize=256)
def trailing_layout(ndim: int, shape: tuple[int, ...], center: bool = True) -> Layout:
    """Statistics over the trailing ``len(shape)`` dims of an `ndim`-dim input, parameters of
    `shape` (layer and RMS norm)."""
    return Layout(reduce_dims=tuple(range(ndim - len(shape), ndim)), param_shape=shape,
                  center=center)


@functools.lru_cache(maxsize=256)
def grouped_layout(ndim: int, groups: int, per_group: int) -> Layout:
    """Statistics per (sample, group) of an input viewed as (N, G, C/G, *spatial) with `ndim`
    dims; per-channel parameters (group norm)."""
    spatial = tuple(range(3, ndim))
    return Layout(reduce_dims=(2, *spatial),
                  param_shape=(1, groups, per_group, *(1,) * len(spatial)))


def _param_sum_dims(layout: Layout, ndim: int) -> list[int]:
    """Dims along which weight/bias broadcast, so their gradients sum over them."""
    lead = ndim - len(layout.param_shape)
    return [d for d in range(ndim) if d < lead or layout.param_shape[d - lead] == 1]


def _sum(t: Tensor, dims: list[int]) -> Tensor:
    # torch's sum over an empty dim list reduces everything; here it must be the identity.
    return t.sum(dims) if dims else t


def normalize_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    layout: Layout,
    eps: float,
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference forward. Returns ``(out, mean, var, invstd)`` (statistics in the compute dtype).

    ``stats``: fixed (mean, var) to normalize with instead of the input's own (eval-mode batch
    norm): one value per statistic, in any shape with ``layout.param_shape``'s element count
    (the running buffers as they are; kernels read them as flat vectors, the reference views
    them). The returned mean and var may then be ``stats`` themselves (fast kernels return them
    unviewed): callers that keep them past the buffers' next update pass copies (the autograd
    functions copy the mean, which their backward reads), inference skips the copies and the
    views.
    """
    cdtype = compute_dtype(x.dtype)
    if stats is None:
        mean, var = moments(x, layout.reduce_dims, center=layout.center)
    else:
        mean, var = (s.to(cdtype).reshape(layout.param_shape) for s in stats)
    invstd = (var + eps).rsqrt()
    xc = x.to(cdtype)
    out = (xc - mean).mul_(invstd) if layout.center else xc * invstd
    if weight is not None:
        out.mul_(weight.to(cdtype).view(layout.param_shape))
    if bias is not None:
        out.add_(bias.to(cdtype).view(layout.param_shape))
    return out.to(x.dtype), mean, var, invstd


def normalize_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    layout: Layout,
    batch_stats: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reference backward: ``(grad_input, grad_weight, grad_bias)``; see the module docstring."""
    cdtype = mean.dtype
    go = grad_out.to(cdtype)
    xc = x.to(cdtype)
    x_hat = (xc - mean).mul_(invstd) if layout.center else xc * invstd
    sum_dims = _param_sum_dims(layout, x.dim())
    grad_weight = grad_bias = grad_input = None
    if needs[1] and weight is not None:
        grad_weight = _sum(go * x_hat, sum_dims).view(weight.shape).to(weight.dtype)
    if needs[2]:
        grad_bias = _sum(go, sum_dims)
    if needs[0]:
        g = go * weight.to(cdtype).view(layout.param_shape) if weight is not None else go
        if batch_stats:
            dims = list(layout.reduce_dims)
            proj = (g * x_hat).mean(dims, keepdim=True)
            grad_input = g - x_hat.mul_(proj)
            if layout.center:
                grad_input.sub_(g.mean(dims, keepdim=True))
            grad_input.mul_(invstd)
        else:
            grad_input = g * invstd
        grad_input = grad_input.to(x.dtype)
    return grad_input, grad_weight, grad_bias


_REFERENCE = kernels.Kernel(forward=normalize_forward, backward=normalize_backward)


class _Normalize(torch.autograd.Function):
    # One output: the statistics leave through `stats_out` instead (each extra output of an
    # autograd function, and marking it non-differentiable, is host time on every call).
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        op: str,
        layout: Layout,
        eps: float,
        fixed_mean: Tensor | None,
        fixed_var: Tensor | None,
        stats_out: list[Tensor],
    ) -> Tensor:
        kernel = kernels.select(op, x, _REFERENCE)
        stats = _graph_stats(fixed_mean, fixed_var)
        out, mean, var, invstd = kernel.forward(x, weight, bias, layout, eps, stats)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.kernel, ctx.layout, ctx.batch_stats = kernel, layout, stats is None
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        stats_out += (mean, var)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        return once_differentiable_backward(_normalize_backward, ctx, grad_out)


def _normalize_backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
    x, weight, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = ctx.kernel.backward(
        kernels.like(x, grad_out),
        x,
        weight,
        mean,
        invstd,
        ctx.layout,
        ctx.batch_stats,
        (needs[0], needs[1], needs[2]),
    )
    if grad_bias is not None:
        grad_bias = kernels.as_param_grad(grad_bias, *ctx.bias_meta)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def once_differentiable_backward(backward: Any, ctx: Any, *grads: Any) -> tuple[Any, ...]:
    """Run a hand-written (not differentiable) backward: directly in the common case, and under
    torch's ``once_differentiable`` when grad mode is on (``create_graph=True``), so that a
    double backward raises instead of silently returning a graph-less gradient. The decorator
    itself costs several microseconds on every backward."""
    if torch.is_grad_enabled():
        return once_differentiable(backward)(ctx, *grads)
    return backward(ctx, *grads)


def _graph_stats(fixed_mean: Tensor | None,
                 fixed_var: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """Fixed statistics for a graph: a copy of the mean, which kernels may return as the mean the
    backward reads, and the running buffers can move on before the backward runs. The variance
    needs none: the backward reads the invstd computed from it, always a new tensor (the var
    returned next to the output is then the buffer itself, as on the inference path)."""
    if fixed_mean is None or fixed_var is None:
        return None
    return fixed_mean.clone(), fixed_var


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    op: str,
    layout: Layout,
    eps: float,
    stats: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable normalize; returns ``(out, mean, var)`` with the statistics detached."""
    if not needs_graph(x, weight, bias):
        # Inference: the kernel directly, without an autograd node (its Python set-up costs more
        # than a small normalization).
        out, mean, var, _invstd = kernels.select(op, x, _REFERENCE).forward(
            x, weight, bias, layout, eps, stats)
        return out, mean, var
    fixed_mean, fixed_var = (None, None) if stats is None else stats
    stats_out: list[Tensor] = []
    out = _Normalize.apply(x, weight, bias, op, layout, eps, fixed_mean, fixed_var, stats_out)
    return out, stats_out[0], stats_out[1]


def needs_graph(*tensors: Tensor | None) -> bool:
    """Whether a call must go through the autograd function: some tensor needs a gradient, or a
    forward-mode AD level is active (dual tensors do not set requires_grad; skipping the function
    would drop their tangents silently instead of refusing them)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    # A private attribute (no public query exists); if it ever goes away, always take the graph.
    return getattr(forward_ad, "_current_level", 0) >= 0
