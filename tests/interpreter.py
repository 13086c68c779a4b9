"""Triton kernel modules for the interpreter tests (``TRITON_INTERPRET=1`` is set in conftest.py
before anything imports triton)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest
import torch


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
