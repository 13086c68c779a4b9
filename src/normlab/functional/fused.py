r"""Fused normalization: residual-add + layer/RMS norm, and batch/group norm + activation.

Each fused op computes exactly what its unfused chain computes, in one sweep over the data where a
kernel applies (see :mod:`normlab.kernels`), and saves only what the plain norm saves:

* ``add_layer_norm`` / ``add_rms_norm``: :math:`s = x + r`, returns ``(\phi(norm(s)), s)`` with
  :math:`\phi` an optional activation (below; the identity by default). The sum is the residual
  stream a transformer block passes on, so it is an output rather than a temporary. Backward:
  :math:`\partial L/\partial x = \partial L/\partial r = \partial L/\partial s +
  \mathrm{norm}'(s)^\top (\phi'(z)\,\partial L/\partial y)` with :math:`z = \mathrm{norm}(s)`
  recomputed as for the norm + activation ops. Saves ``s`` (an output anyway), the parameters and
  the per-row ``mean``/``invstd``.
* ``batch_norm_act`` / ``group_norm_act``: :math:`y = \phi(z)`, :math:`z = \gamma\hat x + \beta`
  with :math:`\phi` one of ReLU, SiLU, GELU (erf form). Backward recomputes :math:`z` from the
  saved input and statistics instead of saving it, then runs the norm's backward on
  :math:`\partial L/\partial z = \phi'(z)\,\partial L/\partial y`.

The reference implementations (``norm_act_forward``/``_backward``, ``add_norm_forward``/
``_backward``) live with the primitive in :mod:`normlab.functional._normalize`; the ops are
``torch.ops.normlab.normalize`` (with ``activation=``) and ``torch.ops.normlab.add_normalize``;
fast kernels register for the kinds ``"add_layer_norm"``, ``"add_rms_norm"``,
``"batch_norm_act"`` and ``"group_norm_act"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.functional import _validate as v

# The fused ops' references live with the primitive; re-exported here under their old names.
from normlab.functional._normalize import (  # noqa: F401
    ACTIVATIONS,
    ADD_NORM_REFERENCE,
    NORM_ACT_REFERENCE,
    Layout,
    add_norm_backward,
    add_norm_forward,
    grouped_layout,
    norm_act_backward,
    norm_act_forward,
    trailing_layout,
)
from normlab.functional._ops import add_normalize, normalize
from normlab.functional.batch_norm import (
    check_batch_norm_args,
    check_values_per_channel,
    commit_running_stats,
)
from normlab.functional.moments import compute_dtype

__all__ = ["ACTIVATIONS", "add_layer_norm", "add_rms_norm", "batch_norm_act", "group_norm_act"]


def _check_activation(op: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}"
        )


def _norm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, op: str, layout: Layout,
              eps: float, fixed_mean: Tensor | None, fixed_var: Tensor | None,
              activation: str | None) -> tuple[Tensor, Tensor, Tensor]:
    stats = None if fixed_mean is None or fixed_var is None else (fixed_mean, fixed_var)
    return normalize(x, weight, bias, op, layout, eps, stats, activation)


# ------------------------------------------------------------------------------------------------
# Public functions.


def _add_norm(op: str, name: str, input: Tensor, residual: Tensor,
              normalized_shape: Sequence[int] | int, weight: Tensor | None,
              bias: Tensor | None, eps: float, center: bool,
              activation: str | None) -> tuple[Tensor, Tensor]:
    _check_activation(name, activation)
    v.check_float_input(name, input)
    v.check_float_input(name, residual)
    if residual.shape != input.shape or residual.dtype != input.dtype:
        raise ValueError(
            f"{name}: residual must match the input's shape and dtype, got "
            f"{list(residual.shape)} {residual.dtype} for input {list(input.shape)} {input.dtype}"
        )
    if residual.device != input.device:
        raise ValueError(f"{name}: residual is on {residual.device} but input on {input.device}")
    shape = v.as_normalized_shape(name, normalized_shape)
    v.check_trailing_shape(name, input, shape)
    v.check_eps(name, eps)
    v.check_param(name, "weight", weight, input, shape)
    v.check_param(name, "bias", bias, input, shape)
    layout = trailing_layout(input.dim(), shape, center)
    return add_normalize(input, residual, weight, bias, op, layout, eps, activation)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add, layer norm, optional activation: returns
    ``(activation(layer_norm(input + residual)), input + residual)``.

    Same result as the eager chain ``s = input + residual; activation(layer_norm(s, ...))``, with
    the add, the norm and the activation fused into one sweep over the data on the kernel path.
    ``residual`` must match the input's shape and dtype.

    Args:
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"`` (erf
            form, torch's default).

    Raises:
        TypeError: non-floating input or residual, incompatible parameter dtype.
        ValueError: residual shape/dtype/device mismatch, trailing dims differ from
            `normalized_shape`, parameter shape mismatch, invalid eps, unknown activation.
    """
    return _add_norm("add_layer_norm", "add_layer_norm", input, residual, normalized_shape,
                     weight, bias, eps, True, activation)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    eps: float | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add, RMS norm, optional activation: returns
    ``(activation(rms_norm(input + residual)), input + residual)``, the activation fused into the
    same sweep as the add and the norm on the kernel path.

    Args:
        eps: None (torch's default) means the machine epsilon of the compute dtype.
        activation: None (default, the plain norm), ``"relu"``, ``"silu"`` or ``"gelu"``.

    Raises:
        As :func:`add_layer_norm`.
    """
    if eps is None:
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    return _add_norm("add_rms_norm", "add_rms_norm", input, residual, normalized_shape, weight,
                     None, eps, False, activation)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    *,
    on_nonfinite: str = "error",
) -> Tensor:
    """``activation(batch_norm(input, ...))`` with batch_norm's contract (running buffers are
    updated in place in training) and one fused sweep on the kernel path.

    Args:
        activation: ``"relu"``, ``"silu"``, ``"gelu"`` (erf form, torch's default) or None.

    Raises:
        As :func:`normlab.functional.batch_norm`, and ValueError for an unknown activation.
    """
    return batch_norm_act_with_status(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
        on_nonfinite,
    )[0]


def batch_norm_act_with_status(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str | None,
    on_nonfinite: str = "error",
) -> tuple[Tensor, bool | Tensor]:
    """:func:`batch_norm_act`, also saying whether the running statistics were updated."""
    op = "batch_norm_act"
    _check_activation(op, activation)
    layout = check_batch_norm_args(
        op, input, running_mean, running_var, weight, bias, training, momentum, eps, on_nonfinite
    )
    if not training:
        assert running_mean is not None and running_var is not None
        return _norm_act(input, weight, bias, op, layout, eps,
                         running_mean, running_var, activation)[0], False
    count = check_values_per_channel(op, input)
    out, mean, var = _norm_act(input, weight, bias, op, layout, eps, None, None, activation)
    committed = False
    if running_mean is not None and running_var is not None and count > 0:
        committed = commit_running_stats(
            op, running_mean, running_var, mean, var, count, momentum, on_nonfinite
        )
    return out, committed


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "relu",
) -> Tensor:
    """``activation(group_norm(input, num_groups, ...))`` in one fused sweep on the kernel path.

    Raises:
        As :func:`normlab.functional.group_norm`, and ValueError for an unknown activation.
    """
    op = "group_norm_act"
    _check_activation(op, activation)
    v.check_float_input(op, input)
    v.check_min_dim(op, input, 2, "(N, C, *)")
    v.check_positive_int(op, "num_groups", num_groups)
    v.check_eps(op, eps)
    c = input.shape[1]
    if c % num_groups:
        raise ValueError(f"{op}: num_channels={c} is not divisible by num_groups={num_groups}")
    v.check_param(op, "weight", weight, input, (c,))
    v.check_param(op, "bias", bias, input, (c,))
    grouped = input.unflatten(1, (num_groups, c // num_groups))
    layout = grouped_layout(grouped.dim(), num_groups, c // num_groups)
    out = _norm_act(grouped, weight, bias, op, layout, eps, None, None, activation)[0]
    return out.flatten(1, 2)
