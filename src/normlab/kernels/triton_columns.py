"""Triton kernels for the column problem (channels_last batch, instance and group norm).

``x`` is a dense ``[O][P][C]`` array (channels innermost, see :mod:`normlab.kernels.cpu`) with
statistics per ``(o, g)`` over the P rows and the ``K = C // G`` consecutive channels of group g.
Every chunked kernel runs on the grid ``(O, nchunk, ceil(C / BLOCK_C))``: a program owns
``CHUNK_P = SUB * BLOCK_P`` rows of one sample and ``BLOCK_C`` channels, read as ``SUB`` tiles of
``BLOCK_P x BLOCK_C`` (rows of ``BLOCK_C`` contiguous channels, so loads are coalesced and vector
wide along C).

Forward with batch statistics, three launches:

1. ``_stats_kernel``: per chunk and channel, the mean and M2 (sum of squared deviations) of
   ``x - x[o, 0, c]`` (shifted by the sample's first row, so large offsets keep their digits),
   by Welford's update per register slot across the chunk's tiles, the slots merged at the end
   with Chan's formula;
2. ``_merge_kernel``: per ``(o, block of groups)``, all chunk partials of the groups' channels
   merged with Chan's formula into the float32 ``mean``, ``var`` (biased) and ``invstd``, plus the
   part of the mean that float32 ``mean`` rounds off (as the C++ kernel's hi/lo pair);
3. ``_normalize_kernel``: ``y = act((x - mean) * (invstd * w) + (b - lo * invstd * w))`` in x's
   dtype.

With given (fixed) statistics only step 3 runs. Backward, three launches: per-chunk per-channel
sums of ``dy'`` and ``dy' * x_hat`` (``dy'`` = dy times the activation's derivative at the
recomputed pre-activation); per ``(o, block of groups)`` their sums over chunks and the two
projection coefficients of the batch-statistics gradient; then ``dx`` elementwise, where the
programs of chunk 0 of sample 0 also sum the per-sample parameter gradients over samples. Every
sum runs in a fixed order in float32: results are deterministic (no atomics).

Tested on the CPU with ``TRITON_INTERPRET=1`` (tests/test_kernels_triton_columns.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab import kernels
from normlab.kernels import cpu
from normlab.kernels.triton_activations import act_fwd, act_grad

__all__ = ["col_backward", "col_forward"]

# Tuning knobs (module-level so the tests can force small tiles and many chunks).
_TILE = 4096        # elements of one BLOCK_P x BLOCK_C tile
_BLOCK_C = 128      # widest channel block (512 contiguous bytes per row in float32)
_PROGRAMS = 2048    # chunks are sized so the chunked kernels launch about this many programs
_MERGE_TILE = 2048  # elements of one merge tile (chunks x channels)
_MERGE_CH = 8       # channels per merge program (at least one whole group)


@triton.jit
def _program_tile(C, BLOCK_C: tl.constexpr):
    # The chunked kernels' grid (O, nchunk, channel blocks): sample o (int64 offsets), chunk j,
    # this program's channels c and their mask.
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(0).to(tl.int64), tl.program_id(1), c, c < C


@triton.jit
def _group_channels(G, K, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    # The merge kernels' grid (O, group blocks): sample o, first group g0, and the channels of
    # groups g0 .. g0 + BLOCK_G - 1 laid out group by group (BLOCK_K slots each) with their mask.
    g0 = tl.program_id(1) * BLOCK_G
    i = tl.arange(0, BLOCK_G * BLOCK_K)
    k = i % BLOCK_K
    g = g0 + i // BLOCK_K
    return tl.program_id(0).to(tl.int64), g0, g * K + k, (k < K) & (g < G)


@triton.jit
def _load_tile(X, o, P, C, p, c, cmask):
    # Rows p (of sample o) by channels c of the [O][P][C] array: x in float32, with the offsets
    # and mask for a store of the same tile.
    mask = (p < P)[:, None] & cmask[None, :]
    offs = (o * P + p)[:, None] * C + c[None, :]
    return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _stats_kernel(
    X, PART,                   # x [O][P][C]; partials [2][O * nchunk][C] float32: the mean of
                               # x - x[o, 0, c] and M2
    P, C, CHUNK_P, nchunk,
    SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o, j, c, cmask = _program_tile(C, BLOCK_C)
    rows = tl.arange(0, BLOCK_P)
    p_start = j * CHUNK_P
    nsub = tl.minimum(SUB, tl.cdiv(P - p_start, BLOCK_P))
    # Moments of x - shift, the shift being the sample's first row (the same for every chunk of
    # the sample): sums of small deviations, so large offsets keep their variance and mean.
    shift = tl.load(X + o * P * C + c, mask=cmask, other=0.0).to(tl.float32)
    # Welford's update per register slot (row of the tile) across the chunk's tiles, so the loop
    # has no cross-warp reductions; the slots are merged once at the end (Chan, many-way).
    cnt = tl.zeros([BLOCK_P], dtype=tl.float32)
    mean_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    m2_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for s in range(nsub):
        p = p_start + s * BLOCK_P + rows
        pmask = p < P
        mask = pmask[:, None] & cmask[None, :]
        offs = (o * P + p)[:, None] * C + c[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift[None, :]
        cnt += pmask.to(tl.float32)
        d = tl.where(mask, x - mean_s, 0.0)
        mean_s += d * (1.0 / tl.maximum(cnt, 1.0))[:, None]
        m2_s += d * tl.where(mask, x - mean_s, 0.0)
    n = tl.sum(cnt, 0)
    mean_a = tl.sum(cnt[:, None] * mean_s, 0) / n
    dev = mean_s - mean_a[None, :]
    m2_a = tl.sum(m2_s, 0) + tl.sum(cnt[:, None] * dev * dev, 0)
    out = (o * nchunk + j) * C + c
    tl.store(PART + out, mean_a, mask=cmask)
    tl.store(PART + tl.num_programs(0).to(tl.int64) * nchunk * C + out, m2_a, mask=cmask)


@triton.jit
def _merge_kernel(
    X, PART, MEAN, VAR, RSTD,  # partials as _stats_kernel writes them; statistics [O * G]
    P, C, G, K, CHUNK_P, nchunk, eps,
    BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o, g0, c, cvalid = _group_channels(G, K, BLOCK_G, BLOCK_K)
    jj = tl.arange(0, BLOCK_J)
    PQ = PART + tl.num_programs(0).to(tl.int64) * nchunk * C
    n_a = 0.0
    mean_a = tl.zeros([BLOCK_G * BLOCK_K], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_G * BLOCK_K], dtype=tl.float32)
    # Per channel: the chunks' moments, BLOCK_J chunks at a time (multi-way merge around the
    # block's first chunk mean), blocks merged in order with Chan's pairwise update.
    for j0 in range(0, nchunk, BLOCK_J):
        j = j0 + jj
        jm = j < nchunk
        m = jm[:, None] & cvalid[None, :]
        offs = (o * nchunk + j)[:, None] * C + c[None, :]
        pm = tl.load(PART + offs, mask=m, other=0.0)
        pq = tl.load(PQ + offs, mask=m, other=0.0)
        cnt = tl.where(jm, tl.minimum(P - j * CHUNK_P, CHUNK_P), 0).to(tl.float32)
        n_b = tl.sum(cnt, 0)
        pivot = tl.sum(tl.where(jj[:, None] == 0, pm, 0.0), 0)
        mean_b = pivot + tl.sum(cnt[:, None] * tl.where(m, pm - pivot[None, :], 0.0), 0) / n_b
        dev = tl.where(m, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pq, 0) + tl.sum(cnt[:, None] * dev * dev, 0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    gg = g0 + tl.arange(0, BLOCK_G)
    Pf = P * 1.0
    shift = tl.load(X + o * P * C + c, mask=cvalid, other=0.0).to(tl.float32)
    if BLOCK_K == 1:
        base = shift
        mean_d = mean_a
        m2_g = m2_a
    else:
        # The K channels of a group: equal counts P, deviations taken from the group's first
        # channel's shift.
        s2 = tl.reshape(shift, [BLOCK_G, BLOCK_K])
        kk = tl.arange(0, BLOCK_K)[None, :]
        kv = kk < K
        base = tl.sum(tl.where(kk == 0, s2, 0.0), 1)
        dev = tl.where(kv, (s2 - base[:, None]) + tl.reshape(mean_a, [BLOCK_G, BLOCK_K]), 0.0)
        mean_d = tl.sum(dev, 1) / K
        dev = tl.where(kv, dev - mean_d[:, None], 0.0)
        m2_g = tl.sum(tl.where(kv, tl.reshape(m2_a, [BLOCK_G, BLOCK_K]), 0.0), 1) + \
            Pf * tl.sum(dev * dev, 1)
    mean = base + mean_d
    # What float32 `mean` misses of base + mean_d (exact when the offset dominates), so the
    # normalize kernel subtracts the mean to within float rounding of x - mean.
    lo = (base - mean) + mean_d
    var = tl.maximum(m2_g / (Pf * K), 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    gmask = gg < G
    tl.store(MEAN + o * G + gg, mean, mask=gmask)
    tl.store(PQ + tl.num_programs(0).to(tl.int64) * nchunk * C + o * G + gg, lo, mask=gmask)
    tl.store(VAR + o * G + gg, var, mask=gmask)
    tl.store(RSTD + o * G + gg, rstd, mask=gmask)


@triton.jit
def _normalize_kernel(
    X, Y, W, B, MEAN, RSTD,    # x, y [O][P][C]; w, b [C]; statistics [O * G] (given: [G])
    PART,                      # HAS_LO: _merge_kernel's partials, then the means' low parts
    P, C, G, K, CHUNK_P, smod,
    HAS_LO: tl.constexpr, ACT: tl.constexpr,
    SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o, j, c, cmask = _program_tile(C, BLOCK_C)
    si = (o % smod) * G + c // K
    mean = tl.load(MEAN + si, mask=cmask, other=0.0)
    a = tl.load(RSTD + si, mask=cmask, other=0.0) * tl.load(W + c, mask=cmask, other=0.0)
    b = tl.load(B + c, mask=cmask, other=0.0)
    if HAS_LO:
        LO = PART + tl.num_programs(0).to(tl.int64) * (2 * tl.cdiv(P, CHUNK_P) * C)
        b = b - tl.load(LO + si, mask=cmask, other=0.0) * a
    rows = tl.arange(0, BLOCK_P)
    p_start = j * CHUNK_P
    for s in range(tl.minimum(SUB, tl.cdiv(P - p_start, BLOCK_P))):
        x, offs, mask = _load_tile(X, o, P, C, p_start + s * BLOCK_P + rows, c, cmask)
        z = (x - mean[None, :]) * a[None, :] + b[None, :]
        tl.store(Y + offs, act_fwd(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums_kernel(
    DY, X, W, B, MEAN, RSTD,   # dy, x [O][P][C]; partials: PART [2][O * nchunk][C]
    PART,
    P, C, G, K, CHUNK_P, nchunk, smod,
    ACT: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o, j, c, cmask = _program_tile(C, BLOCK_C)
    si = (o % smod) * G + c // K
    mean = tl.load(MEAN + si, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + si, mask=cmask, other=0.0)
    if ACT != 0:
        w = tl.load(W + c, mask=cmask, other=0.0)
        b = tl.load(B + c, mask=cmask, other=0.0)
    rows = tl.arange(0, BLOCK_P)
    p_start = j * CHUNK_P
    # Sums per register slot, reduced across rows once at the end (no cross-warp reductions
    # inside the loop).
    acc_d = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_dx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for s in range(tl.minimum(SUB, tl.cdiv(P - p_start, BLOCK_P))):
        x, offs, mask = _load_tile(X, o, P, C, p_start + s * BLOCK_P + rows, c, cmask)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x_hat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        if ACT != 0:
            dy = dy * act_grad(x_hat * w[None, :] + b[None, :], ACT)
        acc_d += dy
        acc_dx += dy * x_hat
    out = (o * nchunk + j) * C + c
    tl.store(PART + out, tl.sum(acc_d, 0), mask=cmask)
    tl.store(PART + tl.num_programs(0).to(tl.int64) * nchunk * C + out, tl.sum(acc_dx, 0),
             mask=cmask)


@triton.jit
def _bwd_merge_kernel(
    PART, SUMS, W, RSTD,       # partials [2][O * nchunk][C]; SUMS [2][O][C] + COEF [2][O * G]
    P, C, G, K, nchunk,
    BATCH: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o, g0, c, cvalid = _group_channels(G, K, BLOCK_G, BLOCK_K)
    n_o = tl.num_programs(0).to(tl.int64)
    jj = tl.arange(0, BLOCK_J)
    PDX = PART + nchunk * C * n_o
    COEF = SUMS + 2 * n_o * C
    sd = tl.zeros([BLOCK_G * BLOCK_K], dtype=tl.float32)
    sdx = tl.zeros([BLOCK_G * BLOCK_K], dtype=tl.float32)
    for j0 in range(0, nchunk, BLOCK_J):
        j = j0 + jj
        m = (j < nchunk)[:, None] & cvalid[None, :]
        offs = (o * nchunk + j)[:, None] * C + c[None, :]
        sd += tl.sum(tl.load(PART + offs, mask=m, other=0.0), 0)
        sdx += tl.sum(tl.load(PDX + offs, mask=m, other=0.0), 0)
    tl.store(SUMS + o * C + c, sd, mask=cvalid)
    tl.store(SUMS + n_o * C + o * C + c, sdx, mask=cvalid)
    if BATCH:
        # dx = invstd (w dy' - mean_g(w dy') - x_hat mean_g(w dy' x_hat)) = a dy' + c0 + c2 x_hat
        w = tl.load(W + c, mask=cvalid, other=0.0)
        gg = g0 + tl.arange(0, BLOCK_G)
        gmask = gg < G
        if BLOCK_K == 1:
            tg = w * sd
            tgx = w * sdx
        else:
            tg = tl.sum(tl.reshape(w * sd, [BLOCK_G, BLOCK_K]), 1)
            tgx = tl.sum(tl.reshape(w * sdx, [BLOCK_G, BLOCK_K]), 1)
        rstd = tl.load(RSTD + o * G + gg, mask=gmask, other=0.0)
        M = (P * 1.0) * K
        tl.store(COEF + o * G + gg, -rstd * tg / M, mask=gmask)
        tl.store(COEF + n_o * G + o * G + gg, -rstd * tgx / M, mask=gmask)


@triton.jit
def _bwd_dx_kernel(
    DY, X, DX, W, B, MEAN, RSTD,
    SUMS, GRAD,                # SUMS [2][O][C], then COEF [2][O * G]; GRAD [2][C] (gw, gb)
    n_o, P, C, G, K, CHUNK_P, smod,
    BATCH: tl.constexpr, NEED_DX: tl.constexpr, ACT: tl.constexpr,
    SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    o, j, c, cmask = _program_tile(C, BLOCK_C)
    rows = tl.arange(0, BLOCK_P)
    n_o = o * 0 + n_o  # int64 offsets below (n_o may arrive as a 32-bit int or a constexpr)
    if (o == 0) & (j == 0):
        # Stage 2 of the parameter gradients: per-sample sums added over samples in order.
        gb = tl.zeros([BLOCK_C], dtype=tl.float32)
        gw = tl.zeros([BLOCK_C], dtype=tl.float32)
        for q0 in range(0, n_o, BLOCK_P):
            q = (q0 + rows).to(tl.int64)
            m = (q < n_o)[:, None] & cmask[None, :]
            offs = q[:, None] * C + c[None, :]
            gb += tl.sum(tl.load(SUMS + offs, mask=m, other=0.0), 0)
            gw += tl.sum(tl.load(SUMS + n_o * C + offs, mask=m, other=0.0), 0)
        tl.store(GRAD + c, gw, mask=cmask)
        tl.store(GRAD + C + c, gb, mask=cmask)
    if NEED_DX:
        si = (o % smod) * G + c // K
        mean = tl.load(MEAN + si, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + si, mask=cmask, other=0.0)
        w = tl.load(W + c, mask=cmask, other=0.0)
        b = tl.load(B + c, mask=cmask, other=0.0)
        a = rstd * w
        if BATCH:
            COEF = SUMS + 2 * n_o * C
            ci = o * G + c // K
            c0 = tl.load(COEF + ci, mask=cmask, other=0.0)
            c2 = tl.load(COEF + n_o * G + ci, mask=cmask, other=0.0)
        p_start = j * CHUNK_P
        for s in range(tl.minimum(SUB, tl.cdiv(P - p_start, BLOCK_P))):
            x, offs, mask = _load_tile(X, o, P, C, p_start + s * BLOCK_P + rows, c, cmask)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x_hat = (x - mean[None, :]) * rstd[None, :]
            if ACT != 0:
                dy = dy * act_grad(x_hat * w[None, :] + b[None, :], ACT)
            dx = a[None, :] * dy
            if BATCH:
                dx = dx + c0[None, :] + c2[None, :] * x_hat
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _p2(n: int) -> int:
    # Plain Python: triton.next_power_of_2 / triton.cdiv are constexpr-function objects whose
    # calls cost microseconds of host time each, several per normalization call.
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _config(O: int, P: int, C: int, G: int, tile: int, max_bc: int,  # noqa: E741
            programs: int, merge_tile: int, merge_ch: int) -> tuple[int, ...]:
    """(BLOCK_C, BLOCK_P, SUB, CHUNK_P, nchunk, num_warps, BLOCK_J, BLOCK_G, BLOCK_K, merge grid,
    merge warps) for one problem; cached, since the host time matters for small shapes."""
    block_c = max(2, min(_p2(C), max_bc))
    block_p = max(2, min(tile // block_c, _p2(P)))
    ntile_p = _cdiv(P, block_p)
    tiles = O * ntile_p * _cdiv(C, block_c)
    sub = max(1, min(tiles // programs, ntile_p))
    chunk_p = sub * block_p
    nchunk = _cdiv(P, chunk_p)
    warps = 4 if block_p * block_c <= 2048 else 8
    K = C // G
    block_k = _p2(K)
    block_g = max(1, min(merge_ch // block_k, _p2(G)))
    block_j = max(2, min(_p2(nchunk), merge_tile // (block_g * block_k)))
    merge_warps = 4 if block_j * block_g * block_k <= 2048 else 8
    return (block_c, block_p, sub, chunk_p, nchunk, warps, block_j, block_g, block_k,
            _cdiv(G, block_g), merge_warps)


def col_forward(x: Tensor, w: Tensor, b: Tensor, O: int, P: int, C: int,  # noqa: E741
                G: int, eps: float, stats_shape: tuple[int, ...],
                given: tuple[Tensor, Tensor, Tensor] | None,
                act: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, invstd)`` as ``cpu._col_forward`` returns them (statistics float32 in
    ``stats_shape``). ``given``: fixed (mean, var, invstd), G values each (or O * G), invstd
    to be filled here with 1 / sqrt(var + eps)."""
    bc, bp, sub, chunk, nchunk, warps, bj, bg, bk, ngb, mwarps = _config(
        O, P, C, G, _TILE, _BLOCK_C, _PROGRAMS, _MERGE_TILE, _MERGE_CH)
    K = C // G
    y = torch.empty_like(x)
    grid = (O, nchunk, _cdiv(C, bc))
    if given is None:
        mean, var, invstd = cpu.new_stats(stats_shape, torch.float32, x.device)
        part = torch.empty(2 * O * nchunk * C + O * G, device=x.device, dtype=torch.float32)
        _stats_kernel[grid](x, part, P, C, chunk, nchunk, SUB=sub, BLOCK_P=bp, BLOCK_C=bc,
                            num_warps=warps)
        _merge_kernel[(O, ngb)](x, part, mean, var, invstd, P, C, G, K, chunk, nchunk, float(eps),
                                BLOCK_J=bj, BLOCK_G=bg, BLOCK_K=bk, num_warps=mwarps)
        smod = O
    else:
        mean, var, invstd = (t.view(stats_shape) for t in given)
        torch.add(var, eps, out=invstd).rsqrt_()
        smod, part = max(1, mean.numel() // G), mean
    _normalize_kernel[grid](x, y, w, b, cpu._flat(mean), cpu._flat(invstd), part, P, C, G, K, chunk,
                            smod, HAS_LO=given is None, ACT=act, SUB=sub, BLOCK_P=bp,
                            BLOCK_C=bc, num_warps=warps)
    return y, mean, var, invstd


def col_backward(dy: Tensor, x: Tensor, w: Tensor, b: Tensor, mean: Tensor, invstd: Tensor,
                 O: int, P: int, C: int, G: int,  # noqa: E741
                 batch_stats: bool, need_dx: bool,
                 act: int) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(dx or None, gw, gb)`` as ``cpu._col_backward`` returns them (gw, gb: float32 [C])."""
    bc, bp, sub, chunk, nchunk, warps, bj, bg, bk, ngb, mwarps = _config(
        O, P, C, G, _TILE, _BLOCK_C, _PROGRAMS, _MERGE_TILE, _MERGE_CH)
    K = C // G
    dy = kernels.like(x, dy)
    mean, invstd = cpu._flat(mean), cpu._flat(invstd)
    smod = max(1, mean.numel() // G)
    dev = x.device
    f32 = torch.float32
    part = torch.empty(2 * O * nchunk * C, device=dev, dtype=f32)
    sums = torch.empty(2 * O * C + 2 * O * G, device=dev, dtype=f32)
    grad = torch.empty((2, C), device=dev, dtype=f32)
    nb = _cdiv(C, bc)
    _bwd_sums_kernel[(O, nchunk, nb)](dy, x, w, b, mean, invstd, part, P, C, G, K, chunk,
                                      nchunk, smod, ACT=act, SUB=sub, BLOCK_P=bp, BLOCK_C=bc,
                                      num_warps=warps)
    _bwd_merge_kernel[(O, ngb)](part, sums, w, invstd, P, C, G, K, nchunk,
                                BATCH=batch_stats and need_dx, BLOCK_J=bj, BLOCK_G=bg,
                                BLOCK_K=bk, num_warps=mwarps)
    dx = torch.empty_like(x) if need_dx else None
    _bwd_dx_kernel[(O, nchunk, nb) if need_dx else (1, 1, nb)](
        dy, x, dx if dx is not None else x, w, b, mean, invstd, sums, grad, O, P, C, G, K,
        chunk, smod, BATCH=batch_stats, NEED_DX=need_dx, ACT=act, SUB=sub, BLOCK_P=bp,
        BLOCK_C=bc, num_warps=warps)
    return dx, grad[0], grad[1]
