r"""Root-mean-square normalization (Zhang & Sennrich, 2019), with torch's ``rms_norm`` contract.

:math:`y = \gamma\,x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the trailing ``normalized_shape``
dims: layer norm's statistics without the mean, so no re-centering invariance but one reduction
fewer. Math and backward: :mod:`normlab.functional._normalize` with ``center=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._normalize import trailing_layout
from normlab.functional._ops import normalize
from normlab.functional.moments import compute_dtype

__all__ = ["rms_norm"]


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS norm over the trailing `normalized_shape` dims of `input`.

    Args:
        eps: added to the mean square; None (torch's default) means the machine epsilon of the
            compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64).

    Raises:
        TypeError: non-floating input or incompatible weight dtype.
        ValueError: trailing dims differ from `normalized_shape`, weight shape mismatch,
            invalid eps.
    """
    op = "rms_norm"
    v.check_float_input(op, input)
    shape = v.as_normalized_shape(op, normalized_shape)
    v.check_trailing_shape(op, input, shape)
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    v.check_eps(op, eps)
    v.check_param(op, "weight", weight, input, shape)
    layout = trailing_layout(input.dim(), shape, center=False)
    return normalize(input, weight, None, op, layout, eps)[0]
