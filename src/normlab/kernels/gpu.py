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

__all__ = ["register_all", "triton_available"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _applies(x: Tensor) -> bool:
    return x.is_cuda and triton_available()


def _impl() -> Any:
    from normlab.kernels import triton_kernels

    return triton_kernels


def _forward(*args: Any, **kwargs: Any) -> Any:
    return _impl().forward(*args, **kwargs)


def _backward(*args: Any, **kwargs: Any) -> Any:
    return _impl().backward(*args, **kwargs)


def register_all() -> None:
    """Register the Triton kernels (nothing is imported from triton here)."""
    kernels.register_backend("triton", _applies, _forward, _backward)
