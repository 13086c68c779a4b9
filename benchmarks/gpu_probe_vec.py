"""Layer/RMS-norm backward on wide rows: time variants of the row kernel on a GPU (a probe, not a test).

Run 3 put the RMS backward at 3x the layer-norm one on 4096x16384 (gpu_notes.md). ptxas for
sm_90a (triton 3.6, the device's) gives the 16-warp RMS variant of ``_vec_backward_kernel`` 32
registers and a 1 KB spill stack per thread, the layer-norm variant 128 registers and 424 bytes:
a 16384-wide row holds x, dy, w and two accumulators (320 KB at fp32) where the register file is
256 KB. This script times, on the same inputs and one run:

- ``vec``: the production kernel, by warps and an explicit register cap (``maxnreg``);
- ``wload``: the same loop with the weight re-read each row (from L1/L2) instead of held;
- ``split``: two kernels, per-row coefficients then column blocks over row groups (dx and the
  parameter partials), each program holding one column block: no spills, two more reads of x, dy
  (the production ``_wide_coeffs_kernel`` / ``_wide_rows_kernel``, at several block sizes).

Each variant is checked against a torch float32 formula before it is timed.

    python benchmarks/gpu_probe_vec.py                       # CUDA
    TRITON_INTERPRET=1 python benchmarks/gpu_probe_vec.py --dry-run   # CPU, small shapes
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from normlab.kernels import triton_kernels as tk


@triton.jit
def _vec_bwd_wload_kernel(DY, X, DX, W, MEAN, RSTD, DW, DB, R, K, rows_per_prog,
                          CENTER: tl.constexpr, NEED_DB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    acc_dw = tl.zeros([BLOCK], dtype=tl.float32)
    if NEED_DB:
        acc_db = tl.zeros([BLOCK], dtype=tl.float32)
    r_end = tl.minimum(pid * rows_per_prog + rows_per_prog, R)
    for r in range(pid * rows_per_prog, r_end):
        base = r * K
        w = tl.load(W + cols, mask=mask, other=0.0)  # re-read each row: one vector fewer held
        x_hat, dy, rstd = tk._row_terms(X, DY, MEAN, RSTD, r, base, cols, mask, w, w, CENTER, 0)
        acc_dw += dy * x_hat
        if NEED_DB:
            acc_db += dy
        g = dy * w
        c2 = tl.sum(g * x_hat, 0) / K
        if CENTER:
            dx = rstd * (g - tl.sum(g, 0) / K - x_hat * c2)
        else:
            dx = rstd * (g - x_hat * c2)
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * K + cols, acc_dw, mask=mask)
    if NEED_DB:
        tl.store(DB + pid * K + cols, acc_db, mask=mask)


def _inputs(R: int, K: int, center: bool, device: str, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(R, K, generator=g).to(device, dtype)
    dy = torch.randn(R, K, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(K, generator=g)).to(device)
    xf = x.float()
    mean = xf.mean(1) if center else torch.zeros(R, device=device)
    var = (xf - mean[:, None]).pow(2).mean(1)
    rstd = torch.rsqrt(var + 1e-5)
    return x, dy, w, mean.contiguous(), rstd.contiguous()


def _reference(x, dy, w, mean, rstd, center):
    x_hat = (x.float() - mean[:, None]) * rstd[:, None]
    g = dy.float() * w
    c1 = g.mean(1, keepdim=True) if center else 0.0
    dx = rstd[:, None] * (g - c1 - x_hat * (g * x_hat).mean(1, keepdim=True))
    return dx, (dy.float() * x_hat).sum(0), dy.float().sum(0)


def _variants(R: int, K: int, center: bool, sms: int, dry: bool):
    """(name, fn) pairs; fn(x, dy, w, mean, rstd) -> (dx, dw, db)."""
    block = triton.next_power_of_2(K)
    need_db = center
    out = []
    # (warps, register cap, programs per SM); 8 warps uncapped is the 32-register case again
    configs = [(8, 255, 1), (8, 255, 2), (16, None, 1), (16, 128, 1), (32, None, 1)]
    for warps, cap, per_sm in configs[:1] if dry else configs:
        progs = max(1, min(R, sms * per_sm))

        for label, kernel in (("vec", tk._vec_backward_kernel), ("wload", _vec_bwd_wload_kernel)):

            def run(x, dy, w, mean, rstd, kernel=kernel, warps=warps, cap=cap, progs=progs):
                rows = math.ceil(R / progs)
                n = math.ceil(R / rows)
                dx = torch.empty_like(x)
                dw = torch.empty(n, K, device=x.device)
                db = torch.empty_like(dw)
                extra = {} if cap is None or dry else {"maxnreg": cap}
                if kernel is _vec_bwd_wload_kernel:
                    args = (dy, x, dx, w, mean, rstd, dw, db, R, K, rows)
                    flags = {}
                else:
                    args = (dy, x, dy, dx, w, w, mean, rstd, dw, db, R, K, rows)
                    flags = {"NEED_DX": True, "HAS_EXTRA": False, "ACT": 0}
                kernel[(n,)](*args, CENTER=center, NEED_DB=need_db, BLOCK=block, num_warps=warps,
                             **flags, **extra)
                return dx, dw.sum(0), db.sum(0) if need_db else None

            out.append((f"{label} w{warps} cap{cap} progs{progs}", run))
    for bc, warps, per_sm in ((1024, 4, 8), (2048, 4, 8), (2048, 8, 4), (4096, 8, 4)):
        if dry and bc != 1024:
            continue
        bc = min(bc, block)

        def split(x, dy, w, mean, rstd, bc=bc, warps=warps, per_sm=per_sm):
            ncb = triton.cdiv(K, bc)
            groups = max(1, min(R, sms * per_sm // ncb))
            rows = math.ceil(R / groups)
            groups = math.ceil(R / rows)
            c1 = torch.empty(R, device=x.device)
            c2 = torch.empty_like(c1)
            tk._wide_coeffs_kernel[(R,)](dy, x, w, w, mean, rstd, c1, c2, K, CENTER=center,
                                         ACT=0, BLOCK_C=min(block, 4096), num_warps=8)
            dx = torch.empty_like(x)
            dw = torch.empty(groups, K, device=x.device)
            db = torch.empty_like(dw)
            tk._wide_rows_kernel[(ncb, groups)](
                dy, x, dy, dx, w, w, mean, rstd, c1, c2, dw, db, R, K, rows, CENTER=center,
                NEED_DX=True, NEED_DB=need_db, HAS_EXTRA=False, ACT=0, BLOCK_C=bc,
                num_warps=warps)
            return dx, dw.sum(0), db.sum(0) if need_db else None

        out.append((f"split bc{bc} w{warps} per_sm{per_sm}", split))
    return out


def _regs(kernel) -> str:
    # registers and spills of the variants compiled so far (triton keeps them per device)
    seen = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for k in cache[0].values():
            try:
                k._init_handles()
                seen.append(f"{k.n_regs}r/{k.n_spills}s")
            except Exception:  # the interpreter compiles nothing
                pass
    return " ".join(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, small shapes")
    parser.add_argument("--shapes", nargs="+", default=["4096x16384", "4096x8192"])
    args = parser.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    shapes = [(13, 300)] if args.dry_run else [tuple(map(int, s.split("x"))) for s in args.shapes]
    sms = 2 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    if not args.dry_run:
        print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for R, K in shapes:
        nbytes = 3 * R * K * 4
        for center in (True, False):
            x, dy, w, mean, rstd = _inputs(R, K, center, dev, torch.float32)
            ref = _reference(x, dy, w, mean, rstd, center)
            label = "layer" if center else "rms"
            for name, fn in _variants(R, K, center, sms, args.dry_run):
                try:
                    got = fn(x, dy, w, mean, rstd)
                except Exception as e:  # a configuration that does not compile
                    print(f"{label} {R}x{K} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)
                        if a is not None]
                ok = max(errs) < 1e-4
                if args.dry_run:
                    print(f"{label} {R}x{K} {name}: max rel err {max(errs):.1e} "
                          f"{'ok' if ok else 'WRONG'}")
                    continue
                ms = triton.testing.do_bench(lambda fn=fn, a=(x, dy, w, mean, rstd): fn(*a),
                                             warmup=10, rep=60, return_mode="median")
                print(f"{label} {R}x{K} {name:28s} {ms * 1e3:8.1f} us  "
                      f"{nbytes / ms / 1e9:5.2f} TB/s  err {max(errs):.1e}"
                      f"{'' if ok else ' WRONG'}", flush=True)
    if not args.dry_run:
        for k in (tk._vec_backward_kernel, _vec_bwd_wload_kernel, tk._wide_rows_kernel,
                  tk._wide_coeffs_kernel):
            print(k.fn.__name__, _regs(k))


if __name__ == "__main__":
    main()
