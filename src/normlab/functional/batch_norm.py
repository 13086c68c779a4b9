r"""Batch normalization (Ioffe & Szegedy, 2015), with torch.nn.functional.batch_norm's contract.

Training normalizes each channel with the mini-batch mean and *biased* variance over (N, *spatial)
and folds them into the running estimates with Bessel's correction, ``m / (m - 1)``, as the paper's
Algorithm 2 and torch do. Evaluation normalizes with the running estimates, which turns the layer
into one fixed affine map per channel. Math and backward: :mod:`normlab.functional._normalize`.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from normlab import kernels
from normlab.functional import _validate as v
from normlab.functional._normalize import Layout, normalize

__all__ = [
    "batch_norm",
    "batch_norm_layout",
    "batch_norm_with_status",
    "check_batch_norm_args",
    "check_values_per_channel",
    "commit_running_stats",
    "count_batch",
    "updated_running_stats",
]


@functools.lru_cache(maxsize=256)
def batch_norm_layout(ndim: int, num_channels: int) -> Layout:
    """Statistics per channel (dim 1) over the batch and all spatial dims."""
    spatial = tuple(range(2, ndim))
    return Layout(reduce_dims=(0, *spatial), param_shape=(1, num_channels, *(1,) * len(spatial)))


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


NONFINITE_POLICIES = ("error", "skip", "commit", "mask")


def commit_running_stats(
    op: str,
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    on_nonfinite: str = "error",
) -> bool | Tensor:
    """Fold one batch's statistics into the running buffers, in place; returns whether it did.

    A batch whose statistics are NaN or infinite would poison the running estimates for every
    later evaluation, so by default it is refused before anything changes (`on_nonfinite`:
    "error" raises naming the channels, "skip" warns and leaves the buffers alone, "commit" keeps
    torch's behaviour, "mask" leaves the buffers alone silently and without reading anything back
    from the device: off the CPU the update is selected on the device and the return value is
    that 0-dim bool tensor, for :func:`count_batch`). Low-precision buffers saturate at their
    dtype's largest value instead of overflowing to inf. The update itself is the
    ``"running_stats"`` kernel (one C++ call on the CPU; :func:`update_running_stats` else).
    """
    if on_nonfinite == "mask" and not mean.is_cpu:
        return _commit_masked(running_mean, running_var, mean, var, count, momentum)
    kernel = kernels.select("running_stats", mean, _RUNNING_STATS_REFERENCE)
    if kernel.forward(running_mean, running_var, mean, var, count, momentum,
                      on_nonfinite != "commit"):
        return True
    if on_nonfinite == "mask":  # on the CPU the check reads nothing back from a device
        return False
    bad = ~(torch.isfinite(mean.reshape(-1)) & torch.isfinite(var.reshape(-1)))
    channels = bad.nonzero().flatten().tolist()
    shown = channels[:10] + (["..."] if len(channels) > 10 else [])
    message = (
        f"{op}: the batch statistics are NaN or infinite in channel(s) {shown} "
        f"({len(channels)} of {bad.numel()}); the running statistics were not updated"
    )
    if on_nonfinite == "error":
        raise FloatingPointError(
            message + ". Find the non-finite input, or pass on_nonfinite='skip' to "
            "drop such batches from the running statistics with a warning"
        )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


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


_RUNNING_STATS_REFERENCE = kernels.Kernel(forward=update_running_stats)


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
def _commit_masked(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                   count: int, momentum: float) -> Tensor:
    # No host read-back (on a GPU that would be a synchronization every training step): the
    # finiteness flag stays on the device and selects between the new and the old values.
    ok = _nonfinite_probe(mean, var) == 0
    _write_running_stats(running_mean, running_var, mean, var, count, momentum, keep=ok)
    return ok


def count_batch(num_batches_tracked: Tensor | None, committed: bool | Tensor) -> None:
    """Advance a module's batch counter by one batch whose statistics went in: by the device
    flag itself under ``on_nonfinite="mask"`` (never read back), else when `committed` is true."""
    if num_batches_tracked is None:
        return
    if isinstance(committed, Tensor):
        num_batches_tracked.add_(committed.to(num_batches_tracked.dtype))
    elif committed:
        num_batches_tracked.add_(1)


def check_values_per_channel(op: str, input: Tensor) -> int:
    """Values per channel of an (N, C, *) batch; raises if training would divide by zero."""
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if count == 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}; use a larger batch, or GroupNorm/LayerNorm for batch size 1"
        )
    return count


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    on_nonfinite: str = "error",
) -> Tensor:
    """Batch norm over channel dim 1 of an (N, C, *) input; same contract as torch's.

    In training, batch statistics normalize the input and, when the running buffers are given,
    update them in place (exponential average with weight `momentum` for the new batch). In
    evaluation, the running buffers normalize the input.

    Args:
        on_nonfinite: what to do with running statistics when a training batch has NaN/inf
            statistics: "error" (default), "skip" (warn, keep the buffers), "commit" (torch) or
            "mask" (keep the buffers silently, with no device read-back: no GPU synchronization).
            The output always carries the non-finite values; they are never masked.

    Raises:
        TypeError: non-floating input, or parameters of an incompatible dtype.
        ValueError: input of fewer than 2 dims, parameter shape mismatch, one value per channel in
            training, eval mode without running statistics, invalid eps or momentum.
        FloatingPointError: non-finite batch statistics with ``on_nonfinite="error"``.
    """
    return batch_norm_with_status(
        input, running_mean, running_var, weight, bias, training, momentum, eps, on_nonfinite
    )[0]


def batch_norm_with_status(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    on_nonfinite: str = "error",
) -> tuple[Tensor, bool | Tensor]:
    """:func:`batch_norm`, also saying whether the running statistics were updated."""
    op = "batch_norm"
    layout = check_batch_norm_args(
        op, input, running_mean, running_var, weight, bias, training, momentum, eps, on_nonfinite
    )
    if not training:
        assert running_mean is not None and running_var is not None
        return normalize(input, weight, bias, op, layout, eps, (running_mean, running_var))[0], False
    count = check_values_per_channel(op, input)
    out, mean, var = normalize(input, weight, bias, op, layout, eps)
    committed = False
    if running_mean is not None and running_var is not None and count > 0:
        committed = commit_running_stats(
            op, running_mean, running_var, mean, var, count, momentum, on_nonfinite
        )
    return out, committed


def check_batch_norm_args(
    op: str,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    on_nonfinite: str,
) -> Layout:
    """Every check of a batch-norm call (plain or fused), before any state changes; returns the
    layout of its statistics."""
    v.check_float_input(op, input)
    v.check_min_dim(op, input, 2, "(N, C, *)")
    v.check_eps(op, eps)
    v.check_momentum(op, momentum, allow_none=False)
    check_nonfinite_policy(op, on_nonfinite)
    c = input.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        v.check_param(op, name, t, input, (c,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(
            f"{op}: evaluation (training=False) normalizes with running statistics, "
            "but running_mean and running_var are None"
        )
    return batch_norm_layout(input.dim(), c)


def check_nonfinite_policy(op: str, on_nonfinite: str) -> None:
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"{op}: on_nonfinite={on_nonfinite!r} must be one of {list(NONFINITE_POLICIES)}"
        )
