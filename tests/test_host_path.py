"""Host work per call on the CPU kernel path, counted in dispatcher ops (deterministic, unlike
timings): a warm call only allocates and views tensors, and no more of them than the counts below.
Every torch op a normalization issues is host time that small tensors (and a GPU waiting on its
host) pay per call; ``normlab bench --tiny`` times it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normlab.nn as nnl
from normlab.kernels import _build

pytestmark = pytest.mark.skipif(not _build.available(), reason="the C++ CPU kernels are unavailable")

# The only ops a warm call may issue: normlab's own, outputs and statistics allocated, the group
# norm's grouping as a view, and a batch norm advancing its counter.
NORMLAB_OPS = {"normalize", "normalize_backward", "update_running_stats_"}
# A training batch norm also reads back whether its statistics went in (the flag the running
# statistics op returns), a backward without a bias gradient returns an empty stand-in, and
# with fixed (running) statistics the mean is copied out of its buffer (op outputs never alias
# inputs) and viewed in the parameters' shape.
ALLOWED = {"empty", "empty_like", "new_empty", "view", "reshape", "clone", "add_", "full",
           "_local_scalar_dense", *NORMLAB_OPS}


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        if func.namespace == "normlab":
            # Into normlab's CPU kernel with the recorder on again: the ops a kernel issues count.
            with self:
                return func.redispatch(_CPU, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


# module, input shape, channels_last, at most (forward with graph, backward, no-grad eval forward),
# normlab's op calls included
CASES = [
    ("LayerNorm", lambda: nnl.LayerNorm(64), (8, 64), False, (5, 4, 5)),
    ("RMSNorm", lambda: nnl.RMSNorm(64), (8, 64), False, (5, 5, 5)),
    ("BatchNorm2d", lambda: nnl.BatchNorm2d(8), (2, 8, 4, 4), False, (9, 4, 7)),
    ("BatchNorm2d CL", lambda: nnl.BatchNorm2d(8), (2, 8, 4, 4), True, (9, 4, 7)),
    ("GroupNorm", lambda: nnl.GroupNorm(4, 8), (2, 8, 4, 4), False, (7, 6, 7)),
    ("GroupNorm CL", lambda: nnl.GroupNorm(4, 8), (2, 8, 4, 4), True, (7, 6, 7)),
    ("BatchNormAct2d", lambda: nnl.BatchNormAct2d(8, activation="silu"), (2, 8, 4, 4), False,
     (9, 4, 7)),
]


@pytest.mark.parametrize(("make", "shape", "channels_last", "limits"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_warm_call_only_allocates(make, shape, channels_last, limits) -> None:
    torch.manual_seed(0)
    m = make()
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = list(m.parameters())
    g = torch.randn_like(x)  # in the output's layout, as autograd hands it over

    def step() -> None:
        torch.autograd.grad(m(x), [x, *params], g)

    step()  # warm: builds the library, caches plans, strides and stand-ins
    with RecordOps() as fwd:
        out = m(x)
    with RecordOps() as bwd:
        torch.autograd.grad(out, [x, *params], g)
    m.eval()
    step()
    with torch.no_grad(), RecordOps() as inference:
        m(x)
    for ops, limit in zip((fwd.ops, bwd.ops, inference.ops), limits):
        assert ops, "the recorder saw nothing: the test would pass vacuously"
        assert set(ops) <= ALLOWED, ops
        assert len(ops) <= limit, ops
