"""Batch and instance norm modules: drop-in twins of torch.nn's, over normlab.functional.

Same constructor arguments, attributes, ``state_dict`` keys (``num_batches_tracked`` included),
``extra_repr`` and train/eval behaviour as ``torch.nn.BatchNorm*d`` / ``InstanceNorm*d``; a state
dict saved from one loads into the other with ``strict=True``. The modules only own parameters and
buffers and decide which statistics to use; the math is in the functional ops.

Note:
    ``momentum`` is the weight of the *new* batch (torch's convention, default 0.1) and ``None``
    means a cumulative average over all batches seen; Flax and Keras instead use a decay of 0.99
    (= 1 - momentum) and store the biased variance. normlab stores the Bessel-corrected variance.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from normlab import functional as F
from normlab.functional import _validate as v
from normlab.functional.batch_norm import (
    batch_norm_with_status,
    check_nonfinite_policy,
    count_batch,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


class _NormBase(Module):
    """Parameters, buffers and state-dict compatibility shared by batch and instance norm."""

    _version = 2
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

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
    ) -> None:
        super().__init__()
        name = type(self).__name__
        v.check_positive_int(name, "num_features", num_features)
        v.check_eps(name, eps)
        v.check_momentum(name, momentum)
        check_nonfinite_policy(name, on_nonfinite)
        # What a training batch with NaN/inf statistics does to the running statistics:
        # "error" (default), "skip" with a warning, or "commit" (torch's behaviour).
        self.on_nonfinite = on_nonfinite
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints from before version 2 have no num_batches_tracked: start it at 0.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _BatchNorm(_NormBase):
    _expected_dims: tuple[int, ...] = ()

    def _check_input_dim(self, input: Tensor) -> None:
        v.check_float_input(type(self).__name__, input)
        if input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__}: expected {want} input (got {input.dim()}D input "
                f"of shape {list(input.shape)})"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels in dim 1 "
                f"(num_features), got input of shape {list(input.shape)}"
            )

    def _next_momentum(self) -> float:
        """Weight of the next batch in the running average (the counter is not moved)."""
        if self.momentum is None:  # cumulative moving average
            assert self.num_batches_tracked is not None
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return self.momentum

    def _batch_norm(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[Tensor, bool]:
        """The functional op behind this module: (output, whether the statistics were updated).
        Fused subclasses swap it; the buffer logic in forward stays shared."""
        return batch_norm_with_status(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            self.on_nonfinite,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Batch statistics in training, and in eval when no running statistics are kept.
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        track = update or not self.training
        out, committed = self._batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self._next_momentum() if update else 0.0,
            self.eps,
        )
        # The counter moves only once the statistics are in: a rejected call changes no state.
        count_batch(self.num_batches_tracked, committed)
        return out


class BatchNorm1d(_BatchNorm):
    """Batch norm over a (N, C) or (N, C, L) input; see :func:`normlab.functional.batch_norm`.

    Args:
        num_features: C.
        eps: added to the variance for numerical stability (> 0).
        momentum: weight of the new batch in the running statistics; None for a cumulative
            average.
        affine: learnable per-channel weight (gamma) and bias (beta).
        track_running_stats: keep running statistics for evaluation; if False, batch statistics
            are used in evaluation too.
        bias: learnable beta when ``affine`` (keyword-only, as in torch).
        on_nonfinite: a training batch whose statistics are NaN/inf is refused with an error
            ("error", default; the buffers and counter stay as they were), dropped from the
            running statistics with a warning ("skip"), committed as torch does ("commit"), or
            dropped silently without reading anything back from the device ("mask": no GPU
            synchronization per training step; the counter advances by the device flag).

    Shape:
        Input (N, C) or (N, C, L); output the same.
    """

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over a (N, C, H, W) input; arguments as :class:`BatchNorm1d`."""

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over a (N, C, D, H, W) input; arguments as :class:`BatchNorm1d`."""

    _expected_dims = (5,)


class _InstanceNorm(_NormBase):
    _batched_dim: int = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        on_nonfinite: str = "error",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            on_nonfinite=on_nonfinite,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        name = type(self).__name__
        v.check_float_input(name, input)
        if input.dim() not in (self._batched_dim - 1, self._batched_dim):
            raise ValueError(
                f"{name}: expected {self._batched_dim - 1}D (unbatched) or "
                f"{self._batched_dim}D (batched) input (got {input.dim()}D input "
                f"of shape {list(input.shape)})"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version is None and not self.track_running_stats:
            # Checkpoints from before torch 0.4 carry running statistics instance norm never uses.
            stale = [
                prefix + k for k in ("running_mean", "running_var") if prefix + k in state_dict
            ]
            if stale:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {' and '.join(stale)} for "
                    f"{type(self).__name__} with track_running_stats=False; remove them from the "
                    "state dict, or construct the module with track_running_stats=True"
                )
                for key in stale:
                    state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        unbatched = input.dim() == self._batched_dim - 1
        feature_dim = 0 if unbatched else 1
        if input.shape[feature_dim] != self.num_features:
            if self.affine or self.track_running_stats:
                raise ValueError(
                    f"{type(self).__name__}: expected input's size at dim={feature_dim} to match "
                    f"num_features ({self.num_features}), got input of shape {list(input.shape)}"
                )
            warnings.warn(
                f"{type(self).__name__}: input's size at dim={feature_dim} does not match "
                "num_features, which is unused because affine=False and "
                "track_running_stats=False",
                stacklevel=2,
            )
        x = input.unsqueeze(0) if unbatched else input
        out = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            on_nonfinite=self.on_nonfinite,
        )
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over a (N, C, L) or (C, L) input; see :func:`normlab.functional.instance_norm`.

    Args:
        num_features: C.
        eps: added to the variance (> 0).
        momentum: weight of the new batch in the running statistics.
        affine: learnable per-channel weight and bias (default False, as in torch).
        track_running_stats: keep running statistics and use them in evaluation (default False).

    Shape:
        Input (N, C, L) or (C, L); output the same.
    """

    _batched_dim = 3


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over a (N, C, H, W) or (C, H, W) input; arguments as :class:`InstanceNorm1d`."""

    _batched_dim = 4


class InstanceNorm3d(_InstanceNorm):
    """Instance norm over a (N, C, D, H, W) or (C, D, H, W) input; arguments as
    :class:`InstanceNorm1d`."""

    _batched_dim = 5
