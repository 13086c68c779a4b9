"""Triton kernels for CUDA tensors (forward and backward), registered behind normlab.kernels.

Imported only when a CUDA tensor reaches a normalization op and triton is installed, never by
``import normlab``. Each program owns one row of the canonical ``[R][K][S]`` problem (see
:mod:`normlab.kernels.cpu`) as a ``BLOCK_K x BLOCK_S`` tile, so statistics are exact two-pass
values over registers, accumulated in float32 for float16/bfloat16/float32 inputs.

Parameter gradients use a two-stage reduction: stage 1 writes per-program (layer/RMS norm: a
block of rows) or per-row-and-channel (group/instance norm) partial sums, stage 2 sums them in a
fixed order, so results are deterministic (no atomics). Batch norm on NCHW merges per-row moments
with Chan's formula between the kernels. Channels-last layouts, float64 and rows longer than
``_MAX_TILE`` elements use the reference path.

Tested on the CPU with ``TRITON_INTERPRET=1`` (small shapes: the interpreter is slow).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.kernels import cpu

__all__ = ["backward", "forward", "supported"]

_MAX_TILE = 1 << 16
_ACT = cpu.ACTIVATIONS


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return g


@triton.jit
def _row_forward_kernel(
    X, RES, SUM, Y,            # [R, K, S] contiguous (RES/SUM only with HAS_RES)
    W, B,                      # [Gp * K] float32 parameters
    MEAN, VAR, RSTD,           # [R] (given statistics when FIXED: indexed r % smod)
    K, S, Gp, smod, eps,
    CENTER: tl.constexpr, HAS_RES: tl.constexpr, FIXED: tl.constexpr,
    STATS_ONLY: tl.constexpr, ACT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    L = K * S
    k = tl.arange(0, BLOCK_K)
    s = tl.arange(0, BLOCK_S)
    mask = (k[:, None] < K) & (s[None, :] < S)
    offs = r * L + k[:, None] * S + s[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        x_t = x.to(SUM.dtype.element_ty)
        tl.store(SUM + offs, x_t, mask=mask)
        x = x_t.to(tl.float32)  # normalize the rounded sum, as the unfused chain does
    if FIXED:
        si = r % smod
        mean = tl.load(MEAN + si)
        rstd = tl.load(RSTD + si)
        d = tl.where(mask, x - mean, 0.0)
    else:
        if CENTER:
            mean = tl.sum(tl.sum(x, 1), 0) / L
            d = tl.where(mask, x - mean, 0.0)
        else:
            mean = 0.0
            d = x
        var = tl.sum(tl.sum(d * d, 1), 0) / L
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + r, mean)
        tl.store(VAR + r, var)
        tl.store(RSTD + r, rstd)
    if not STATS_ONLY:
        pidx = (r % Gp) * K + k
        w = tl.load(W + pidx, mask=k < K, other=0.0)
        b = tl.load(B + pidx, mask=k < K, other=0.0)
        z = d * rstd * w[:, None] + b[:, None]
        tl.store(Y + offs, _act_fwd(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _row_backward_kernel(
    DY, X, DEXTRA, DX,         # [R, K, S] contiguous
    W, B, MEAN, RSTD,          # parameters [Gp * K]; statistics indexed r % smod
    C1, C2,                    # MODE 2: per-statistic coefficients of the batch-stat terms
    DW, DB,                    # partials: [programs, K] when PER_ELEM, else [R, K]
    R, K, S, Gp, smod, rows_per_prog,
    CENTER: tl.constexpr, MODE: tl.constexpr, NEED_DX: tl.constexpr,
    HAS_EXTRA: tl.constexpr, ACT: tl.constexpr, PER_ELEM: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # MODE 0: statistics of the row itself (layer, RMS, group, instance norm in training);
    # MODE 1: constant statistics (eval); MODE 2: batch statistics across rows, with the
    # projection coefficients precomputed per statistic (batch norm on NCHW).
    pid = tl.program_id(0).to(tl.int64)
    L = K * S
    k = tl.arange(0, BLOCK_K)
    s = tl.arange(0, BLOCK_S)
    kmask = k < K
    mask = kmask[:, None] & (s[None, :] < S)
    acc_dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_K], dtype=tl.float32)
    r_end = tl.minimum(pid * rows_per_prog + rows_per_prog, R)
    for r in range(pid * rows_per_prog, r_end):
        si = r % smod
        offs = r * L + k[:, None] * S + s[None, :]
        rstd = tl.load(RSTD + si)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            x_hat = tl.where(mask, (x - tl.load(MEAN + si)) * rstd, 0.0)
        else:
            x_hat = x * rstd
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        pidx = (r % Gp) * K + k
        w = tl.load(W + pidx, mask=kmask, other=0.0)
        if ACT != 0:
            b = tl.load(B + pidx, mask=kmask, other=0.0)
            dy = dy * _act_grad(x_hat * w[:, None] + b[:, None], ACT)
            dy = tl.where(mask, dy, 0.0)
        part_dw = tl.sum(dy * x_hat, 1)
        part_db = tl.sum(dy, 1)
        if PER_ELEM:
            acc_dw += part_dw
            acc_db += part_db
        else:
            tl.store(DW + r * K + k, part_dw, mask=kmask)
            tl.store(DB + r * K + k, part_db, mask=kmask)
        if NEED_DX:
            g = dy * w[:, None]
            if MODE == 0:
                c2 = tl.sum(tl.sum(g * x_hat, 1), 0) / L
                if CENTER:
                    c1 = tl.sum(tl.sum(g, 1), 0) / L
                    dx = rstd * (g - c1 - x_hat * c2)
                else:
                    dx = rstd * (g - x_hat * c2)
            elif MODE == 1:
                dx = g * rstd
            else:
                dx = rstd * (g - tl.load(C1 + si) - x_hat * tl.load(C2 + si))
            if HAS_EXTRA:
                dx += tl.load(DEXTRA + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if PER_ELEM:
        tl.store(DW + pid * K + k, acc_dw, mask=kmask)
        tl.store(DB + pid * K + k, acc_db, mask=kmask)


def _blocks(K: int, S: int) -> tuple[int, int] | None:
    bk, bs = triton.next_power_of_2(K), triton.next_power_of_2(S)
    return None if bk * bs > _MAX_TILE else (bk, bs)


def supported(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _grid_rows(R: int, K: int) -> int:
    # Layer/RMS norm: enough programs to fill the GPU, few enough that stage 2 stays small.
    return max(1, min(R, 4 * 132 if torch.cuda.is_available() else 8))


def forward(op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any,
            eps: float, stats: tuple[Tensor, Tensor] | None, act: int = 0,
            residual: Tensor | None = None) -> tuple[Tensor, ...] | None:
    """The kernel forward (reference output format), or None to use the reference."""
    if not supported(x):
        return None
    plan = cpu._plan(op, x, layout, stats is not None)
    if plan is None or plan.kind == "col" or (residual is not None and plan.kind != "row"):
        return None
    d = plan.dims
    K, S = d.get("K", 1), d["S"]
    blocks = _blocks(K, S)
    if blocks is None:
        return None
    dev = x.device
    f32 = torch.float32
    w = cpu._param(weight, plan.nparam, f32, 1.0, str(dev))
    b = cpu._param(bias, plan.nparam, f32, 0.0, str(dev))
    xc = plan.x
    y = torch.empty_like(xc)
    common = {"ACT": act, "BLOCK_K": blocks[0], "BLOCK_S": blocks[1]}
    if plan.kind == "row":
        R = d["R"]
        mean, var, invstd = (torch.empty(R, device=dev, dtype=f32) for _ in range(3))
        res = None if residual is None else residual.contiguous()
        s = torch.empty_like(xc) if residual is not None else None
        _row_forward_kernel[(R,)](
            xc, res if res is not None else xc, s if s is not None else y, y, w, b, mean, var,
            invstd, K, S, d["Gp"], R, float(eps), CENTER=layout.center,
            HAS_RES=residual is not None, FIXED=False, STATS_ONLY=False, **common)
        shape = plan.stats_shape
        out = (y, mean.view(shape), var.view(shape), invstd.view(shape))
        return (*out, s) if residual is not None else out
    if plan.kind == "row_fixed":
        assert stats is not None
        mean, var = (t.to(f32, copy=True) for t in stats)
        invstd = (var + eps).rsqrt()
        _row_forward_kernel[(d["R"],)](
            xc, xc, y, y, w, b, mean.reshape(-1).contiguous(), var, invstd.reshape(-1).contiguous(),
            K, S, d["Gp"], d["smod"], float(eps), CENTER=True, HAS_RES=False, FIXED=True,
            STATS_ONLY=False, **common)
        return y, mean, var, invstd
    # bn_rows: per-row moments, Chan merge per channel, then normalize with the merged statistics.
    N, C = d["N"], d["C"]
    R = N * C
    rm, rv, _ = (torch.empty(R, device=dev, dtype=f32) for _ in range(3))
    _row_forward_kernel[(R,)](xc, xc, y, y, w, b, rm, rv, _, 1, S, C, R, 0.0, CENTER=True,
                              HAS_RES=False, FIXED=False, STATS_ONLY=True, **common)
    rm, rv = rm.view(N, C).double(), rv.view(N, C).double()
    mean = rm.mean(0)
    var = (rv + (rm - mean).square()).mean(0)  # equal counts: Chan's merge
    invstd = (var + eps).rsqrt()
    mean, var, invstd = (t.to(f32) for t in (mean, var, invstd))
    _row_forward_kernel[(R,)](xc, xc, y, y, w, b, mean, var, invstd, 1, S, C, C, 0.0,
                              CENTER=True, HAS_RES=False, FIXED=True, STATS_ONLY=False, **common)
    shape = plan.stats_shape
    return y, mean.view(shape), var.view(shape), invstd.view(shape)


def backward(op: str, grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
             mean: Tensor, invstd: Tensor, layout: Any, batch_stats: bool,
             needs: tuple[bool, bool, bool], act: int = 0,
             dextra: Tensor | None = None) -> tuple[Tensor | None, ...] | None:
    if not supported(x):
        return None
    plan = cpu._plan(op, x, layout, not batch_stats)
    if plan is None or plan.kind == "col":
        return None
    d = plan.dims
    K, S = d.get("K", 1), d["S"]
    blocks = _blocks(K, S)
    if blocks is None:
        return None
    dev = x.device
    f32 = torch.float32
    w = cpu._param(weight, plan.nparam, f32, 1.0, str(dev))
    b = cpu._param(bias, plan.nparam, f32, 0.0, str(dev))
    xc = plan.x
    dy = cpu._like(xc, grad_out)
    de = None if dextra is None else cpu._like(xc, dextra)
    mean = mean.reshape(-1).contiguous()
    invstd = invstd.reshape(-1).contiguous()
    dx = torch.empty_like(xc) if needs[0] else None
    R = d["R"] if "R" in d else d["N"] * d["C"]
    Gp = d.get("Gp", d.get("C", 1))
    per_elem = S == 1 and Gp == 1 and plan.kind == "row"
    common = {"ACT": act, "BLOCK_K": blocks[0], "BLOCK_S": blocks[1]}

    def launch(mode: int, smod: int, need_dx: bool, c1: Tensor | None = None,
               c2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if per_elem:
            progs = _grid_rows(R, K)
            rows_per = math.ceil(R / progs)
            progs = math.ceil(R / rows_per)
        else:
            progs, rows_per = R, 1
        dw = torch.empty(progs if per_elem else R, K, device=dev, dtype=f32)
        db = torch.empty_like(dw)
        _row_backward_kernel[(progs,)](
            dy, xc, de if de is not None else dy, dx if dx is not None else dy, w, b, mean,
            invstd, c1 if c1 is not None else invstd, c2 if c2 is not None else invstd, dw, db,
            R, K, S, Gp, smod, rows_per, CENTER=layout.center, MODE=mode,
            NEED_DX=need_dx and dx is not None, HAS_EXTRA=de is not None, PER_ELEM=per_elem,
            **common)
        return dw, db

    if plan.kind == "row":
        dw, db = launch(0 if batch_stats else 1, R, True)
    elif plan.kind == "row_fixed":
        dw, db = launch(1, d["smod"], True)
    else:  # bn_rows: per-row sums, merged per channel, then the batch-stat projection
        N, C = d["N"], d["C"]
        dw, db = launch(1, C, False)
        sd, sdx = db.view(N, C).sum(0), dw.view(N, C).sum(0)
        M = N * S
        if dx is not None:
            launch(2, C, True, (w * sd / M).contiguous(), (w * sdx / M).contiguous())
        dw, db = sdx.view(1, C), sd.view(1, C)
    # Stage 2 of the parameter gradients: a fixed-order sum over programs or samples.
    gw, gb = dw.view(-1, plan.nparam).sum(0), db.view(-1, plan.nparam).sum(0)
    grad_weight = gw.view(weight.shape).to(weight.dtype) if needs[1] and weight is not None \
        else None
    return dx, grad_weight, gb if needs[2] else None
