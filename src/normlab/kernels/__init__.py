"""The single place where a kernel is chosen for a normalization op.

Every op has a plain-torch reference implementation (in :mod:`normlab.functional`), which is
always available, always tested, and the oracle for any faster kernel. A fast kernel registers
itself here for the ops, devices and dtypes it supports; :func:`select` returns it when it applies
and the reference otherwise.

Built-in kernels (registered at import, compiled or imported only on first use):

* CPU (float32/float64/bfloat16/float16): C++ kernels in :mod:`normlab.kernels.cpu`, built lazily
  by :mod:`normlab.kernels._build` with the system C++ compiler and cached on disk
  (``NORMLAB_CACHE_DIR``); without a compiler, normlab warns once and uses the reference.
* CUDA (float32/bfloat16/float16): Triton kernels in :mod:`normlab.kernels.triton_kernels`, when
  triton is installed.

Force the reference path with the environment variable ``NORMLAB_KERNELS=reference`` (read when
normlab is imported) or, in code, ``with normlab.kernels.use_reference(): ...``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ACTIVATION_CODES",
    "Kernel",
    "as_param_grad",
    "like",
    "register",
    "register_backend",
    "registered",
    "select",
    "use_reference",
]


@dataclass(frozen=True)
class Kernel:
    """A forward/backward pair with the reference's signatures (see ``functional/_normalize.py``).

    ``applies(x)`` says whether this kernel handles inputs of `x`'s kind: it may look at the
    device, dtype and layout only, since :func:`select` remembers its answer per kind. A fast
    kernel is partial: for an input it cannot take (a size, a stride pattern, no compiler) it
    returns None, and the op runs the reference instead (in one place,
    ``normlab.functional._ops``).
    Non-differentiable ops (the running-statistics update) have no backward.
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None = None
    name: str = "reference"
    applies: Callable[[Tensor], bool] = lambda x: True


_REGISTRY: dict[str, list[Kernel]] = {}
_state = threading.local()


# (op, input's kind) -> the kernel select() chose; a registration clears it. (A CPU kernel whose
# library fails to build after being chosen hands every call to the reference itself.)
_CHOSEN: dict[tuple[Any, ...], Kernel] = {}


def register(op: str, kernel: Kernel) -> None:
    """Add a fast kernel for `op`; later registrations take precedence."""
    _REGISTRY.setdefault(op, []).insert(0, kernel)
    _CHOSEN.clear()


def registered(op: str) -> list[Kernel]:
    return list(_REGISTRY.get(op, []))


# Read once, at import: reading the environment costs about a microsecond on every call, and
# every normalization call selects a kernel. In code, use_reference() switches at any time.
_ENV_REFERENCE = os.environ.get("NORMLAB_KERNELS") == "reference"


def select(op: str, x: Tensor, reference: Kernel) -> Kernel:
    """The kernel that runs `op` on `x`: the first registered fast kernel that applies, else
    `reference`."""
    if _ENV_REFERENCE or getattr(_state, "reference", False):
        return reference
    key = (op, x.is_cpu, x.is_cuda, x.dtype, x.layout)
    kernel = _CHOSEN.get(key)
    if kernel is not None:
        return kernel
    for kernel in _REGISTRY.get(op, ()):
        if kernel.applies(x):
            _CHOSEN[key] = kernel
            return kernel
    return reference


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Run the plain-torch reference path inside the block (this thread only)."""
    previous = getattr(_state, "reference", False)
    _state.reference = True
    try:
        yield
    finally:
        _state.reference = previous


def as_param_grad(grad: Tensor, shape: Any, dtype: Any) -> Tensor:
    """A summed parameter gradient viewed as the parameter's `shape` and cast to its `dtype`,
    with no op where it already is (each op is host time every small backward pays)."""
    if grad.shape != shape:
        grad = grad.view(shape)
    return grad if grad.dtype == dtype else grad.to(dtype)


def like(x: Tensor, t: Tensor) -> Tensor:
    """`t` with exactly `x`'s strides, copied only where they differ (the common case is no copy:
    a gradient usually arrives in its input's layout, channels_last and grouped views included),
    so elementwise work on the two runs over matching strides."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


NORM_OPS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")
ADD_NORM_OPS = ("add_layer_norm", "add_rms_norm")
NORM_ACT_OPS = ("batch_norm_act", "group_norm_act")
ACTIVATION_CODES = {None: 0, "relu": 1, "silu": 2, "gelu": 3}


def register_backend(prefix: str, applies: Callable[[Tensor], bool], forward: Callable[..., Any],
                     backward: Callable[..., Any]) -> None:
    """Register one backend's kernels for every normalization op from its two entry points:

    * ``forward(op, x, weight, bias, layout, eps, stats, act, residual)`` -> the reference's
      outputs ``(out, mean, var, invstd)``, with the sum last for a residual, or None;
    * ``backward(op, grad_out, x, weight, bias, mean, invstd, layout, batch_stats, needs, act,
      dextra)`` -> ``(grad_input, grad_weight, grad_bias)`` or None,

    where ``act`` is an :data:`ACTIVATION_CODES` value and None declines the call. The Kernel
    objects adapt these to the plain, fused-activation and fused-add signatures of the
    references."""
    for op in NORM_OPS:
        register(op, _plain_kernel(prefix, op, applies, forward, backward))
    for op in ADD_NORM_OPS:
        register(op, _add_norm_kernel(prefix, op, applies, forward, backward))
    for op in NORM_ACT_OPS:
        register(op, _norm_act_kernel(prefix, op, applies, forward, backward))


def _plain_kernel(prefix: str, op: str, applies: Callable[[Tensor], bool],
                  forward: Callable[..., Any], backward: Callable[..., Any]) -> Kernel:
    def fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any, eps: float,
            stats: tuple[Tensor, Tensor] | None = None) -> Any:
        return forward(op, x, weight, bias, layout, eps, stats, 0, None)

    def bwd(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
            layout: Any, batch_stats: bool, needs: tuple[bool, bool, bool]) -> Any:
        # The plain norm's kernel reads no bias (only a fused activation needs one).
        return backward(op, grad_out, x, weight, None, mean, invstd, layout, batch_stats, needs,
                        0, None)

    return Kernel(forward=fwd, backward=bwd, name=f"{prefix}:{op}", applies=applies)


def _add_norm_kernel(prefix: str, op: str, applies: Callable[[Tensor], bool],
                     forward: Callable[..., Any], backward: Callable[..., Any]) -> Kernel:
    def fwd(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
            layout: Any, eps: float, activation: str | None = None) -> Any:
        out = forward(op, x, weight, bias, layout, eps, None, ACTIVATION_CODES[activation],
                      residual)
        if out is None:
            return None
        y, mean, var, invstd, s = out
        return y, s, mean, var, invstd

    def bwd(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor, weight: Tensor | None,
            bias: Tensor | None, mean: Tensor, invstd: Tensor, layout: Any,
            needs: tuple[bool, bool, bool], activation: str | None = None) -> Any:
        if grad_out is None:  # only the sum's gradient: nothing for a kernel to do
            return None
        return backward(op, grad_out, s, weight, bias, mean, invstd, layout, True, needs,
                        ACTIVATION_CODES[activation], grad_sum)

    return Kernel(forward=fwd, backward=bwd, name=f"{prefix}:{op}", applies=applies)


def _norm_act_kernel(prefix: str, op: str, applies: Callable[[Tensor], bool],
                     forward: Callable[..., Any], backward: Callable[..., Any]) -> Kernel:
    def fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any, eps: float,
            stats: tuple[Tensor, Tensor] | None, activation: str | None) -> Any:
        return forward(op, x, weight, bias, layout, eps, stats, ACTIVATION_CODES[activation],
                       None)

    def bwd(grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
            mean: Tensor, invstd: Tensor, layout: Any, batch_stats: bool,
            needs: tuple[bool, bool, bool], activation: str | None) -> Any:
        return backward(op, grad_out, x, weight, bias, mean, invstd, layout, batch_stats, needs,
                        ACTIVATION_CODES[activation], None)

    return Kernel(forward=fwd, backward=bwd, name=f"{prefix}:{op}", applies=applies)


def _register_builtin_kernels() -> None:
    """Register normlab's own fast kernels: C++ on CPU, Triton on CUDA when triton imports.

    Cheap: nothing is compiled or imported from triton here; the C++ library is built on the first
    call that needs it (see :mod:`normlab.kernels._build`).
    """
    from normlab.kernels import cpu, gpu

    cpu.register_all()
    gpu.register_all()


_register_builtin_kernels()
