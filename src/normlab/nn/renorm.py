r"""Batch renormalization (Ioffe, 2017): batch norm whose training output matches inference.

The correction and its schedule are :mod:`normlab.functional.batch_renorm`; this module owns the
parameters, the buffers and the step counter. Evaluation is batch norm's, with the running
statistics.
"""

from __future__ import annotations

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
from normlab.functional.batch_renorm import (
    check_renorm_limits,
    renorm_affine,
    renorm_correction,
    renorm_limits,
    renorm_limits_traced,
)
from normlab.functional.moments import moments
from normlab.nn.batchnorm import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]

Schedule = Callable[[int], tuple[float, float]]


class _BatchRenorm(_BatchNorm):
    """Batch renorm over normlab's batch norm module; the math: :mod:`normlab.functional.batch_renorm`."""

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
        check_renorm_limits(name, r_max, d_max)
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
        return renorm_limits_traced(counter, self.r_max, self.d_max, self.warmup_steps,
                                    self.r_max_ramp_steps, self.d_max_ramp_steps)

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
        check_renorm_limits(f"{type(self).__name__} (schedule at step {step})", r_max, d_max)
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
        r, d = renorm_correction(mean, var, self.running_mean, self.running_var, self.eps, r_max,
                                 d_max)
        eff_weight, eff_bias = renorm_affine(self.weight, self.bias, r, d)
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
