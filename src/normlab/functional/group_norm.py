r"""Group normalization (Wu & He, 2018), with torch.nn.functional.group_norm's contract.

The C channels are split into ``num_groups`` groups of C/G consecutive channels; each sample is
normalized per group over (C/G, *spatial), independently of the batch. ``num_groups=1`` is the
layer norm of Ba et al. over (C, H, W); ``num_groups=C`` is instance norm. Weight and bias are per
channel. Math and backward: :mod:`normlab.functional._normalize` on the (N, G, C/G, *) view.
"""

from __future__ import annotations

from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._normalize import grouped_layout
from normlab.functional._ops import normalize

__all__ = ["group_norm"]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group norm of an (N, C, *) input.

    Raises:
        TypeError: non-floating input or incompatible parameter dtype.
        ValueError: fewer than 2 dims, C not divisible by `num_groups`, parameter shape mismatch,
            invalid eps.
    """
    op = "group_norm"
    v.check_float_input(op, input)
    v.check_min_dim(op, input, 2, "(N, C, *)")
    v.check_positive_int(op, "num_groups", num_groups)
    v.check_eps(op, eps)
    c = input.shape[1]
    if c % num_groups:
        raise ValueError(f"{op}: num_channels={c} is not divisible by num_groups={num_groups}")
    v.check_param(op, "weight", weight, input, (c,))
    v.check_param(op, "bias", bias, input, (c,))
    # Splitting dim 1 into (G, C/G) is a view for every stride pattern, channels_last included.
    grouped = input.unflatten(1, (num_groups, c // num_groups))
    layout = grouped_layout(grouped.dim(), num_groups, c // num_groups)
    return normalize(grouped, weight, bias, op, layout, eps)[0].flatten(1, 2)
