"""The math path never calls torch's own normalization kernels (issue 2's core requirement): the
plain-torch reference behind normlab's ops (``NORMLAB_KERNELS=reference`` / ``use_reference()``)
computes every statistic itself. Only what runs inside normlab's ops is counted, so the test's
own ``.sum()`` cannot satisfy it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.nn as nnl
from normlab import kernels

FORBIDDEN = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "native_norm")
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class RecordOps(TorchDispatchMode):
    """Records the aten ops issued inside normlab's ops (their CPU kernels run with the recorder
    on) separately from those outside."""

    def __init__(self):
        super().__init__()
        self.normlab_ops: list[str] = []
        self.inside: set[str] = set()
        self.outside: set[str] = set()
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if func.namespace == "normlab":
            self.normlab_ops.append(name)
            self._depth += 1
            try:
                with self:
                    return func.redispatch(_CPU, *args, **(kwargs or {}))
            finally:
                self._depth -= 1
        (self.inside if self._depth else self.outside).add(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: nnl.BatchNorm2d(3), (4, 3, 5, 5)), (lambda: nnl.LayerNorm(6), (4, 6)),
     (lambda: nnl.GroupNorm(2, 4), (2, 4, 3)),
     (lambda: nnl.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 7)),
     (lambda: nnl.RMSNorm(5), (3, 5)), (lambda: nnl.BatchNormAct2d(3, activation="gelu"),
                                       (4, 3, 5, 5))],
)
@pytest.mark.parametrize("training", [True, False])
def test_the_reference_computes_its_own_statistics(make, shape, training):
    module = make().train(training)
    x = torch.randn(shape, requires_grad=True)
    with kernels.use_reference(), RecordOps() as rec:
        module(x).sum().backward()
    assert "normalize" in rec.normlab_ops and "normalize_backward" in rec.normlab_ops
    # The statistics are reductions computed inside the op (mean for the moments, sum for the
    # parameter gradients), not a fused norm kernel of torch's.
    assert {"mean", "sum"} & rec.inside, rec.inside
    leaked = sorted(op for op in rec.inside | rec.outside if any(f in op for f in FORBIDDEN))
    assert not leaked, leaked


def test_the_recorder_sees_a_torch_norm_when_there_is_one():
    # The check above is not vacuous: torch's own layer norm is caught by the same recorder.
    with RecordOps() as rec:
        torch.nn.LayerNorm(6)(torch.randn(4, 6))
    assert any("layer_norm" in op for op in rec.outside)
