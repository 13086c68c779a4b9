r"""Batch renormalization's correction (Ioffe, 2017), as pure functions of the statistics.

Batch norm trains on the batch statistics :math:`\mu_B, \sigma_B` but infers with the running ones
:math:`\mu, \sigma`; batch renorm corrects the training output towards the running statistics
with two per-channel factors treated as constants (no gradient flows through them):

.. math::
    \sigma_B = \sqrt{\sigma_B^2 + \epsilon}, \quad \sigma = \sqrt{\mathrm{running\_var} + \epsilon},
    \quad r = \mathrm{clip}\bigl(\sigma_B / \sigma,\; 1/r_{max},\; r_{max}\bigr), \quad
    d = \mathrm{clip}\bigl((\mu_B - \mu) / \sigma,\; -d_{max},\; d_{max}\bigr)

.. math::
    y = \gamma\,(\hat x\,r + d) + \beta = (\gamma r)\,\hat x + (\gamma d + \beta)

so the layer is the normalize primitive with the effective weight :math:`\gamma r` and bias
:math:`\gamma d + \beta` (:func:`renorm_affine`); autograd through those two products gives the
paper's gradients exactly. The module is :class:`normlab.nn.BatchRenorm2d`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_renorm_limits", "renorm_affine", "renorm_correction", "renorm_limits",
           "renorm_limits_traced"]


def renorm_limits(
    step: int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_ramp_steps: int = 35000,
    d_max_ramp_steps: int = 20000,
) -> tuple[float, float]:
    """The clipping limits ``(r_max, d_max)`` in force at training step `step`.

    The paper's schedule (Ioffe 2017, Sec. 4): plain batch norm (``r_max = 1, d_max = 0``) for the
    first `warmup_steps`, then linear ramps to the final values, reached at step
    ``warmup_steps + r_max_ramp_steps`` for r_max and ``warmup_steps + d_max_ramp_steps`` for
    d_max. The defaults give r_max = 3 by step 40k and d_max = 5 by step 25k. A ramp of 0 steps
    switches to the final value at the end of the warm-up.
    """
    def ramp(length: int) -> float:
        if step < warmup_steps:
            return 0.0
        if length <= 0:
            return 1.0
        return min(1.0, (step - warmup_steps) / length)

    return 1.0 + (r_max - 1.0) * ramp(r_max_ramp_steps), d_max * ramp(d_max_ramp_steps)


def check_renorm_limits(name: str, r_max: float, d_max: float) -> None:
    if not (math.isfinite(r_max) and r_max >= 1.0):
        raise ValueError(
            f"{name}: r_max={r_max!r} must be finite and >= 1 (r is clipped to [1/r_max, r_max]; "
            "r_max=1 turns the correction off)"
        )
    if not (math.isfinite(d_max) and d_max >= 0.0):
        raise ValueError(
            f"{name}: d_max={d_max!r} must be finite and >= 0 (d is clipped to [-d_max, d_max]; "
            "d_max=0 turns the correction off)"
        )


def renorm_limits_traced(
    step: Tensor,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_ramp_steps: int,
    d_max_ramp_steps: int,
) -> tuple[Tensor, Tensor]:
    """:func:`renorm_limits` as tensor ops on a step counter (a 0-dim tensor), so that tracing
    (torch.compile, torch.export, fake or meta buffers) needs no value from it."""
    step = step.to(torch.float32)
    started = (step >= warmup_steps).to(torch.float32)

    def ramp(length: int) -> Tensor:
        if length <= 0:
            return started
        return ((step - warmup_steps) / length).clamp(0.0, 1.0) * started

    return 1.0 + (r_max - 1.0) * ramp(r_max_ramp_steps), d_max * ramp(d_max_ramp_steps)


def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """The per-channel ``(r, d)`` of a batch with (biased) statistics `mean`, `var` against the
    running ones, clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]``; constants (computed
    without a graph)."""
    with torch.no_grad():
        run_std = (running_var.to(var.dtype) + eps).sqrt()
        r = torch.clamp((var + eps).sqrt() / run_std, 1.0 / r_max, r_max)
        d = torch.clamp((mean - running_mean.to(mean.dtype)) / run_std, -d_max, d_max)
    return r, d


def renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor,
                  d: Tensor) -> tuple[Tensor, Tensor]:
    """The effective ``(weight, bias) = (gamma r, gamma d + beta)`` the normalize primitive runs
    with (differentiable in `weight` and `bias`)."""
    pdtype = weight.dtype if weight is not None else r.dtype
    r, d = r.to(pdtype), d.to(pdtype)
    eff_weight = r if weight is None else weight * r
    eff_bias = d if weight is None else weight * d
    if bias is not None:
        eff_bias = eff_bias + bias
    return eff_weight, eff_bias
