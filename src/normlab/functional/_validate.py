"""Argument checks shared by every functional op and module.

Each check raises before any state changes, with a message that names the op, the offending
value and the rule, so a caller can fix the call without reading normlab's source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Low-precision inputs may be normalized with float32 parameters (mixed precision training);
# every other combination must match exactly, as in torch.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_float_input(op: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: expected a floating-point input, got dtype {x.dtype}; "
            "convert it first, e.g. x.float()"
        )


def check_param(op: str, name: str, param: Tensor | None, x: Tensor, shape: Sequence[int]) -> None:
    """A weight, bias or running buffer must have `shape`, x's device and a compatible dtype."""
    if param is None:
        return
    if param.shape != tuple(shape):
        raise ValueError(
            f"{op}: {name} has shape {tuple(param.shape)}, expected {tuple(shape)} to match the input"
        )
    if param.device != x.device:
        raise ValueError(f"{op}: {name} is on {param.device} but the input is on {x.device}")
    if param.dtype != x.dtype and not (x.dtype in _LOW_PRECISION and param.dtype == torch.float32):
        raise TypeError(
            f"{op}: {name} has dtype {param.dtype} but the input has dtype {x.dtype}; "
            "only float16/bfloat16 inputs may use float32 parameters"
        )


def check_running_buffers(op: str, running_mean: Tensor | None,
                          running_var: Tensor | None) -> None:
    """Running statistics are buffers, never differentiated through: one that requires a
    gradient would have it silently dropped (and training would update a leaf in place), so it
    is refused, as torch's norms refuse it."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but running statistics are buffers that are not "
                "differentiated through; pass a tensor without requires_grad (e.g. "
                f"{name}.detach()) or register it as a buffer"
            )


def check_eps(op: str, eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    # eps - eps == 0 is math.isfinite for floats (inf - inf and NaN give NaN) that also traces:
    # torch.compile(dynamic=True) passes module floats in as symbolic values.
    if not (eps - eps == 0 and eps > 0):
        raise ValueError(
            f"{op}: eps={eps!r} must be finite and > 0; it keeps 1/sqrt(var + eps) finite "
            "on constant inputs"
        )


def check_momentum(op: str, momentum: float | None, allow_none: bool = True) -> None:
    if momentum is None:
        if allow_none:
            return
        raise ValueError(f"{op}: momentum must be a float in [0, 1], got None")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}: momentum must be a float or None, got {type(momentum).__name__}")
    if not (0.0 <= momentum <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{op}: momentum={momentum!r} must be in [0, 1] (the weight of the new batch) "
            "or None (cumulative average)"
        )


def check_positive_int(op: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{op}: {name}={value!r} must be a positive integer")


# Tuples already accepted, each mapped to itself (modules pass the same one on every call, and
# validating it again costs a generator per call). A lookup returns the stored all-int tuple, also
# for an equal one such as (64.0,).
_VALID_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}


def as_normalized_shape(op: str, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if type(normalized_shape) is tuple:
        try:
            known = _VALID_SHAPES.get(normalized_shape)
        except TypeError:  # an unhashable element: the checks below name the problem
            known = None
        if known is not None:
            return known
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        shape: tuple[int, ...] = (normalized_shape,)
    else:
        try:
            shape = tuple(int(s) for s in normalized_shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(
                f"{op}: normalized_shape must be an int or a sequence of ints, "
                f"got {normalized_shape!r}"
            ) from None
    if len(shape) == 0:
        raise ValueError(f"{op}: normalized_shape must be non-empty")
    for s in shape:
        if s <= 0:
            raise ValueError(f"{op}: normalized_shape={shape} must hold positive sizes")
    if len(_VALID_SHAPES) < 1024:
        _VALID_SHAPES[shape] = shape
    return shape


def check_trailing_shape(op: str, x: Tensor, normalized_shape: tuple[int, ...]) -> None:
    k = len(normalized_shape)
    if x.dim() < k or tuple(x.shape[-k:]) != normalized_shape:
        raise ValueError(
            f"{op}: expected an input whose trailing dimensions are {list(normalized_shape)}, "
            f"got shape {list(x.shape)}"
        )


def check_min_dim(op: str, x: Tensor, min_dim: int, what: str) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: expected an input of shape {what}, got {x.dim()}D input {list(x.shape)}"
        )
