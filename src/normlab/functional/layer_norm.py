r"""Layer normalization (Ba et al., 2016), with torch.nn.functional.layer_norm's contract.

Each sample is normalized over its trailing ``normalized_shape`` dims, identically in training and
evaluation; weight and bias are elementwise over ``normalized_shape``. Note that on NCHW images
``LayerNorm(W)`` normalizes over W only: the layer norm of the paper over (C, H, W) is
``group_norm(x, 1)``. Math and backward: :mod:`normlab.functional._normalize`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._normalize import trailing_layout
from normlab.functional._ops import normalize

__all__ = ["layer_norm"]


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer norm over the trailing `normalized_shape` dims of `input`.

    Raises:
        TypeError: non-floating input or incompatible parameter dtype.
        ValueError: trailing dims differ from `normalized_shape`, parameter shape mismatch,
            invalid eps.
    """
    op = "layer_norm"
    v.check_float_input(op, input)
    shape = v.as_normalized_shape(op, normalized_shape)
    v.check_trailing_shape(op, input, shape)
    v.check_eps(op, eps)
    v.check_param(op, "weight", weight, input, shape)
    v.check_param(op, "bias", bias, input, shape)
    return normalize(input, weight, bias, op, trailing_layout(input.dim(), shape), eps)[0]
