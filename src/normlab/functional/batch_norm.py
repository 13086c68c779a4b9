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

from normlab.functional import _ops
from normlab.functional import _validate as v
from normlab.functional._normalize import (
    Layout,
    update_running_stats,  # noqa: F401  (re-exported: the running_stats kernel's reference)
    updated_running_stats,
)
from normlab.functional._ops import normalize

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
    ``normlab::update_running_stats_`` op (one C++ call on the CPU). Under a tracer
    (``torch.compile``, ``torch.export``, ``torch.jit.trace``) or on fake/meta tensors the flag is
    returned as a tensor: "error" becomes an in-graph assertion (a RuntimeError when it fails)
    and "skip" behaves as "mask".
    """
    committed = _ops.commit_flag(running_mean, running_var, mean, var, count, momentum,
                                 on_nonfinite != "commit")
    if isinstance(committed, bool):  # the eager CPU path
        return _settle(op, committed, mean, var, on_nonfinite)
    if not _readable(committed):
        # Traced (torch.compile, export, jit) or fake/meta: nothing can be read back, and the op
        # already left the buffers alone for a non-finite batch; "error" becomes an assertion in
        # the graph, "skip" the same as "mask" (a warning would need the value on the host).
        if on_nonfinite == "error":
            torch._assert_async(committed, f"{op}: the batch statistics are NaN or infinite; "
                                "the running statistics were not updated")
        return committed
    if on_nonfinite == "mask" and not mean.is_cpu:
        return committed  # stays on the device: no synchronization
    return _settle(op, bool(committed.item()), mean, var, on_nonfinite)


def _settle(op: str, committed: bool, mean: Tensor, var: Tensor, on_nonfinite: str) -> bool:
    """The policy's answer once the flag is on the host: True, or False with a warning ("skip")
    or nothing ("mask"), or the error naming the channels ("error")."""
    if committed:
        return True
    if on_nonfinite == "mask":
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
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return False


def _readable(flag: Tensor) -> bool:
    """Whether a commit flag can be read on the host now: a plain tensor with data, outside any
    tracer."""
    return (type(flag) is Tensor and not flag.is_meta and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None)


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
    v.check_running_buffers(op, running_mean, running_var)
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
