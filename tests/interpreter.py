"""Triton kernel modules for the interpreter tests (``TRITON_INTERPRET=1`` is set in conftest.py
before anything imports triton)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest
import torch

# Activation codes of the kernels (index) to the reference's names, and the tolerances against
# the float64 reference per input dtype.
ACT_NAMES = [None, "relu", "silu", "gelu"]
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
       torch.float16: {"atol": 4e-3, "rtol": 3e-3}}


def interpreted(module: str) -> ModuleType:
    """`module` (a Triton kernel module) for interpreter tests, or a skip saying why it cannot
    run here: no triton, a GPU present (these tests are for CPU-only machines), or
    TRITON_INTERPRET set to something else."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("interpreter tests are for CPU-only machines")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is set to something other than 1")
    return importlib.import_module(module)
