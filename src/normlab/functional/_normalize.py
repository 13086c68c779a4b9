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

import torch
from torch import Tensor

from normlab import kernels
from normlab.functional.moments import compute_dtype, moments
from normlab.kernels.problems import Layout, grouped_layout, trailing_layout

# Layout and its factories live with the kernel problems they are planned into; they are part of
# this module's vocabulary, so they are importable from here too.
__all__ = ["Layout", "grouped_layout", "trailing_layout"]


def _param_sum_dims(layout: Layout, ndim: int) -> list[int]:
    """Dims along which weight/bias broadcast, so their gradients sum over them."""
    lead = ndim - len(layout.param_shape)
    return [d for d in range(ndim) if d < lead or layout.param_shape[d - lead] == 1]


def _sum(t: Tensor, dims: list[int]) -> Tensor:
    # torch's sum over an empty dim list reduces everything; here it must be the identity (a
    # copy: an op's gradient may not alias the incoming gradient).
    return t.sum(dims) if dims else t.clone()


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
    out = affine_normalized(x, mean, invstd, weight, bias, layout)
    return out.to(x.dtype), mean, var, invstd


def affine_normalized(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                      bias: Tensor | None, layout: Layout, inplace: bool = True) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in the statistics' dtype (without the mean for RMS
    norm). ``inplace`` updates the fresh intermediate instead of allocating at every step;
    decompositions and graphs that are differentiated again want plain out-of-place ops."""
    cdtype = mean.dtype
    xc = x.to(cdtype)
    mul, add = (Tensor.mul_, Tensor.add_) if inplace else (torch.mul, torch.add)
    z = mul(xc - mean, invstd) if layout.center else xc * invstd
    if weight is not None:
        z = mul(z, weight.to(cdtype).view(layout.param_shape))
    if bias is not None:
        z = add(z, bias.to(cdtype).view(layout.param_shape))
    return z


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
    x_hat = affine_normalized(x, mean, invstd, None, None, layout)
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


# ------------------------------------------------------------------------------------------------
# Fused activation and residual add (the references of the fused kernels).

ACTIVATIONS = (None, "relu", "silu", "gelu")


def activate(z: Tensor, activation: str | None) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return z


def activation_grad(z: Tensor, activation: str | None) -> Tensor:
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


def norm_act_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Layout, eps: float,
    stats: tuple[Tensor, Tensor] | None, activation: str | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(activation(norm(x)), mean, var, invstd)``."""
    z, mean, var, invstd = normalize_forward(x, weight, bias, layout, eps, stats)
    return activate(z, activation), mean, var, invstd


def norm_act_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    invstd: Tensor, layout: Layout, batch_stats: bool, needs: tuple[bool, bool, bool],
    activation: str | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reference: recompute the pre-activation ``z``, then the norm's backward on
    ``grad_out * activation'(z)``."""
    z = affine_normalized(x, mean, invstd, weight, bias, layout)
    grad_z = (grad_out.to(mean.dtype) * activation_grad(z, activation)).to(x.dtype)
    return normalize_backward(grad_z, x, weight, mean, invstd, layout, batch_stats, needs)


def add_norm_forward(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Layout,
    eps: float, activation: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reference: ``(out, sum, mean, var, invstd)`` with ``sum = x + residual`` and
    ``out = activation(norm(sum))``."""
    s = x + residual
    z, mean, var, invstd = normalize_forward(s, weight, bias, layout, eps)
    return activate(z, activation), s, mean, var, invstd


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


# ------------------------------------------------------------------------------------------------
# Running statistics (the reference of the "running_stats" kernel).


def updated_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """New running (mean, var) after one batch; pure (the inputs are not modified).

    Args:
        running_mean, running_var: current estimates, shape (C,).
        mean, var: the batch's mean and *biased* variance, any shape with C elements.
        count: samples per channel behind `var`; the stored variance is unbiased, var * n/(n-1).
        momentum: weight of the new batch (torch's convention; Flax/Keras use decay = 1 - momentum).
    """
    unbiased = var.reshape(-1) * (count / max(count - 1, 1))
    new_mean = torch.lerp(running_mean.to(mean.dtype), mean.reshape(-1), momentum)
    new_var = torch.lerp(running_var.to(var.dtype), unbiased, momentum)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float, check: bool) -> bool:
    """Reference for the ``"running_stats"`` kernel: fold one batch into the buffers in place and
    return True, or, with `check` and a NaN/inf statistic, change nothing and return False."""
    # One scalar check on the common path (a read-back: on a GPU, a synchronization).
    if check and _nonfinite_probe(mean, var).item() != 0:
        return False
    with torch.no_grad():
        if running_mean.dtype == running_var.dtype == mean.dtype == var.dtype and \
                running_mean.dtype not in (torch.float16, torch.bfloat16):
            # The common case in place: three small ops instead of ten.
            running_mean.lerp_(mean.reshape(-1), momentum)
            running_var.lerp_(var.reshape(-1) * (count / max(count - 1, 1)), momentum)
        else:
            _write_running_stats(running_mean, running_var, mean, var, count, momentum)
    return True


def _write_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float, keep: Tensor | None = None) -> None:
    """The general update (any dtypes): low-precision buffers saturate instead of overflowing;
    with `keep` (a 0-dim bool on the device) the new values go in only where it is true."""
    new_mean, new_var = updated_running_stats(running_mean, running_var, mean, var, count, momentum)
    for buffer, new in ((running_mean, new_mean), (running_var, new_var)):
        if buffer.dtype in (torch.float16, torch.bfloat16):
            limit = torch.finfo(buffer.dtype).max
            new = new.clamp(-limit, limit)
        buffer.copy_(new if keep is None else torch.where(keep, new, buffer))


def _nonfinite_probe(mean: Tensor, var: Tensor) -> Tensor:
    """0 when every statistic is finite, NaN otherwise: m - m + v - v is exactly 0 for finite
    values and NaN for inf or NaN, and a sum of zeros cannot overflow (a sum of the statistics
    themselves can, sending a healthy batch with very large activations down the per-channel
    search). Five small ops where isfinite of a sum took eight."""
    return (mean - mean).add_(var).sub_(var).sum()


@torch.no_grad()
def update_running_stats_masked(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                                var: Tensor, count: int, momentum: float) -> Tensor:
    """The update without a host read-back (on a GPU that would be a synchronization every
    training step): the finiteness flag stays on the device and selects between the new and the
    old values; returns it (a 0-dim bool tensor)."""
    ok = _nonfinite_probe(mean, var) == 0
    _write_running_stats(running_mean, running_var, mean, var, count, momentum, keep=ok)
    return ok


# The references every fast kernel falls back to and is tested against (see normlab.kernels).
REFERENCE = kernels.Kernel(forward=normalize_forward, backward=normalize_backward)
NORM_ACT_REFERENCE = kernels.Kernel(forward=norm_act_forward, backward=norm_act_backward)
ADD_NORM_REFERENCE = kernels.Kernel(forward=add_norm_forward, backward=add_norm_backward)
RUNNING_STATS_REFERENCE = kernels.Kernel(forward=update_running_stats)
