"""Layer, group and RMS norm modules: drop-in twins of torch.nn's, over normlab.functional.

Same constructor arguments, attributes, ``state_dict`` keys and ``extra_repr`` as
``torch.nn.LayerNorm`` / ``GroupNorm`` / ``RMSNorm``. These norms use per-sample statistics, so
training and evaluation behave identically and there are no buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from normlab import functional as F
from normlab.functional import _validate as v

__all__ = ["GroupNorm", "LayerNorm", "RMSNorm"]


class LayerNorm(Module):
    """Layer norm over the trailing `normalized_shape` dims; see
    :func:`normlab.functional.layer_norm`.

    Args:
        normalized_shape: the trailing dims to normalize over (int or sequence).
        eps: added to the variance (> 0).
        elementwise_affine: learnable per-element weight (ones) and bias (zeros).
        bias: learn the bias too (when ``elementwise_affine``).

    Shape:
        Input (*, *normalized_shape); output the same.
    """

    normalized_shape: tuple[int, ...]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = v.as_normalized_shape("LayerNorm", normalized_shape)
        v.check_eps("LayerNorm", eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class GroupNorm(Module):
    """Group norm of an (N, C, *) input; see :func:`normlab.functional.group_norm`.

    Args:
        num_groups: G; C must be divisible by it. G=1 is the layer norm of Ba et al. over
            (C, *), G=C is instance norm.
        num_channels: C.
        eps: added to the variance (> 0).
        affine: learnable per-channel weight (ones) and bias (zeros).
        bias: learn the bias too (keyword-only, as in torch).

    Shape:
        Input (N, C, *); output the same.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        v.check_positive_int("GroupNorm", "num_groups", num_groups)
        v.check_positive_int("GroupNorm", "num_channels", num_channels)
        v.check_eps("GroupNorm", eps)
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels={num_channels} is not divisible by "
                f"num_groups={num_groups}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if affine:
            self.weight = Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        v.check_float_input("GroupNorm", input)
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected an (N, {self.num_channels}, *) input, "
                f"got shape {list(input.shape)}"
            )
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm(Module):
    """RMS norm over the trailing `normalized_shape` dims; see :func:`normlab.functional.rms_norm`.

    Args:
        normalized_shape: the trailing dims to normalize over (int or sequence).
        eps: added to the mean square; None means the compute dtype's machine epsilon.
        elementwise_affine: learnable per-element weight (ones); RMS norm has no bias.

    Shape:
        Input (*, *normalized_shape); output the same.
    """

    normalized_shape: tuple[int, ...]

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = v.as_normalized_shape("RMSNorm", normalized_shape)
        if eps is not None:
            v.check_eps("RMSNorm", eps)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
