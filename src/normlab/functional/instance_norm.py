r"""Instance normalization (Ulyanov et al., 2016), with torch.nn.functional.instance_norm's contract.

Each (sample, channel) pair is normalized over its spatial dims, which removes per-image contrast
and brightness. Optional running statistics average the per-instance statistics over the batch,
as torch does. Math and backward: :mod:`normlab.functional._normalize`.
"""

from __future__ import annotations

from torch import Tensor

from normlab.functional import _validate as v
from normlab.functional._normalize import Layout
from normlab.functional._ops import normalize
from normlab.functional.batch_norm import check_nonfinite_policy, commit_running_stats

__all__ = ["instance_norm"]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    on_nonfinite: str = "error",
) -> Tensor:
    """Instance norm over the spatial dims of an (N, C, *spatial) input.

    With ``use_input_stats`` each instance uses its own statistics and, when running buffers are
    given, they are updated with the batch average of the per-instance mean and unbiased variance.
    Otherwise the running buffers normalize the input.

    Raises:
        TypeError: non-floating input or incompatible parameter dtype.
        FloatingPointError: non-finite statistics would enter the running buffers (see
            :func:`normlab.functional.batch_norm`'s ``on_nonfinite``).
        ValueError: input without spatial dims, one spatial element with input statistics,
            parameter shape mismatch, missing running statistics, invalid eps or momentum.
    """
    op = "instance_norm"
    v.check_float_input(op, input)
    v.check_min_dim(op, input, 3, "(N, C, *spatial) with at least one spatial dim")
    v.check_eps(op, eps)
    v.check_momentum(op, momentum, allow_none=False)
    check_nonfinite_policy(op, on_nonfinite)
    n, c = input.shape[:2]
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
    spatial = tuple(range(2, input.dim()))
    param_shape = (1, c, *(1,) * len(spatial))
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"{op}: use_input_stats=False needs running_mean and running_var")
        layout = Layout(reduce_dims=spatial, param_shape=param_shape)
        return normalize(input, weight, bias, op, layout, eps, (running_mean, running_var))[0]
    count = input[0, 0].numel() if n and c else 0
    if count == 1:
        raise ValueError(
            f"{op}: expected more than 1 spatial element when training, got input size "
            f"{list(input.shape)}"
        )
    layout = Layout(reduce_dims=spatial, param_shape=param_shape)
    out, mean, var = normalize(input, weight, bias, op, layout, eps)
    if running_mean is not None and running_var is not None and input.numel() > 0:
        # torch's convention: the running estimate tracks the batch average of the
        # per-instance statistics (each variance Bessel-corrected over the spatial size).
        unbiased = var.reshape(n, c) * (count / max(count - 1, 1))
        commit_running_stats(
            op,
            running_mean,
            running_var,
            mean.reshape(n, c).mean(0),
            unbiased.mean(0),
            1,
            momentum,
            on_nonfinite,
        )
    return out
