r"""Batch renormalization (Ioffe, 2017): batch norm whose training output matches inference.

Batch norm trains on the batch statistics :math:`\mu_B, \sigma_B` but infers with the running ones
:math:`\mu, \sigma`; with small or non-i.i.d. batches the two differ and the model that was trained
is not the model that is deployed. Batch renorm corrects the training output towards the running
statistics with two per-channel factors that are treated as constants (no gradient flows through
them):

.. math::
    \sigma_B = \sqrt{\sigma_B^2 + \epsilon}, \quad \sigma = \sqrt{\mathrm{running\_var} + \epsilon},
    \quad r = \mathrm{clip}\bigl(\sigma_B / \sigma,\; 1/r_{max},\; r_{max}\bigr), \quad
    d = \mathrm{clip}\bigl((\mu_B - \mu) / \sigma,\; -d_{max},\; d_{max}\bigr)

.. math::
    y = \gamma\,(\hat x\,r + d) + \beta = (\gamma r)\,\hat x + (\gamma d + \beta),
    \qquad \hat x = (x - \mu_B) / \sigma_B

With the clips inactive, :math:`\hat x\,r + d = (x - \mu)/\sigma`: exactly the inference output.
With :math:`r_{max} = 1, d_{max} = 0` it is batch norm. Because :math:`r, d` are constants, the
layer is the normalize primitive of :mod:`normlab.functional._normalize` with the effective weight
:math:`\gamma r` and bias :math:`\gamma d + \beta`; autograd through those two products gives the
paper's gradients exactly. Evaluation is batch norm's, with the running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._ops import normalize
from normlab.functional.batch_norm import (
    _readable,
    batch_norm_layout,
    check_values_per_channel,
    commit_running_stats,
    count_batch,
)
from normlab.functional.moments import moments
from normlab.nn.batchnorm import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]

Schedule = Callable[[int], tuple[float, float]]


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


def _check_limits(name: str, r_max: float, d_max: float) -> None:
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


class _BatchRenorm(_BatchNorm):
    """Batch renorm over normlab's batch norm module; see the module docstring for the math."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "error",
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_ramp_steps: int = 35000,
        d_max_ramp_steps: int = 20000,
        schedule: Schedule | None = None,
    ) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(
                f"{name}: batch renorm corrects batch statistics towards the running statistics, "
                "so it needs track_running_stats=True; without them use BatchNorm"
            )
        _check_limits(name, r_max, d_max)
        for arg, value in (("warmup_steps", warmup_steps), ("r_max_ramp_steps", r_max_ramp_steps),
                           ("d_max_ramp_steps", d_max_ramp_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {arg}={value!r} must be an integer >= 0")
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"{name}: schedule must be a callable step -> (r_max, d_max), "
                f"got {type(schedule).__name__}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            on_nonfinite=on_nonfinite,
        )
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.r_max_ramp_steps = r_max_ramp_steps
        self.d_max_ramp_steps = d_max_ramp_steps
        self.schedule = schedule

    def _step_limits(self) -> tuple[float, float] | tuple[Tensor, Tensor]:
        """The limits for this training step: as Python floats where the step counter can be read,
        else (torch.compile, torch.export, fake or meta buffers) the built-in schedule as tensor
        ops on the counter, so tracing needs no value from it. A custom `schedule` takes a
        Python step, so it reads the counter (a graph break under torch.compile)."""
        counter = self.num_batches_tracked
        if self.schedule is not None or _readable(counter):
            return self.limits()
        step = counter.to(torch.float32)
        started = (step >= self.warmup_steps).to(torch.float32)

        def ramp(length: int) -> Tensor:
            if length <= 0:
                return started
            return ((step - self.warmup_steps) / length).clamp(0.0, 1.0) * started

        r_max = 1.0 + (self.r_max - 1.0) * ramp(self.r_max_ramp_steps)
        return r_max, self.d_max * ramp(self.d_max_ramp_steps)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` at `step` (default: the next training step, num_batches_tracked)."""
        if step is None:
            step = int(self.num_batches_tracked)
        if self.schedule is not None:
            r_max, d_max = (float(u) for u in self.schedule(step))
        else:
            r_max, d_max = renorm_limits(
                step, self.r_max, self.d_max, self.warmup_steps,
                self.r_max_ramp_steps, self.d_max_ramp_steps,
            )
        _check_limits(f"{type(self).__name__} (schedule at step {step})", r_max, d_max)
        return r_max, d_max

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.numel() == 0:
            return super().forward(input)
        self._check_input_dim(input)
        name = type(self).__name__
        for pname in ("weight", "bias", "running_mean", "running_var"):
            v.check_param(name, pname, getattr(self, pname), input, (self.num_features,))
        count = check_values_per_channel(name, input)
        r_max, d_max = self._step_limits()
        momentum = self._next_momentum()
        layout = batch_norm_layout(input.dim(), self.num_features)
        with torch.no_grad():
            # One extra statistics pass, outside autograd: r and d must be known before the fused
            # normalize, which recomputes the same moments (same routine, same result).
            mean, var = moments(input, layout.reduce_dims)
            mean, var = mean.reshape(-1), var.reshape(-1)
            run_std = (self.running_var.to(var.dtype) + self.eps).sqrt()
            r = torch.clamp((var + self.eps).sqrt() / run_std, 1.0 / r_max, r_max)
            d = torch.clamp((mean - self.running_mean.to(mean.dtype)) / run_std, -d_max, d_max)
        weight, bias = self.weight, self.bias
        pdtype = weight.dtype if weight is not None else r.dtype
        r, d = r.to(pdtype), d.to(pdtype)
        eff_weight = r if weight is None else weight * r
        eff_bias = d if weight is None else weight * d
        if bias is not None:
            eff_bias = eff_bias + bias
        out, _, _ = normalize(input, eff_weight, eff_bias, "batch_norm", layout, self.eps)
        # The paper's order: r and d above used the running statistics from before this batch.
        # The counter moves only once the statistics are in: a rejected call changes no state.
        committed = commit_running_stats(
            name, self.running_mean, self.running_var, mean, var, count, momentum,
            self.on_nonfinite,
        )
        count_batch(self.num_batches_tracked, committed)
        return out

    def extra_repr(self) -> str:
        if self.schedule is not None:
            sched = f"schedule={getattr(self.schedule, '__name__', repr(self.schedule))}"
        else:
            sched = (
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_ramp_steps={self.r_max_ramp_steps}, "
                f"d_max_ramp_steps={self.d_max_ramp_steps}"
            )
        return f"{super().extra_repr()}, {sched}"


_ARGS_DOC = """
    Args:
        num_features: C.
        eps: added to the variance (> 0); also inside sigma = sqrt(running_var + eps).
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average.
        affine: learnable per-channel weight (gamma) and bias (beta).
        track_running_stats: must be True (renorm is defined through the running statistics);
            kept so the constructor matches BatchNorm's.
        bias: learnable beta when ``affine`` (keyword-only, as in torch).
        on_nonfinite: a training batch with NaN/inf statistics raises ("error", default; no
            state changes), is left out of the running statistics with a warning ("skip"), or
            is committed as torch does ("commit"); as BatchNorm's.
        r_max: final clip of r to [1/r_max, r_max] (>= 1; 1 turns the scale correction off).
        d_max: final clip of d to [-d_max, d_max] (>= 0; 0 turns the shift correction off).
        warmup_steps: training steps of plain batch norm (r_max = 1, d_max = 0) first.
        r_max_ramp_steps: steps after the warm-up over which r_max grows linearly from 1.
        d_max_ramp_steps: steps after the warm-up over which d_max grows linearly from 0.
        schedule: optional callable ``step -> (r_max, d_max)`` replacing the five arguments above.

    The step is ``num_batches_tracked`` before the current batch (0 on the first training call),
    so the schedule is saved and restored with the ``state_dict``, whose keys are exactly
    BatchNorm's. The defaults are the paper's: batch norm for 5k steps, then r_max -> 3 by 40k
    and d_max -> 5 by 25k (:func:`renorm_limits`). Pass ``warmup_steps=0, r_max_ramp_steps=0,
    d_max_ramp_steps=0`` for constant limits.

    Note:
        r and d are computed from the running statistics *before* this batch updates them, as in
        the paper's Algorithm 1; the running statistics are then updated as in batch norm (mean
        and Bessel-corrected variance, torch's momentum convention). The paper averages sigma
        rather than the variance; normlab keeps torch's running_var so state dicts interchange
        with BatchNorm.
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = (
        "Batch renorm (Ioffe 2017) over a (N, C) or (N, C, L) input; math in "
        ":mod:`normlab.nn.renorm`.\n" + _ARGS_DOC + "\n    Shape:\n        Input (N, C) or "
        "(N, C, L); output the same.\n"
    )
    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = (
        "Batch renorm (Ioffe 2017) over a (N, C, H, W) input; math in :mod:`normlab.nn.renorm`.\n"
        + _ARGS_DOC + "\n    Shape:\n        Input (N, C, H, W); output the same.\n"
    )
    _expected_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = (
        "Batch renorm (Ioffe 2017) over a (N, C, D, H, W) input; math in "
        ":mod:`normlab.nn.renorm`.\n" + _ARGS_DOC + "\n    Shape:\n        Input (N, C, D, H, W); "
        "output the same.\n"
    )
    _expected_dims = (5,)
