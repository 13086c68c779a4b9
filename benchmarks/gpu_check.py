"""Correctness of normlab's default path on a CUDA device, against the float64 reference.

Every module that has a Triton kernel runs on the GPU through the public API (forward, then
backward with a random upstream gradient) and is compared with a float64 CPU twin on the
reference path: relative error ``||out - ref|| / ||ref||`` per output and per gradient, with a
tolerance per dtype, NaN never passing. Outputs are poisoned first (the caching allocator hands
the kernels blocks that held NaN), so an element a kernel never writes shows up as NaN. The
script also records which cases the Triton kernels took and which they handed to the reference.

    python benchmarks/gpu_check.py --json out.json          # on a machine with a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run --quick   # CPU, interpreter

``--dry-run`` runs the same checks on CPU tensors with the Triton kernels selected for them
(under ``TRITON_INTERPRET=1``), to catch mistakes in this script before spending device time.
It exits non-zero when any check fails. Not a test: CI has no GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

import normlab
from normlab import kernels
from normlab.kernels import gpu

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# ReLU's derivative jumps at 0: in half precision the pre-activations that round across 0 take
# the other branch, so gradients differ from float64 by a few percent (the reference path on the
# GPU, channels_last here, shows the same on an H100: bf16 3.2e-2, fp16 6.4e-3).
TOL_RELU = {torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 6e-2}


def _cases(quick: bool) -> list[tuple[str, Any, tuple[int, ...], bool, int]]:
    """(name, module factory, input shape, channels_last, inputs) per case."""
    m = normlab.nn
    rows = [(7, 33), (3, 5, 100)] if quick else [(7, 33), (3, 5, 100), (4096, 1024), (64, 5000),
                                                (8, 16384)]
    imgs = [(3, 6, 5, 7)] if quick else [(3, 6, 5, 7), (2, 64, 17, 19), (8, 32, 56, 56)]
    out: list[tuple[str, Any, tuple[int, ...], bool, int]] = []
    for shape in rows:
        c = shape[-1]
        out += [
            ("LayerNorm", lambda c=c: m.LayerNorm(c), shape, False, 1),
            ("LayerNorm(no bias)", lambda c=c: m.LayerNorm(c, bias=False), shape, False, 1),
            ("RMSNorm", lambda c=c: m.RMSNorm(c), shape, False, 1),
            ("FusedAddLayerNorm", lambda c=c: m.FusedAddLayerNorm(c), shape, False, 2),
            ("FusedAddLayerNorm(gelu)", lambda c=c: m.FusedAddLayerNorm(c, activation="gelu"),
             shape, False, 2),
            ("FusedAddRMSNorm", lambda c=c: m.FusedAddRMSNorm(c), shape, False, 2),
            ("FusedAddRMSNorm(silu)", lambda c=c: m.FusedAddRMSNorm(c, activation="silu"),
             shape, False, 2),
        ]
    for shape in imgs:
        c = shape[1]
        g = 3 if c % 3 == 0 else 32 if c % 32 == 0 else 1
        for cl in (False, True):
            out += [
                ("BatchNorm2d", lambda c=c: m.BatchNorm2d(c), shape, cl, 1),
                ("BatchNorm2d(eval)", lambda c=c: _eval(m.BatchNorm2d(c)), shape, cl, 1),
                ("GroupNorm", lambda c=c, g=g: m.GroupNorm(g, c), shape, cl, 1),
                # few groups: rows of 8K+ elements take the looped backward at 8x32x56x56
                ("GroupNorm(4 groups)", lambda c=c: m.GroupNorm(4 if c % 4 == 0 else 1, c),
                 shape, cl, 1),
                ("InstanceNorm2d", lambda c=c: m.InstanceNorm2d(c, affine=True), shape, cl, 1),
                ("BatchNormAct2d(relu)", lambda c=c: m.BatchNormAct2d(c, activation="relu"),
                 shape, cl, 1),
                ("GroupNormAct(silu)", lambda c=c, g=g: m.GroupNormAct(g, c, activation="silu"),
                 shape, cl, 1),
                ("GroupNormAct(gelu)", lambda c=c, g=g: m.GroupNormAct(g, c, activation="gelu"),
                 shape, cl, 1),
            ]
    return out


def _eval(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    return module.eval()


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1)


def _poison(device: torch.device, nbytes: int) -> None:
    # Fill, then free, blocks of the sizes the kernels will ask for: the caching allocator hands
    # them out again, so an element a kernel never writes reads NaN, not a plausible value.
    if device.type == "cuda":
        for _ in range(4):
            torch.full((nbytes // 4 + 1,), float("nan"), device=device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(module: nn.Module, inputs: list[torch.Tensor], grad_seed: int) -> dict[str, torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = module(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    torch.autograd.backward(outs, grads)
    result = {f"out{i}": o for i, o in enumerate(outs)}
    result.update({f"grad_input{i}": t.grad for i, t in enumerate(leaves)})
    result.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    result.update({f"buffer_{n}": b for n, b in module.named_buffers() if b.is_floating_point()})
    return result


def _label(name: str, shape: tuple[int, ...], cl: bool) -> str:
    return f"{name} {'x'.join(map(str, shape))}{' CL' if cl else ''}"


def check(device: torch.device, dtypes: list[torch.dtype], quick: bool,
          only: str | None = None) -> list[dict[str, Any]]:
    from normlab.kernels import triton_kernels as tk

    taken: Counter[tuple[str, bool]] = Counter()
    real_fwd, real_bwd = tk.forward, tk.backward

    def count(fn: Any, what: str) -> Any:
        def wrapped(op: str, *args: Any, **kw: Any) -> Any:
            out = fn(op, *args, **kw)
            taken[(f"{what}:{op}", out is not None)] += 1
            return out
        return wrapped

    tk.forward, tk.backward = count(real_fwd, "fwd"), count(real_bwd, "bwd")
    records = []
    try:
        for i, (name, factory, shape, cl, n_in) in enumerate(_cases(quick)):
            if only is not None and not re.search(only, _label(name, shape, cl)):
                continue
            for dtype in dtypes:
                g = torch.Generator().manual_seed(1000 + i)
                ref_mod = factory().double()
                _randomize(ref_mod, g)
                mod = copy.deepcopy(ref_mod).to(device=device, dtype=dtype)
                xs = [(torch.randn(shape, generator=g) * 2 + 0.5) for _ in range(n_in)]
                if cl:
                    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
                dev_in = [x.to(device=device, dtype=dtype) for x in xs]
                # the reference sees the rounded low-precision inputs, so only the op's error counts
                ref_in = [x.double().cpu() for x in dev_in]
                before = sum(taken[k] for k in taken if k[1])
                _poison(device, math.prod(shape) * 4)
                got = _run(mod, dev_in, i)
                with kernels.use_reference():
                    want = _run(ref_mod, ref_in, i)
                kernel_calls = sum(taken[k] for k in taken if k[1]) - before
                errs = {k: _rel(got[k], want[k]) for k in want if want[k] is not None}
                missing = [k for k in want if want[k] is not None and got.get(k) is None]
                worst = max(errs.values()) if errs else math.inf
                tol = (TOL_RELU if "relu" in name else TOL)[dtype]
                ok = worst <= tol and not missing
                records.append({
                    "case": name, "shape": list(shape), "channels_last": cl,
                    "dtype": str(dtype).removeprefix("torch."), "max_rel_err": worst,
                    "errors": errs, "missing": missing, "triton_calls": kernel_calls, "ok": ok,
                })
                status = "ok  " if ok else "FAIL"
                print(f"{status} {name:26s} {'x'.join(map(str, shape)):14s} "
                      f"{'CL ' if cl else '   '}{records[-1]['dtype']:9s} max rel err "
                      f"{worst:.2e}  triton calls {kernel_calls}", flush=True)
    finally:
        tk.forward, tk.backward = real_fwd, real_bwd
    print("Triton kernel took / declined per op:",
          dict(sorted((f"{k[0]}:{'took' if k[1] else 'declined'}", v) for k, v in taken.items())))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors through the Triton kernels (needs TRITON_INTERPRET=1)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="cases whose 'Name 8x32x56x56 CL' label matches REGEX")
    args = parser.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        gpu._applies = lambda x: gpu.triton_available()  # select Triton for CPU tensors
        kernels._REGISTRY.clear()
        gpu.register_all()
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    start = time.perf_counter()
    records = check(device, [getattr(torch, d) for d in args.dtypes], args.quick, args.only)
    failed = [r for r in records if not r["ok"]]
    print(f"{len(records) - len(failed)}/{len(records)} checks passed in "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "records": records}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
