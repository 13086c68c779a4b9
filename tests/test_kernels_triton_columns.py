"""Triton column kernels (channels_last batch/instance/group norm) against the float64 reference,
on the CPU under ``TRITON_INTERPRET=1``.

Plans are built with ``problems.plan`` as production builds them, so the tests pin the ``[O][P][C]``
dims the kernels rely on. The tuning constants are shrunk in most cases so that tiles are small:
several channel blocks (C not a multiple of BLOCK_C), several tiles per chunk, several chunks per
group (P not a multiple of the chunk) and several blocks of chunks in each merge program.
"""

from __future__ import annotations

import math

import pytest
import torch

from interpreter import ACT_NAMES, TOL, interpreted
from normlab.functional import fused
from normlab.functional._normalize import Layout
from normlab.functional.batch_norm import batch_norm_layout
from normlab.kernels import cpu, problems


@pytest.fixture(scope="module")
def tc():
    return interpreted("normlab.kernels.triton_columns")


STATS_TOL = {"atol": 1e-5, "rtol": 1e-4}  # statistics are float32 for every input dtype

# Tuning constants: (_TILE, _BLOCK_C, _PROGRAMS, _MERGE_TILE, _MERGE_CH).
CONFIGS = {
    "default": None,  # the GPU defaults: one chunk and one channel block on these shapes
    "chunks": (32, 4, 10**6, 8, 2),  # one 8x4 tile per chunk: many chunks and merge blocks
    "tiles": (16, 4, 8, 8, 8),  # several 4x4 tiles per chunk, a few chunks
}

CASES = {
    # name: (op, shape (N, C, *spatial), groups, fixed stats, with weight/bias, (O, P, C, G))
    "bn_4d": ("batch_norm_act", (3, 6, 5, 7), None, False, True, (1, 105, 6, 6)),
    "bn_3d": ("batch_norm_act", (4, 5, 9), None, False, True, (1, 36, 5, 5)),
    "bn_2d": ("batch_norm_act", (37, 6), None, False, False, (1, 37, 6, 6)),
    "bn_eval": ("batch_norm_act", (3, 6, 5, 7), None, True, True, (1, 105, 6, 6)),
    "in_4d": ("instance_norm", (3, 5, 6, 7), None, False, True, (3, 42, 5, 5)),
    "in_3d": ("instance_norm", (2, 6, 13), None, False, True, (2, 13, 6, 6)),
    "gn_4d": ("group_norm_act", (2, 12, 5, 7), 3, False, True, (2, 35, 12, 3)),
    "gn_4d_k3": ("group_norm_act", (2, 9, 4, 5), 3, False, True, (2, 20, 9, 3)),
    "gn_3d": ("group_norm_act", (3, 8, 11), 4, False, True, (3, 11, 8, 4)),
}


def _setup(name: str, dtype: torch.dtype, seed: int):
    op, shape, groups, fixed, params, dims = CASES[name]
    g = torch.Generator().manual_seed(seed)
    N, C, *spatial = shape
    # channels_last memory (channels innermost), distinct offsets per channel.
    x = torch.randn(N, *spatial, C, generator=g).movedim(-1, 1) * 2 + 1
    x = (x + torch.linspace(-3, 5, C).view(1, C, *(1,) * len(spatial))).to(dtype)
    nd = x.dim()
    if op == "instance_norm":
        layout = Layout(tuple(range(2, nd)), (1, C, *(1,) * (nd - 2)))
    elif groups:
        x = x.unflatten(1, (groups, C // groups))
        layout = Layout((2, *range(3, nd + 1)), (1, groups, C // groups, *(1,) * (nd - 2)))
    else:
        layout = batch_norm_layout(nd, C)
    w = torch.randn(C, generator=g) if params else None
    b = torch.randn(C, generator=g) if params else None
    stats = None
    if fixed:
        p = layout.param_shape
        stats = (torch.randn(p, generator=g), torch.rand(p, generator=g) + 0.5)
    plan = problems.plan(op, x, layout, fixed)
    assert isinstance(plan, problems.Columns)
    assert dims == (plan.O, plan.P, plan.C, plan.G)
    assert plan.input(x) is x
    return g, op, x, layout, w, b, stats, plan, fixed


def _use(tc, monkeypatch, config: str) -> None:
    values = CONFIGS[config]
    if values is not None:
        for attr, v in zip(("_TILE", "_BLOCK_C", "_PROGRAMS", "_MERGE_TILE", "_MERGE_CH"), values):
            monkeypatch.setattr(tc, attr, v)


def _run(tc, x, w, b, layout, plan, stats, act, dy, need_dx, eps=1e-5):
    """Forward then backward exactly as triton_kernels calls them."""
    f32 = torch.float32
    wf = cpu._param(w, plan.nparam, f32, 1.0)
    bf = cpu._param(b, plan.nparam, f32, 0.0)
    given = None
    if stats is not None:
        mean, var = (t.to(f32, copy=True) for t in stats)
        given = (mean, var, (var + eps).rsqrt())
    out = tc.col_forward(plan.input(x), wf, bf, plan.O, plan.P, plan.C, plan.G, eps, plan.stats_shape,
                         given, act)
    grads = tc.col_backward(dy, plan.input(x), wf, bf, out[1], out[3], plan.O, plan.P, plan.C, plan.G,
                            stats is None, need_dx, act)
    return out, grads


def _check(x, w, b, layout, plan, stats, act, dy, need_dx, out, grads) -> None:
    dtype = x.dtype
    tol = TOL[dtype]
    f64 = torch.float64
    C = plan.C
    # Missing parameters are ones and zeros (the kernel's stand-ins), so the reference also has
    # a weight gradient to compare.
    w = torch.ones(C) if w is None else w
    b = torch.zeros(C) if b is None else b
    d64 = [t.to(f64) for t in (x, w, b)]
    s64 = None if stats is None else tuple(t.to(f64) for t in stats)
    ref = fused.norm_act_forward(d64[0], d64[1], d64[2], layout, 1e-5, s64, ACT_NAMES[act])
    y, mean, var, invstd = out
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    torch.testing.assert_close(y.to(f64), ref[0], **tol)
    for got, want in zip((mean, var, invstd), ref[1:]):
        assert got.dtype == torch.float32 and got.shape == plan.stats_shape
        torch.testing.assert_close(got.to(f64), want.view(got.shape), **STATS_TOL)
    dx, gw, gb = grads
    want = fused.norm_act_backward(dy.to(f64), d64[0], d64[1], d64[2], ref[1], ref[3], layout,
                                   stats is None, (True, True, True), ACT_NAMES[act])
    if need_dx:
        assert dx.dtype == dtype and dx.shape == x.shape and dx.stride() == x.stride()
        q = want[0]
        torch.testing.assert_close(dx.to(f64), q, atol=tol["atol"] * max(1, q.abs().max()),
                                   rtol=tol["rtol"])
    else:
        assert dx is None
    # Parameter grads: float32 sums over the same inputs, so float32 tolerances for all dtypes.
    for got, q in ((gw, want[1]), (gb, want[2])):
        q = q.reshape(-1)
        assert got.dtype == torch.float32 and got.shape == (C,)
        torch.testing.assert_close(got.to(f64), q, atol=1e-5 * max(1, q.abs().max()), rtol=1e-4)


COMBOS = [
    # (case, config, dtype, act, need_dx)
    ("bn_4d", "chunks", torch.float32, 1, True),
    ("bn_4d", "tiles", torch.bfloat16, 3, True),
    ("bn_3d", "default", torch.float32, 2, True),
    ("bn_2d", "chunks", torch.float32, 0, True),
    ("bn_eval", "chunks", torch.float32, 2, True),
    ("bn_eval", "default", torch.bfloat16, 0, False),
    ("in_4d", "tiles", torch.float32, 0, True),
    ("in_3d", "chunks", torch.bfloat16, 0, True),
    ("gn_4d", "chunks", torch.float32, 3, True),
    ("gn_4d", "default", torch.bfloat16, 1, True),
    ("gn_4d_k3", "tiles", torch.float32, 2, True),
    ("gn_3d", "chunks", torch.float32, 0, False),
    ("bn_4d", "tiles", torch.float16, 2, True),
    ("gn_4d", "chunks", torch.float16, 0, True),
]


@pytest.mark.parametrize(("name", "config", "dtype", "act", "need_dx"), COMBOS,
                         ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}-act{c[3]}-dx{int(c[4])}"
                              for c in COMBOS])
def test_columns_match_reference(tc, monkeypatch, name, config, dtype, act, need_dx) -> None:
    _use(tc, monkeypatch, config)
    g, _op, x, layout, w, b, stats, plan, _fixed = _setup(name, dtype, len(name) + act)
    # grad_out sometimes NCHW-contiguous (not x's strides: the kernel copies it into x's order).
    dy = torch.randn(x.shape, generator=g).to(dtype)
    if act % 2:
        dy = torch.empty_like(x).copy_(dy)
    out, grads = _run(tc, x, w, b, layout, plan, stats, act, dy, need_dx)
    _check(x, w, b, layout, plan, stats, act, dy, need_dx, out, grads)


def test_columns_config_shapes(tc, monkeypatch) -> None:
    # The shrunk configs do exercise what they are meant to (several chunks, tiles, blocks).
    _use(tc, monkeypatch, "chunks")
    bc, bp, sub, chunk, nchunk, _w, bj, _bg, _bk, _ngb, _mw = tc._config(
        1, 105, 6, 6, tc._TILE, tc._BLOCK_C, tc._PROGRAMS, tc._MERGE_TILE, tc._MERGE_CH)
    assert (bc, bp, sub) == (4, 8, 1) and nchunk == 14 and 105 % chunk and nchunk > bj
    _use(tc, monkeypatch, "tiles")
    bc, bp, sub, chunk, nchunk, *_ = tc._config(
        2, 20, 9, 3, tc._TILE, tc._BLOCK_C, tc._PROGRAMS, tc._MERGE_TILE, tc._MERGE_CH)
    assert bc == 4 and sub > 1 and nchunk > 1 and 20 % chunk
    # The GPU defaults on the benchmark shapes: a few thousand programs, wide channel blocks.
    for n_o, P, C, G in ((1, 128 * 56 * 56, 256, 256), (128, 56 * 56, 256, 256),
                         (32, 56 * 56, 64, 32), (1, 32 * 56 * 56, 64, 64)):
        bc, bp, sub, chunk, nchunk, warps, *_ = tc._config(
            n_o, P, C, G, 4096, 128, 2048, 2048, 8)
        programs = n_o * nchunk * math.ceil(C / bc)
        assert bc == min(C, 128) and 1000 <= programs <= 5000 and warps == 8


def test_columns_deterministic(tc, monkeypatch) -> None:
    _use(tc, monkeypatch, "chunks")
    runs = []
    for _ in range(2):
        g, _op, x, layout, w, b, stats, plan, _ = _setup("gn_4d", torch.float32, 7)
        dy = torch.randn(x.shape, generator=g)
        out, grads = _run(tc, x, w, b, layout, plan, stats, 2, dy, True)
        runs.append((*out, *grads))
    for p, q in zip(*runs):
        assert torch.equal(p, q)  # fixed-order reductions, no atomics


def test_columns_large_offset(tc, monkeypatch) -> None:
    # 1e4 + 0.01 noise in float32: statistics and output keep their digits across many chunks.
    _use(tc, monkeypatch, "chunks")
    g = torch.Generator().manual_seed(3)
    x = (1e4 + 0.01 * torch.randn(4, 9, 7, 5, generator=g)).movedim(-1, 1)
    layout = batch_norm_layout(4, 5)
    plan = problems.plan("batch_norm", x, layout, False)
    ones, zeros = torch.ones(5), torch.zeros(5)
    y, _mean, var, _invstd = tc.col_forward(plan.input(x), ones, zeros, plan.O, plan.P, plan.C, plan.G,
                                            1e-5, plan.stats_shape, None, 0)
    ref = fused.norm_act_forward(x.double(), None, None, layout, 1e-5, None, None)
    torch.testing.assert_close(var.double(), ref[2], atol=0, rtol=1e-5)
    torch.testing.assert_close(y.double(), ref[0], atol=1e-5, rtol=1e-5)
