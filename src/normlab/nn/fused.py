"""Fused normalization modules: norm + activation and residual-add + norm.

Each module subclasses the drop-in twin of the norm it fuses, so its parameters, buffers,
``state_dict`` keys and ``extra_repr`` are those of ``torch.nn.BatchNorm2d`` / ``GroupNorm`` /
``LayerNorm`` / ``RMSNorm`` (a checkpoint loads both ways with ``strict=True``); only ``forward``
changes. Math and numerics: :mod:`normlab.functional.fused`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from normlab.functional.fused import (
    _check_activation,
    add_layer_norm,
    add_rms_norm,
    batch_norm_act_with_status,
    group_norm_act,
)
from normlab.nn.batchnorm import BatchNorm2d
from normlab.nn.normalization import GroupNorm, LayerNorm, RMSNorm

__all__ = ["BatchNormAct2d", "FusedAddLayerNorm", "FusedAddRMSNorm", "GroupNormAct"]


class BatchNormAct2d(BatchNorm2d):
    """``activation(BatchNorm2d(x))`` fused; see :func:`normlab.functional.fused.batch_norm_act`.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias: as
            :class:`normlab.nn.BatchNorm2d`.
        activation: ``"relu"`` (default), ``"silu"``, ``"gelu"`` or None (keyword-only).

    Shape:
        Input (N, C, H, W), contiguous or channels_last; output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, bias: bool = True, activation: str | None = "relu",
                 on_nonfinite: str = "error") -> None:
        _check_activation(type(self).__name__, activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, on_nonfinite=on_nonfinite)
        self.activation = activation

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
        return batch_norm_act_with_status(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            self.activation, self.on_nonfinite,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class GroupNormAct(GroupNorm):
    """``activation(GroupNorm(x))`` fused; see :func:`normlab.functional.fused.group_norm_act`.

    Args:
        num_groups, num_channels, eps, affine, bias: as :class:`normlab.nn.GroupNorm`.
        activation: ``"relu"`` (default), ``"silu"``, ``"gelu"`` or None (keyword-only).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True, activation: str | None = "relu") -> None:
        _check_activation(type(self).__name__, activation)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNormAct: expected an (N, {self.num_channels}, *) input, "
                f"got shape {list(input.shape)}"
            )
        return group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps,
                              self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class FusedAddLayerNorm(LayerNorm):
    """``s = input + residual; (activation(LayerNorm(s)), s)`` fused; see
    :func:`normlab.functional.fused.add_layer_norm`.

    Args:
        normalized_shape, eps, elementwise_affine, bias: as :class:`normlab.nn.LayerNorm`.
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"``
            (keyword-only).

    Shape:
        input and residual (*, *normalized_shape); both outputs the same.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, activation: str | None = None) -> None:
        _check_activation(type(self).__name__, activation)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias,
                              self.eps, self.activation)

    def extra_repr(self) -> str:
        return _with_activation(super().extra_repr(), self.activation)


class FusedAddRMSNorm(RMSNorm):
    """``s = input + residual; (activation(RMSNorm(s)), s)`` fused; see
    :func:`normlab.functional.fused.add_rms_norm`.

    Args:
        normalized_shape, eps, elementwise_affine: as :class:`normlab.nn.RMSNorm`.
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"``
            (keyword-only).
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, device: Any = None, dtype: Any = None, *,
                 activation: str | None = None) -> None:
        _check_activation(type(self).__name__, activation)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                            self.activation)

    def extra_repr(self) -> str:
        return _with_activation(super().extra_repr(), self.activation)


def _with_activation(base: str, activation: str | None) -> str:
    # The plain add + norm keeps the norm's repr, so existing printouts do not change.
    return base if activation is None else f"{base}, activation={activation!r}"
