"""Triton kernels registered for CUDA tensors, imported lazily.

The kernel objects here are cheap to create: ``applies`` checks the device and whether triton can
be found (without importing it); the first CUDA call imports
:mod:`normlab.kernels.triton_kernels`. Ops or layouts the Triton kernels do not cover run the
reference.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from torch import Tensor

from normlab import kernels
from normlab.kernels import cpu

__all__ = ["register_all", "triton_available"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _applies(x: Tensor) -> bool:
    return x.is_cuda and triton_available()


def _impl() -> Any:
    from normlab.kernels import triton_kernels

    return triton_kernels


def _make(op: str) -> kernels.Kernel:
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any, eps: float,
                stats: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, ...]:
        out = _impl().forward(op, x, weight, bias, layout, eps, stats)
        if out is None:
            return cpu._reference().normalize_forward(x, weight, bias, layout, eps, stats)
        return out

    def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                 invstd: Tensor, layout: Any, batch_stats: bool,
                 needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, ...]:
        out = _impl().backward(op, grad_out, x, weight, None, mean, invstd, layout, batch_stats,
                               needs)
        if out is None:
            return cpu._reference().normalize_backward(grad_out, x, weight, mean, invstd, layout,
                                                       batch_stats, needs)
        return out

    return kernels.Kernel(forward=forward, backward=backward, name=f"triton:{op}",
                          applies=_applies)


def _make_add_norm(op: str) -> kernels.Kernel:
    def forward(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                layout: Any, eps: float, activation: str | None = None) -> tuple[Tensor, ...]:
        out = _impl().forward(op, x, weight, bias, layout, eps, None, cpu.ACTIVATIONS[activation],
                              residual=residual)
        if out is None:
            return cpu._fused_reference().add_norm_forward(x, residual, weight, bias, layout, eps,
                                                           activation)
        y, mean, var, invstd, s = out
        return y, s, mean, var, invstd

    def backward(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor,
                 weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                 layout: Any, needs: tuple[bool, bool, bool],
                 activation: str | None = None) -> tuple[Tensor | None, ...]:
        out = None
        if grad_out is not None:
            out = _impl().backward(op, grad_out, s, weight, bias, mean, invstd, layout, True,
                                   needs, cpu.ACTIVATIONS[activation], dextra=grad_sum)
        if out is None:
            return cpu._fused_reference().add_norm_backward(grad_out, grad_sum, s, weight, bias,
                                                            mean, invstd, layout, needs,
                                                            activation)
        return out

    return kernels.Kernel(forward=forward, backward=backward, name=f"triton:{op}",
                          applies=_applies)


def _make_norm_act(op: str) -> kernels.Kernel:
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any, eps: float,
                stats: tuple[Tensor, Tensor] | None, activation: str | None) -> tuple[Tensor, ...]:
        out = _impl().forward(op, x, weight, bias, layout, eps, stats,
                              cpu.ACTIVATIONS[activation])
        if out is None:
            return cpu._fused_reference().norm_act_forward(x, weight, bias, layout, eps, stats,
                                                           activation)
        return out

    def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 mean: Tensor, invstd: Tensor, layout: Any, batch_stats: bool,
                 needs: tuple[bool, bool, bool],
                 activation: str | None) -> tuple[Tensor | None, ...]:
        out = _impl().backward(op, grad_out, x, weight, bias, mean, invstd, layout, batch_stats,
                               needs, cpu.ACTIVATIONS[activation])
        if out is None:
            return cpu._fused_reference().norm_act_backward(grad_out, x, weight, bias, mean,
                                                            invstd, layout, batch_stats, needs,
                                                            activation)
        return out

    return kernels.Kernel(forward=forward, backward=backward, name=f"triton:{op}",
                          applies=_applies)


def register_all() -> None:
    """Register the Triton kernels (nothing is imported from triton here)."""
    for op in ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"):
        kernels.register(op, _make(op))
    for op in ("add_layer_norm", "add_rms_norm"):
        kernels.register(op, _make_add_norm(op))
    for op in ("batch_norm_act", "group_norm_act"):
        kernels.register(op, _make_norm_act(op))
