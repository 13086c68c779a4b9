"""Triton kernels for CUDA tensors (forward and backward), registered behind normlab.kernels.

Imported only when a CUDA tensor reaches a normalization op and triton is installed, never by
``import normlab``. Each program owns one row of the canonical ``[R][K][S]`` problem (see
:mod:`normlab.kernels.cpu`) as a ``BLOCK_K x BLOCK_S`` tile, so statistics are exact two-pass
values over registers, accumulated in float32 for float16/bfloat16/float32 inputs.

Parameter gradients use a two-stage reduction: stage 1 writes per-program (layer/RMS norm: a
block of rows) or per-row-and-channel (group/instance norm) partial sums, stage 2 sums them in a
fixed order, so results are deterministic (no atomics). The layer/RMS-norm backward walks rows
with 1-D programs; on rows of ``_WIDE_ROW`` features or more, where registers cannot hold a row's
vectors, it runs a row-coefficient kernel then column blocks over row groups. Batch norm on NCHW
merges per-row moments with Chan's formula in a small kernel between the two sweeps. Channels-last layouts run the
column kernels of :mod:`normlab.kernels.triton_columns`; float64 and rows longer than
``_MAX_TILE`` elements use the reference path.

Tested on the CPU with ``TRITON_INTERPRET=1`` (small shapes: the interpreter is slow); checked and
timed on an H100 with ``benchmarks/gpu_check.py`` and ``normlab bench --device cuda`` (numbers in
``benchmarks/gpu_notes.md``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab import kernels
from normlab.kernels import cpu, problems, triton_columns
from normlab.kernels.triton_activations import act_fwd, act_grad

__all__ = ["backward", "forward", "supported"]

_MAX_TILE = 1 << 16
# Training backward of rows whose tile exceeds _LOOP_TILE elements sweeps them in chunks of about
# _LOOP_CHUNK elements (module-level so tests can shrink them).
_LOOP_TILE = 8192
_LOOP_CHUNK = 2048
# Layer/RMS-norm backward on rows of _WIDE_ROW features or more: 32-warp programs; and where a
# program would hold more than four row-wide float32 vectors (x, dy, the weight, one
# accumulator), the column-blocked kernels instead (blocks of _WIDE_CHUNK features). On an H100,
# 4096x16384: a 16-warp program got 32 registers from ptxas and spilled 1 KB per thread (RMS
# 1528 us); 32 warps, RMS 316 us, layer norm 537; column blocks, layer norm 476 us.
_WIDE_ROW = 16384
_WIDE_CHUNK = 1024


@triton.jit
def _row_forward_kernel(
    X, RES, SUM, Y,            # [R, K, S] contiguous (RES/SUM only with HAS_RES)
    W, B,                      # [Gp * K] float32 parameters
    MEAN, VAR, RSTD,           # [R]; FIXED: MEAN, VAR given and RSTD written, indexed r % smod
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
        rstd = 1.0 / tl.sqrt(tl.load(VAR + si) + eps)
        if r < smod:  # each statistic's invstd written once, by the first row that uses it
            tl.store(RSTD + si, rstd)
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
        if not STATS_ONLY:  # per-row moments for a later merge: no invstd wanted
            tl.store(RSTD + r, rstd)
    if not STATS_ONLY:
        pidx = (r % Gp) * K + k
        w = tl.load(W + pidx, mask=k < K, other=0.0)
        b = tl.load(B + pidx, mask=k < K, other=0.0)
        z = d * rstd * w[:, None] + b[:, None]
        tl.store(Y + offs, act_fwd(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _row_backward_kernel(
    DY, X, DX,                 # [R, K, S] contiguous
    W, B, MEAN, RSTD,          # parameters [Gp * K]; statistics indexed r % smod
    C1, C2,                    # MODE 2: per-statistic coefficients of the batch-stat terms
    DW, DB,                    # per-row partial parameter gradients [R, K]
    K, S, Gp, smod,
    CENTER: tl.constexpr, MODE: tl.constexpr, NEED_DX: tl.constexpr, ACT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per row. MODE 0: statistics of the row itself (group and instance norm in
    # training); MODE 1: constant statistics (eval), or only the partial sums (NEED_DX off);
    # MODE 2: batch statistics across rows, with the projection coefficients precomputed per
    # statistic (batch norm on NCHW).
    r = tl.program_id(0).to(tl.int64)
    L = K * S
    k = tl.arange(0, BLOCK_K)
    s = tl.arange(0, BLOCK_S)
    kmask = k < K
    mask = kmask[:, None] & (s[None, :] < S)
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
        dy = tl.where(mask, dy * act_grad(x_hat * w[:, None] + b[:, None], ACT), 0.0)
    tl.store(DW + r * K + k, tl.sum(dy * x_hat, 1), mask=kmask)
    tl.store(DB + r * K + k, tl.sum(dy, 1), mask=kmask)
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
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _load_chunk(X, DY, row_start, k, kmask, s0, S, CHUNK_S: tl.constexpr):
    # Columns [s0, s0 + CHUNK_S) of every channel k of one [K, S] row: x and dy in float32, with
    # their offsets and mask for the store that follows.
    s = s0 + tl.arange(0, CHUNK_S)
    mask = kmask[:, None] & (s < S)[None, :]
    offs = row_start + k[:, None] * S + s[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    return x, dy, offs, mask


@triton.jit
def _row_backward_looped_kernel(
    DY, X, DX,                 # [R, K, S] contiguous
    W, B, MEAN, RSTD,          # parameters [Gp * K]; statistics [R]
    DW, DB,                    # per-row partial parameter gradients [R, K]
    K, S, Gp,
    CENTER: tl.constexpr, NEED_DX: tl.constexpr, ACT: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNK_S: tl.constexpr,
):
    # Group/instance norm in training on rows too long for one tile in registers: a 32-warp
    # program holding a 32K-element tile is capped at 64 registers per thread and spills (ptxas
    # for sm_90). Two sweeps of CHUNK_S columns instead: the sums, then dx from the re-read row.
    r = tl.program_id(0).to(tl.int64)
    L = K * S
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    pidx = (r % Gp) * K + k
    w = tl.load(W + pidx, mask=kmask, other=0.0)
    if ACT != 0:
        b = tl.load(B + pidx, mask=kmask, other=0.0)
    rstd = tl.load(RSTD + r)
    if CENTER:
        mean = tl.load(MEAN + r)
    else:
        mean = 0.0
    # Elementwise accumulators reduced once after the sweep: cheaper than a reduction per chunk,
    # and triton 3.6 fails to compile (an assertion in its thread-locality pass) a loop whose
    # reduced accumulators are used twice after it.
    acc_dw = tl.zeros([BLOCK_K, CHUNK_S], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_K, CHUNK_S], dtype=tl.float32)
    for s0 in range(0, S, CHUNK_S):
        x, dy, offs, mask = _load_chunk(X, DY, r * L, k, kmask, s0, S, CHUNK_S)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        if ACT != 0:
            dy = tl.where(mask, dy * act_grad(x_hat * w[:, None] + b[:, None], ACT), 0.0)
        acc_dw += dy * x_hat
        acc_db += dy
    sum_dw = tl.sum(acc_dw, 1)
    sum_db = tl.sum(acc_db, 1)
    tl.store(DW + r * K + k, sum_dw, mask=kmask)
    tl.store(DB + r * K + k, sum_db, mask=kmask)
    if NEED_DX:
        # mean(g) and mean(g * x_hat) over the row, g = w * dy', from the per-channel sums.
        c2 = tl.sum(w * sum_dw, 0) / L
        if CENTER:
            c1 = tl.sum(w * sum_db, 0) / L
        else:
            c1 = 0.0
        for s0 in range(0, S, CHUNK_S):
            x, dy, offs, mask = _load_chunk(X, DY, r * L, k, kmask, s0, S, CHUNK_S)
            x_hat = (x - mean) * rstd
            if ACT != 0:
                dy = dy * act_grad(x_hat * w[:, None] + b[:, None], ACT)
            dx = rstd * (dy * w[:, None] - c1 - x_hat * c2)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _row_params(W, B, cols, mask, ACT: tl.constexpr):
    # The weight over `cols`, and the bias where the activation reads it (else the weight again,
    # unread), for the layer/RMS backward kernels.
    w = tl.load(W + cols, mask=mask, other=0.0)
    if ACT != 0:
        b = tl.load(B + cols, mask=mask, other=0.0)
    else:
        b = w
    return w, b


@triton.jit
def _row_terms(X, DY, MEAN, RSTD, r, base, cols, mask, w, b, CENTER: tl.constexpr,
               ACT: tl.constexpr):
    # Columns `cols` of layer/RMS row r: (x_hat, dy through the activation's derivative, invstd)
    # in float32, zero where masked.
    rstd = tl.load(RSTD + r)
    x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        x_hat = tl.where(mask, (x - tl.load(MEAN + r)) * rstd, 0.0)
    else:
        x_hat = x * rstd
    if ACT != 0:
        dy = tl.where(mask, dy * act_grad(x_hat * w + b, ACT), 0.0)
    return x_hat, dy, rstd


@triton.jit
def _vec_backward_kernel(
    DY, X, DEXTRA, DX,         # [R, K] contiguous
    W, B, MEAN, RSTD,          # parameters [K], statistics [R]
    DW, DB,                    # per-program partial parameter gradients [programs, K]
    R, K, rows_per_prog,
    CENTER: tl.constexpr, NEED_DX: tl.constexpr, NEED_DB: tl.constexpr, HAS_EXTRA: tl.constexpr,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    # Layer/RMS norm (and add+norm) rows: one feature vector per row, parameters shared by all
    # rows, so they are loaded once and each program walks a block of rows accumulating its
    # share of the parameter gradients (stage 1 of 2). 1-D tiles: a [K, 1] tile of the general
    # kernel costs layout conversions that made its backward 2-6x slower on an H100.
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: R * K may pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    w, b = _row_params(W, B, cols, mask, ACT)
    acc_dw = tl.zeros([BLOCK], dtype=tl.float32)
    if NEED_DB:  # no bias (RMS norm): one accumulator fewer in registers
        acc_db = tl.zeros([BLOCK], dtype=tl.float32)
    r_end = tl.minimum(pid * rows_per_prog + rows_per_prog, R)
    for r in range(pid * rows_per_prog, r_end):
        base = r * K
        x_hat, dy, rstd = _row_terms(X, DY, MEAN, RSTD, r, base, cols, mask, w, b, CENTER, ACT)
        acc_dw += dy * x_hat
        if NEED_DB:
            acc_db += dy
        if NEED_DX:
            g = dy * w
            c2 = tl.sum(g * x_hat, 0) / K
            if CENTER:
                dx = rstd * (g - tl.sum(g, 0) / K - x_hat * c2)
            else:
                dx = rstd * (g - x_hat * c2)
            if HAS_EXTRA:
                dx += tl.load(DEXTRA + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * K + cols, acc_dw, mask=mask)
    if NEED_DB:
        tl.store(DB + pid * K + cols, acc_db, mask=mask)


@triton.jit
def _wide_coeffs_kernel(
    DY, X, W, B, MEAN, RSTD,   # [R, K] rows; parameters [K]; statistics [R]
    C1, C2,                    # [R]: mean(g) (CENTER) and mean(g * x_hat), g = w * dy'
    K, CENTER: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Wide layer/RMS rows, pass 1 of 2: the two row reductions that dx needs, chunk by chunk.
    # The row's statistics are loaded once, outside the chunk loop (so not through _row_terms,
    # whose per-call loads stay inside it: the code timed on the H100).
    r = tl.program_id(0).to(tl.int64)
    rstd = tl.load(RSTD + r)
    if CENTER:
        mean = tl.load(MEAN + r)
    else:
        mean = 0.0
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, K, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = cols < K
        x_hat = tl.where(m, (tl.load(X + r * K + cols, mask=m, other=0.0).to(tl.float32) - mean)
                         * rstd, 0.0)
        dy = tl.load(DY + r * K + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0)
        if ACT != 0:
            dy = dy * act_grad(x_hat * w + tl.load(B + cols, mask=m, other=0.0), ACT)
        g = dy * w
        acc_g += g
        acc_gx += g * x_hat
    if CENTER:
        tl.store(C1 + r, tl.sum(acc_g, 0) / K)
    else:
        tl.store(C1 + r, 0.0)
    tl.store(C2 + r, tl.sum(acc_gx, 0) / K)


@triton.jit
def _wide_rows_kernel(
    DY, X, DEXTRA, DX,         # [R, K] contiguous
    W, B, MEAN, RSTD, C1, C2,  # parameters [K]; per-row statistics and coefficients [R]
    DW, DB,                    # per-row-group partial parameter gradients [groups, K]
    R, K, rows_per_prog,
    CENTER: tl.constexpr, NEED_DX: tl.constexpr, NEED_DB: tl.constexpr,
    HAS_EXTRA: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Wide layer/RMS rows, pass 2 of 2: one block of columns over a group of rows, so a program
    # holds a few vectors of BLOCK_C features, never a whole row.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    grp = tl.program_id(1).to(tl.int64)
    m = cols < K
    w, b = _row_params(W, B, cols, m, ACT)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    if NEED_DB:
        acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    r_end = tl.minimum(grp * rows_per_prog + rows_per_prog, R)
    for r in range(grp * rows_per_prog, r_end):
        base = r * K
        x_hat, dy, rstd = _row_terms(X, DY, MEAN, RSTD, r, base, cols, m, w, b, CENTER, ACT)
        acc_dw += dy * x_hat
        if NEED_DB:
            acc_db += dy
        if NEED_DX:
            dx = rstd * (dy * w - tl.load(C1 + r) - x_hat * tl.load(C2 + r))
            if HAS_EXTRA:
                dx += tl.load(DEXTRA + base + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DW + grp * K + cols, acc_dw, mask=m)
    if NEED_DB:
        tl.store(DB + grp * K + cols, acc_db, mask=m)


@triton.jit
def _bn_merge_kernel(RM, RV, MEAN, VAR, N, C, BLOCK_N: tl.constexpr):
    # Batch norm on NCHW: per-(sample, channel) moments over equal counts merged per channel
    # (Chan): mean of the means, then mean of (row variance + squared deviation of the row mean).
    c = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        acc += tl.load(RM + (start + n) * C + c, mask=start + n < N, other=0.0)
    mean = tl.sum(acc, 0) / N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        m = start + n < N
        dm = tl.load(RM + (start + n) * C + c, mask=m, other=0.0) - mean
        acc += tl.where(m, tl.load(RV + (start + n) * C + c, mask=m, other=0.0) + dm * dm, 0.0)
    var = tl.sum(acc, 0) / N
    tl.store(MEAN + c, mean)
    tl.store(VAR + c, var)


@triton.jit
def _bn_grad_sums_kernel(PDW, PDB, W, GW, GB, C1, C2, N, C, inv_count, BLOCK_N: tl.constexpr):
    # Batch norm on NCHW backward, between the two sweeps: per channel, sum the per-row partial
    # sums of dy*x_hat and dy (fixed order: deterministic) into the parameter gradients and the
    # two coefficients of the batch-statistics terms of dx.
    c = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        m = start + n < N
        acc_w += tl.load(PDW + (start + n) * C + c, mask=m, other=0.0)
        acc_b += tl.load(PDB + (start + n) * C + c, mask=m, other=0.0)
    gw = tl.sum(acc_w, 0)
    gb = tl.sum(acc_b, 0)
    w = tl.load(W + c)
    tl.store(GW + c, gw)
    tl.store(GB + c, gb)
    tl.store(C1 + c, w * gb * inv_count)
    tl.store(C2 + c, w * gw * inv_count)


def _blocks(K: int, S: int) -> tuple[int, int] | None:
    bk, bs = triton_columns._p2(K), triton_columns._p2(S)
    return None if bk * bs > _MAX_TILE else (bk, bs)


def _warps(blocks: tuple[int, int]) -> int:
    # A program holds its whole tile in registers: more warps for larger tiles keep each thread
    # at a few dozen values instead of spilling (4 warps up to 2K elements, 32 from 32K).
    tile = blocks[0] * blocks[1]
    return 4 if tile < 2048 else 8 if tile < 8192 else 16 if tile < 32768 else 32


def supported(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: few programs, so tests exercise programs of several rows
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_programs(R: int, warps: int, device: torch.device) -> int:
    # Programs for the layer/RMS backward: about one SM's worth of warps per SM, so loads are in
    # flight everywhere while the stage-2 partials ([programs, K]) stay a few percent of traffic.
    return max(1, min(R, _sm_count(device) * max(1, 32 // warps)))


def forward(op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any,
            eps: float, stats: tuple[Tensor, Tensor] | None, act: int = 0,
            residual: Tensor | None = None) -> tuple[Tensor, ...] | None:
    """The kernel forward (reference output format), or None to use the reference."""
    if not supported(x):
        return None
    plan = problems.plan(op, x, layout, stats is not None)
    if plan is None or (residual is not None and not isinstance(plan, problems.Rows)):
        return None
    dev = x.device
    f32 = torch.float32
    given = None if stats is None else cpu.fixed_stats(stats, f32)
    w = cpu._param(weight, plan.nparam, f32, 1.0, dev)
    b = cpu._param(bias, plan.nparam, f32, 0.0, dev)
    if isinstance(plan, problems.Columns):  # channels_last: the column kernels
        return triton_columns.col_forward(x, w, b, plan.O, plan.P, plan.C, plan.G, eps,
                                          plan.stats_shape, given, act)
    K, S = plan.K, plan.S
    blocks = _blocks(K, S)
    if blocks is None:
        return None
    xc = plan.input(x)
    y = torch.empty_like(xc)
    common = {"ACT": act, "BLOCK_K": blocks[0], "BLOCK_S": blocks[1],
              "num_warps": _warps(blocks)}
    if isinstance(plan, problems.Rows):
        R = plan.R
        mean, var, invstd = cpu.new_stats(plan.stats_shape, f32, dev)
        res = None if residual is None else residual.contiguous()
        s = torch.empty_like(xc) if residual is not None else None
        _row_forward_kernel[(R,)](
            xc, res if res is not None else xc, s if s is not None else y, y, w, b, mean, var,
            invstd, K, S, plan.Gp, R, float(eps), CENTER=layout.center,
            HAS_RES=residual is not None, FIXED=False, STATS_ONLY=False, **common)
        out = (y, mean, var, invstd)
        return (*out, s) if residual is not None else out
    if isinstance(plan, problems.FixedRows):
        assert given is not None
        mean, var, invstd = given
        _row_forward_kernel[(plan.R,)](
            xc, xc, y, y, w, b, mean, var, invstd, K, S, plan.Gp, plan.smod, float(eps),
            CENTER=True, HAS_RES=False, FIXED=True, STATS_ONLY=False, **common)
        return y, mean, var, invstd
    # ChannelRows: per-row moments, Chan merge per channel, then normalize with the merged
    # statistics.
    N, C = plan.N, plan.C
    R = N * C
    rm, rv = torch.empty(2, R, device=dev, dtype=f32).unbind(0)
    _row_forward_kernel[(R,)](xc, xc, y, y, w, b, rm, rv, rv, 1, S, C, R, 0.0, CENTER=True,
                              HAS_RES=False, FIXED=False, STATS_ONLY=True, **common)
    mean, var, invstd = cpu.new_stats(plan.stats_shape, f32, dev)
    _bn_merge_kernel[(C,)](rm, rv, mean, var, N, C, BLOCK_N=min(1024, triton_columns._p2(N)))
    _row_forward_kernel[(R,)](xc, xc, y, y, w, b, mean, var, invstd, 1, S, C, C, float(eps),
                              CENTER=True, HAS_RES=False, FIXED=True, STATS_ONLY=False, **common)
    return y, mean, var, invstd


def backward(op: str, grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
             mean: Tensor, invstd: Tensor, layout: Any, batch_stats: bool,
             needs: tuple[bool, bool, bool], act: int = 0,
             dextra: Tensor | None = None) -> tuple[Tensor | None, ...] | None:
    """The kernel backward ``(dx, grad_weight, grad_bias)``, or None to use the reference."""
    if not supported(x):
        return None
    plan = problems.plan(op, x, layout, not batch_stats)
    if plan is None:
        return None
    f32 = torch.float32
    w = cpu._param(weight, plan.nparam, f32, 1.0, x.device)
    b = cpu._param(bias, plan.nparam, f32, 0.0, x.device)
    if isinstance(plan, problems.Columns):
        dx, gw, gb = triton_columns.col_backward(grad_out, x, w, b, mean, invstd, plan.O,
                                                 plan.P, plan.C, plan.G, batch_stats, needs[0],
                                                 act)
    else:
        grads = _rows_backward(plan, plan.input(x), layout, grad_out, w, b, mean, invstd,
                               batch_stats, needs, act, dextra)
        if grads is None:
            return None
        dx, gw, gb = grads
    grad_weight = kernels.as_param_grad(gw, weight.shape, weight.dtype) \
        if needs[1] and weight is not None else None
    return dx, grad_weight, gb if needs[2] else None


def _rows_backward(plan: Any, xc: Tensor, layout: Any, grad_out: Tensor, w: Tensor, b: Tensor,
                   mean: Tensor, invstd: Tensor, batch_stats: bool, needs: tuple[bool, bool, bool],
                   act: int, dextra: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor | None] | None:
    """(dx, gw, gb) for the row plans, parameter gradients summed to ``(nparam,)``; None when a
    row is too long for the kernels. gb may be None when ``needs[2]`` is off."""
    need_dx = needs[0]
    K, S = plan.K, plan.S
    blocks = _blocks(K, S)
    if blocks is None:
        return None
    dev, f32 = xc.device, torch.float32
    dy = kernels.like(xc, grad_out)
    mean, invstd = cpu._flat(mean), cpu._flat(invstd)
    dx = torch.empty_like(xc) if need_dx else None
    warps = _warps(blocks)
    rows = isinstance(plan, problems.Rows)
    if rows and S == 1 and plan.Gp == 1:  # layer/RMS norm (and add+norm) rows
        de = None if dextra is None else kernels.like(xc, dextra)
        R = plan.R
        if blocks[0] >= _WIDE_ROW:
            if needs[2] or act != 0:  # a fifth row-wide vector: column blocks
                return _wide_rows_backward(layout, dy, xc, de, dx, w, b, mean, invstd, R, K,
                                           needs[2], act)
            warps = 32
        progs = _row_programs(R, warps, dev)
        rows_per = math.ceil(R / progs)
        progs = math.ceil(R / rows_per)
        parts, dw, db = _partials(progs, K, dev, needs[2])
        _vec_backward_kernel[(progs,)](
            dy, xc, de if de is not None else dy, dx if dx is not None else dy, w, b, mean,
            invstd, dw, db, R, K, rows_per, CENTER=layout.center, NEED_DX=dx is not None,
            NEED_DB=needs[2], HAS_EXTRA=de is not None, ACT=act, BLOCK=blocks[0],
            num_warps=warps)
        return (dx, *_summed(parts, needs[2]))
    assert dextra is None, "a residual gradient only comes with layer/RMS rows"
    R, Gp = plan.R, plan.Gp
    common = {"ACT": act, "BLOCK_K": blocks[0], "BLOCK_S": blocks[1], "num_warps": warps}

    # per-row partial parameter gradients, [R, K] each, reused by every launch below
    parts, pdw, pdb = _partials(R, K, dev, True)

    def launch(mode: int, smod: int, need_dx: bool, c1: Tensor | None = None,
               c2: Tensor | None = None) -> None:
        _row_backward_kernel[(R,)](
            dy, xc, dx if dx is not None else dy, w, b, mean, invstd,
            c1 if c1 is not None else invstd, c2 if c2 is not None else invstd, pdw, pdb, K, S,
            Gp, smod, CENTER=layout.center, MODE=mode, NEED_DX=need_dx and dx is not None,
            **common)

    if isinstance(plan, problems.ChannelRows):
        # per-row sums, reduced per channel, then the batch-stat terms
        N, C = plan.N, plan.C
        launch(1, C, False)
        gw, gb, c1, c2 = torch.empty(4, C, device=dev, dtype=f32).unbind(0)
        _bn_grad_sums_kernel[(C,)](pdw, pdb, w, gw, gb, c1, c2, N, C, 1.0 / (N * S),
                                   BLOCK_N=min(1024, triton_columns._p2(N)))
        if dx is not None:  # rewrites the partials, which the sums (same stream) have read
            launch(2, C, True, c1, c2)
        return dx, gw, gb
    if rows and batch_stats and blocks[0] * blocks[1] > _LOOP_TILE:
        chunk = max(1, min(blocks[1], _LOOP_CHUNK // blocks[0]))
        _row_backward_looped_kernel[(R,)](
            dy, xc, dx if dx is not None else dy, w, b, mean, invstd, pdw, pdb, K, S, Gp,
            CENTER=layout.center, NEED_DX=dx is not None, ACT=act, BLOCK_K=blocks[0],
            CHUNK_S=chunk, num_warps=_warps((blocks[0], chunk)))
    elif rows:
        launch(0 if batch_stats else 1, R, True)
    else:  # FixedRows
        launch(1, plan.smod, True)
    # stage 2 of the parameter gradients: a fixed-order sum over samples
    # two sums, not one and an unbind: outputs of an op may not be views of one tensor
    parts = parts.view(2, -1, plan.nparam)
    return dx, parts[0].sum(0), parts[1].sum(0)


def _wide_rows_backward(layout: Any, dy: Tensor, x: Tensor, dextra: Tensor | None,
                        dx: Tensor | None, w: Tensor, b: Tensor, mean: Tensor, invstd: Tensor,
                        R: int, K: int, need_db: bool, act: int
                        ) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Layer/RMS-norm backward of wide rows: the row coefficients, then column blocks over row
    groups (dx and per-group parameter partials), then the fixed-order sum over groups."""
    dev, f32 = x.device, torch.float32
    block_c = min(_WIDE_CHUNK, triton_columns._p2(K))
    ncb = triton_columns._cdiv(K, block_c)
    # about eight 4-warp programs per SM; every row group's partials add K floats of traffic
    groups = max(1, min(R, _sm_count(dev) * 8 // ncb))
    rows_per = math.ceil(R / groups)
    groups = math.ceil(R / rows_per)
    c1 = c2 = invstd  # placeholders when no dx is wanted: the kernel does not read them then
    if dx is not None:
        c1, c2 = (torch.empty(R, device=dev, dtype=f32) for _ in range(2))
        _wide_coeffs_kernel[(R,)](dy, x, w, b, mean, invstd, c1, c2, K, CENTER=layout.center,
                                  ACT=act, BLOCK_C=min(4096, triton_columns._p2(K)),
                                  num_warps=8)
    parts, dw, db = _partials(groups, K, dev, need_db)
    _wide_rows_kernel[(ncb, groups)](
        dy, x, dextra if dextra is not None else dy, dx if dx is not None else dy, w, b, mean,
        invstd, c1, c2, dw, db, R, K, rows_per, CENTER=layout.center, NEED_DX=dx is not None,
        NEED_DB=need_db, HAS_EXTRA=dextra is not None, ACT=act, BLOCK_C=block_c, num_warps=4)
    return (dx, *_summed(parts, need_db))


def _partials(n: int, K: int, device: torch.device,
              need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(buffer, weight partials, bias partials): [n, K] float32 stage-1 partial sums, both in one
    buffer; without a bias, the weight's only."""
    if not need_db:
        parts = torch.empty(n, K, device=device, dtype=torch.float32)
        return parts, parts, parts
    parts = torch.empty(2, n, K, device=device, dtype=torch.float32)
    dw, db = parts.unbind(0)
    return parts, dw, db


def _summed(parts: Tensor, need_db: bool) -> tuple[Tensor, Tensor | None]:
    """Stage 2 of the parameter gradients: a fixed-order sum over the partials' rows."""
    if not need_db:
        return parts.sum(0), None
    return parts[0].sum(0), parts[1].sum(0)  # separate tensors: op outputs may not alias
