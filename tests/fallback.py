"""A guard for the tests that pin the kernel path: fail if a fast kernel declines a call (so that
the reference ran instead, in ``normlab.functional._ops._run``, the one fallback)."""

from __future__ import annotations

import pytest

from normlab import kernels
from normlab.functional import _ops


def forbid_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _ops._run

    def no_fallback(kind, reference, method, *args, select_on=None):
        kernel = kernels.select(kind, args[0] if select_on is None else select_on, reference)
        if kernel is reference:  # the reference chosen (use_reference()): not a fallback
            return run(kind, reference, method, *args, select_on=select_on)
        out = getattr(kernel, method)(*args)
        if out is not None:
            return out
        # An add+norm backward declines only where no gradient reaches the output (nothing for
        # a kernel to do), the running-statistics update wherever buffers and statistics differ
        # in dtype (float16 buffers); every other decline is a fallback.
        if (kind.startswith("add_") and args[0] is None) or kind == "running_stats":
            return run(kind, reference, method, *args, select_on=select_on)
        raise AssertionError(f"the CPU kernel for {kind} fell back to the reference path")

    monkeypatch.setattr(_ops, "_run", no_fallback)
