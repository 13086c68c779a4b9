r"""Frozen batch norm: batch norm's inference map with every statistic and parameter fixed.

.. math::
    y = x \cdot s + t, \qquad s = \gamma / \sqrt{\mathrm{running\_var} + \epsilon}, \qquad
    t = \beta - \mathrm{running\_mean} \cdot s

Detectron2 and torchvision fine-tune detection backbones this way: at a few images per GPU the
batch statistics are too noisy to train with, so the pre-trained statistics *and* the affine
parameters are frozen. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, not
parameters: optimizers never see them, they receive no gradient, and they travel with the
``state_dict`` under BatchNorm's key names. The gradient with respect to the input is
:math:`\partial L/\partial y \cdot s`. The map is computed by :func:`normlab.functional.batch_norm`
in evaluation mode, so a frozen layer gives exactly the output of the batch norm it came from.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import Module

from normlab import functional as F
from normlab.functional import _validate as v

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

_Frozen = TypeVar("_Frozen", bound="_FrozenBatchNorm")


class _FrozenBatchNorm(Module):
    """Fixed per-channel affine map with batch norm's buffers; see the module docstring."""

    _expected_dims: tuple[int, ...] = ()
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        v.check_positive_int(name, "num_features", num_features)
        v.check_eps(name, eps)
        self.num_features = num_features
        self.eps = eps
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batchnorm(cls: type[_Frozen], bn: Module) -> _Frozen:
        """A frozen copy of a batch norm's inference map (torch's or normlab's, any subclass).

        The statistics and affine parameters are copied (``affine=False`` gives weight 1 and bias
        0, ``bias=False`` bias 0), on the batch norm's device and dtype; the batch norm is not
        modified.

        Raises:
            ValueError: `bn` keeps no running statistics (its evaluation normalizes with batch
                statistics, which cannot be frozen), or lacks batch norm's attributes.
        """
        name = f"{cls.__name__}.from_batchnorm"
        missing = [a for a in ("num_features", "eps", "running_mean") if not hasattr(bn, a)]
        if missing:
            raise ValueError(
                f"{name}: expected a batch norm module, got {type(bn).__name__} "
                f"(no attribute {', '.join(missing)})"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{name}: {type(bn).__name__} has no running statistics "
                "(track_running_stats=False), so its evaluation uses batch statistics and there "
                "is no fixed map to freeze"
            )
        mean: Tensor = bn.running_mean
        frozen = cls(bn.num_features, bn.eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
        frozen.train(bn.training)
        return frozen

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(s, t)`` of ``y = x * s + t``, in the buffers' dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        v.check_float_input(name, input)
        if input.dim() not in self._expected_dims:
            want = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"{name}: expected {want} input (got {input.dim()}D input of shape "
                f"{list(input.shape)})"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} channels in dim 1 (num_features), got "
                f"input of shape {list(input.shape)}"
            )
        # Evaluation-mode batch norm *is* the frozen map, whatever self.training says.
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, eps=self.eps,
        )

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
        strict: bool, missing_keys: list[str], unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm state dict carries a batch counter that has no meaning once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


_ARGS_DOC = """
    Args:
        num_features: C.
        eps: added to the running variance (> 0).

    Loads a BatchNorm state dict with ``strict=True`` (``num_batches_tracked`` is accepted and
    dropped); its own state dict loads into a BatchNorm, whose counter then starts at 0. Build
    one from a trained layer with :meth:`from_batchnorm`.
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = (
        "Frozen batch norm of a (N, C) or (N, C, L) input; see :mod:`normlab.nn.frozen`.\n"
        + _ARGS_DOC + "\n    Shape:\n        Input (N, C) or (N, C, L); output the same.\n"
    )
    _expected_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = (
        "Frozen batch norm of a (N, C, H, W) input; see :mod:`normlab.nn.frozen`.\n"
        + _ARGS_DOC + "\n    Shape:\n        Input (N, C, H, W); output the same.\n"
    )
    _expected_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = (
        "Frozen batch norm of a (N, C, D, H, W) input; see :mod:`normlab.nn.frozen`.\n"
        + _ARGS_DOC + "\n    Shape:\n        Input (N, C, D, H, W); output the same.\n"
    )
    _expected_dims = (5,)
