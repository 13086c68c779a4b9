"""Activation memory: what each op keeps for its backward, against torch's own op.

Counted exactly with saved-tensor hooks (bytes of distinct storages packed for backward), so the
test is deterministic; no timing here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as F


def saved_bytes(fn, *inputs) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype).requires_grad_()


CASES = {
    "batch_norm": (lambda f, x, w, b: f(x, None, None, w, b, True), (8, 16, 12, 12), (16,)),
    "layer_norm": (lambda f, x, w, b: f(x, (256,), w, b), (64, 256), (256,)),
    "group_norm": (lambda f, x, w, b: f(x, 4, w, b), (8, 16, 12, 12), (16,)),
    "instance_norm": (lambda f, x, w, b: f(x, weight=w, bias=b), (8, 16, 12, 12), (16,)),
    "rms_norm": (lambda f, x, w, b: f(x, (256,), w), (64, 256), (256,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_no_more_than_torch(name, dtype):
    call, shape, pshape = CASES[name]
    x, w, b = _leaf(*shape, dtype=dtype), _leaf(*pshape, dtype=dtype), _leaf(*pshape, dtype=dtype)
    ours = saved_bytes(lambda: call(getattr(F, name), x, w, b))
    theirs = saved_bytes(lambda: call(getattr(TF, name), x, w, b))
    # Per-group statistics stay float32 for bfloat16 inputs (accuracy), a few hundred bytes
    # beyond torch at most; every full-size tensor is matched.
    assert ours <= theirs + 1024, (ours, theirs)
    # And concretely: the input plus per-group statistics, never a second full-size tensor.
    assert ours < 1.5 * x.numel() * x.element_size() + 4096
