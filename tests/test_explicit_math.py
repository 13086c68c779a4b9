"""The math path never calls torch's own normalization kernels (issue 2's core requirement)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.nn as nnl

FORBIDDEN = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "native_norm")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("module", "shape"),
    [(nnl.BatchNorm2d(3), (4, 3, 5, 5)), (nnl.LayerNorm(6), (4, 6)), (nnl.GroupNorm(2, 4), (2, 4, 3)),
     (nnl.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 7)), (nnl.RMSNorm(5), (3, 5))],
)
@pytest.mark.parametrize("training", [True, False])
def test_no_torch_normalization_op_runs(module, shape, training):
    module.train(training)
    x = torch.randn(shape, requires_grad=True)
    with RecordOps() as rec:
        module(x).sum().backward()
    assert rec.ops, "the recorder saw nothing: the test would pass vacuously"
    assert "mean" in rec.ops or "sum" in rec.ops
    leaked = sorted(op for op in rec.ops if any(f in op for f in FORBIDDEN))
    assert not leaked, leaked
