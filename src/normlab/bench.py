"""``normlab bench``: time every normalization op against its baselines, side by side.

For each op and shape the same computation runs through several *providers*, interleaved round by
round so that machine noise hits all of them alike, and the median of the rounds is reported:

* ``normlab``: normlab's module on its default path (the fast kernel chosen by
  :mod:`normlab.kernels` where one applies);
* ``reference``: the same module on the plain-torch reference path (``use_reference()``);
* ``torch``: the ``torch.nn`` twin in eager mode (for fused cases, the eager chain of modules);
* ``compile``: ``torch.compile`` of the ``torch.nn`` twin (``--compile``; compiling is slow);
* ``liger``: Liger-Kernel's layer, RMS, fused add+RMS and group norm, on CUDA when installed;
* ``copy``: an out-of-place copy of the input, the memory-bandwidth ceiling a memory-bound op
  can approach.

Each op is timed forward and forward+backward (gradients of input and parameters through
``torch.autograd.grad``, so no ``.grad`` accumulation is timed). Effective bandwidth counts the
minimum traffic (forward: read the inputs, write the outputs; backward: read ``grad_out`` and the
input, write ``grad_input``) over the measured time, and is shown as a fraction of the copy ceiling.

Run ``python -m normlab.bench --quick`` (or ``normlab bench``); ``--json PATH`` writes every number.
Benchmarks are never tests: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import normlab
from normlab import kernels

__all__ = ["add_arguments", "main", "run"]

_PROVIDERS = ("normlab", "reference", "torch", "compile", "liger")
# Cases on (rows, features) inputs, normalized over the last dim; the others are images.
_ROW_KINDS = ("layer_norm", "rms_norm", "add_layer_norm", "add_layer_norm_gelu", "add_rms_norm")


@dataclass
class Case:
    """One benchmark: an op on one input shape and memory layout."""

    name: str
    shape: tuple[int, ...]
    channels_last: bool
    # provider -> factory building (module, inputs) on a device/dtype; absent: not available.
    build: Callable[[str, torch.device, torch.dtype], Any]
    reads: int = 1  # full-size tensors read by the forward (2 for residual-add)
    writes: int = 1  # full-size tensors written by the forward (2 for residual-add)
    tags: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------
# Modules per provider. Each factory returns a callable taking the input tensor(s) and returning
# the output (or a tuple whose first element is the output that receives the gradient).


def _torch_twin(kind: str, c: int) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(c)
    if kind == "rms_norm":
        return nn.RMSNorm(c)
    if kind in ("batch_norm", "batch_norm_eval"):
        return nn.BatchNorm2d(c)
    if kind == "group_norm":
        return nn.GroupNorm(32, c)
    if kind == "instance_norm":
        return nn.InstanceNorm2d(c, affine=True)
    raise ValueError(kind)


def _normlab_twin(kind: str, c: int) -> nn.Module:
    m = normlab.nn
    if kind == "layer_norm":
        return m.LayerNorm(c)
    if kind == "rms_norm":
        return m.RMSNorm(c)
    if kind in ("batch_norm", "batch_norm_eval"):
        return m.BatchNorm2d(c)
    if kind == "group_norm":
        return m.GroupNorm(32, c)
    if kind == "instance_norm":
        return m.InstanceNorm2d(c, affine=True)
    raise ValueError(kind)


class _EagerAddNorm(nn.Module):
    """The unfused chain ``s = x + residual; y = act(norm(s))`` that fused add+norm replaces."""

    def __init__(self, norm: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        s = x + residual
        y = self.norm(s)
        # No nn.Identity for the plain chain: its call overhead would be timed as torch's.
        return (y if self.act is None else self.act(y)), s


class _EagerNormAct(nn.Module):
    def __init__(self, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(x))


def _fused_module(kind: str, c: int) -> nn.Module | None:
    try:
        from normlab.nn import fused
    except ImportError as e:  # fused modules not available in this build
        print(f"bench: normlab's fused modules are unavailable: {e}", file=sys.stderr)
        return None
    if kind == "add_layer_norm":
        return fused.FusedAddLayerNorm(c)
    if kind == "add_layer_norm_gelu":
        return fused.FusedAddLayerNorm(c, activation="gelu")
    if kind == "add_rms_norm":
        return fused.FusedAddRMSNorm(c)
    if kind == "batch_norm_relu":
        return fused.BatchNormAct2d(c, activation="relu")
    if kind == "group_norm_silu":
        return fused.GroupNormAct(32, c, activation="silu")
    raise ValueError(kind)


def _eager_chain(kind: str, c: int) -> nn.Module:
    if kind == "add_layer_norm":
        return _EagerAddNorm(nn.LayerNorm(c))
    if kind == "add_layer_norm_gelu":
        return _EagerAddNorm(nn.LayerNorm(c), nn.GELU())
    if kind == "add_rms_norm":
        return _EagerAddNorm(nn.RMSNorm(c))
    if kind == "batch_norm_relu":
        return _EagerNormAct(nn.BatchNorm2d(c), nn.ReLU())
    if kind == "group_norm_silu":
        return _EagerNormAct(nn.GroupNorm(32, c), nn.SiLU())
    raise ValueError(kind)


def _liger_module(kind: str, c: int) -> nn.Module | None:
    """Liger-Kernel's module for `kind` (its defaults otherwise), or None where it has none."""
    try:
        from liger_kernel import transformers as liger
    except Exception:  # not installed, or no GPU stack
        return None
    if kind == "layer_norm":
        return liger.LigerLayerNorm(c, eps=1e-5)
    if kind == "rms_norm":
        return liger.LigerRMSNorm(c)
    if kind == "add_rms_norm":
        return liger.LigerFusedAddRMSNorm(c)
    if kind == "group_norm":
        from liger_kernel.transformers.group_norm import LigerGroupNorm  # not re-exported

        return LigerGroupNorm(c, 32, eps=1e-5, bias=True)
    return None


class _Reference(nn.Module):
    """Runs the wrapped normlab module on the reference path (forward and backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Tensor) -> Any:
        with kernels.use_reference():
            return self.inner(*args)


def _builder(kind: str) -> Callable[[str, torch.device, torch.dtype], nn.Module | None]:
    fused = kind.startswith("add_") or kind.endswith(("_relu", "_silu"))

    def build(provider: str, device: torch.device, dtype: torch.dtype, c: int) -> nn.Module | None:
        if provider in ("normlab", "reference"):
            module = _fused_module(kind, c) if fused else _normlab_twin(kind, c)
            if module is not None and provider == "reference":
                module = _Reference(module)
        elif provider in ("torch", "compile"):
            module = _eager_chain(kind, c) if fused else _torch_twin(kind, c)
        elif provider == "liger":
            if device.type != "cuda":
                return None
            module = _liger_module(kind, c)
        else:
            raise ValueError(provider)
        if module is None:
            return None
        module = module.to(device=device, dtype=dtype)
        if kind == "batch_norm_eval":
            module.eval()
        if provider == "compile":
            module = torch.compile(module)
        return module

    return build  # type: ignore[return-value]


def _cases(quick: bool, ops: list[str] | None, gpu: bool = False,
           tiny: bool = False) -> list[Case]:
    rows = [(256, 512)] if quick else [(4096, 1024), (16384, 768)]
    images = [(4, 64, 16, 16)] if quick else [(32, 64, 56, 56)]
    if tiny:
        # So small that a call's time is its host time (Python, dispatch, allocation, launch):
        # what a model of many small norms, or a GPU whose kernels outrun the host, pays.
        rows, images = [(8, 64)], [(2, 32, 4, 4)]
    elif gpu and not quick:
        # The shapes above fit in an H100's 50 MB L2; these stream from HBM, as Liger's own
        # benchmark (4096 x 16384) does.
        rows.append((4096, 16384))
        images.append((128, 256, 56, 56))
    cases: list[Case] = []
    for kind in _ROW_KINDS:
        for shape in rows:
            add = kind.startswith("add_")
            cases.append(Case(kind, shape, False, _builder(kind), 2 if add else 1,
                              2 if add else 1))
    for kind in ("batch_norm", "batch_norm_eval", "group_norm", "instance_norm",
                 "batch_norm_relu", "group_norm_silu"):
        for shape in images:
            for cl in (False, True):
                cases.append(Case(kind, shape, cl, _builder(kind)))
    if ops:
        wanted = set(ops)
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise ValueError(
                f"bench: unknown op(s) {sorted(unknown)}; choose from "
                f"{sorted({c.name for c in cases})}"
            )
        cases = [c for c in cases if c.name in wanted]
    return cases


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 2 if case.reads == 2 else 1
    out = []
    for _ in range(n):
        t = torch.randn(case.shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        if case.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _step_fn(module: nn.Module, inputs: list[Tensor], backward: bool) -> Callable[[], Any]:
    if not backward:
        def fwd() -> Any:
            with torch.no_grad():
                return module(*inputs)
        return fwd
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        grad = torch.randn_like(_first(module(*inputs)))

    def fwd_bwd() -> Any:
        out = _first(module(*leaves))
        return torch.autograd.grad(out, [*leaves, *params], grad)

    return fwd_bwd


def _time_once(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _calibrate(fn: Callable[[], Any], min_time: float, device: torch.device) -> int:
    t = _time_once(fn, 1, device)
    return max(1, min(1000, int(min_time / max(t, 1e-7))))


def _bench_case(case: Case, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> list[dict[str, Any]]:
    c = case.shape[-1] if case.name in _ROW_KINDS else case.shape[1]
    providers = [p for p in _PROVIDERS if p != "compile" or args.compile]
    if args.compile:
        # Every torch.nn twin shares its class's forward code object: without a reset, dynamo's
        # per-code-object recompile limit would silently fall back to eager after a few cases.
        torch._dynamo.reset()
    modules: dict[str, nn.Module] = {}
    for p in providers:
        try:
            m = case.build(p, device, dtype, c)
        except Exception as e:  # a provider that cannot build this case is left out
            print(f"bench: {p} unavailable for {case.name}: {e}", file=sys.stderr)
            m = None
        if m is not None:
            modules[p] = m
    inputs = _make_inputs(case, device, dtype, args.seed)
    numel = inputs[0].numel()
    esize = inputs[0].element_size()
    records = []
    for backward in (False, True):
        if backward and args.forward_only:
            continue
        fns: dict[str, Callable[[], Any]] = {}
        for p, m in modules.items():
            try:
                fn = _step_fn(m, inputs, backward)
                for _ in range(3 if p == "compile" else 1):
                    fn()  # warm-up: builds extensions, compiles graphs, faults in pages
                fns[p] = fn
            except Exception as e:
                print(f"bench: {p} failed on {case.name}: {e}", file=sys.stderr)
        x0 = inputs[0]
        fns["copy"] = lambda x0=x0: x0.clone(memory_format=torch.preserve_format)
        iters = {p: _calibrate(fn, args.min_time, device) for p, fn in fns.items()}
        samples: dict[str, list[float]] = {p: [] for p in fns}
        for _ in range(args.repeats):  # interleaved rounds: noise hits every provider alike
            for p, fn in fns.items():
                samples[p].append(_time_once(fn, iters[p], device))
        times = {p: statistics.median(s) for p, s in samples.items()}
        traffic = (case.reads + case.writes) * numel * esize
        if backward:
            traffic += 3 * numel * esize
        copy_gbps = 2 * numel * esize / times["copy"] / 1e9
        rec: dict[str, Any] = {
            "case": case.name,
            "shape": list(case.shape),
            "layout": "channels_last" if case.channels_last else "contiguous",
            "dtype": str(dtype).removeprefix("torch."),
            "pass": "fwd+bwd" if backward else "fwd",
            "times_ms": {p: t * 1e3 for p, t in times.items()},
            "samples_ms": {p: [t * 1e3 for t in s] for p, s in samples.items()},
            "min_traffic_bytes": traffic,
            "gbps": {p: traffic / t / 1e9 for p, t in times.items() if p != "copy"},
            "copy_gbps": copy_gbps,
        }
        if "normlab" in times:
            rec["speedup"] = {
                f"vs_{p}": times[p] / times["normlab"]
                for p in times if p not in ("normlab", "copy")
            }
            rec["fraction_of_copy"] = rec["gbps"]["normlab"] / copy_gbps
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_shape(rec: dict[str, Any]) -> str:
    s = "x".join(str(d) for d in rec["shape"])
    return s + (" CL" if rec["layout"] == "channels_last" else "")


def _print_table(records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    present = [p for p in (*_PROVIDERS, "copy") if any(p in r["times_ms"] for r in records)]
    ratio_cols = [p for p in present if p not in ("normlab", "copy")]
    header = ["op", "shape", "pass", *(f"{p} ms" for p in present),
              *(f"×{p}" for p in ratio_cols), "GB/s", "%copy"]
    rows = []
    for r in records:
        t = r["times_ms"]
        sp = r.get("speedup", {})
        rows.append([
            r["case"], _fmt_shape(r), r["pass"],
            *(f"{t[p]:.3f}" if p in t else "-" for p in present),
            *(f"{sp[f'vs_{p}']:.2f}" if f"vs_{p}" in sp else "-" for p in ratio_cols),
            f"{r['gbps'].get('normlab', float('nan')):.1f}",
            f"{100 * r.get('fraction_of_copy', float('nan')):.0f}%",
        ])
    title = (f"normlab bench: {meta['device']} {meta['dtype']}, {meta['threads']} threads, "
             f"median of {meta['repeats']} interleaved rounds; ×p = time(p) / time(normlab)")
    if meta.get("keep_freed_memory"):
        title += "; freed memory kept (no fresh pages)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, 12 * len(header))).print(table)


# ---------------------------------------------------------------------------------------------
# CLI


def _count(text: str) -> int:
    """A positive integer option (repeats, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (0: one call per timed sample)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _json_path(text: str) -> str:
    """A file the results can be written to, checked before anything runs."""
    path = os.path.abspath(text)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} is not writable")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``normlab bench``'s options to `parser`."""
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few rounds (a smoke run, seconds)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help="only these ops (e.g. layer_norm rms_norm batch_norm)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=_count, default=None,
                        help="interleaved rounds per provider (default 7, quick 3)")
    parser.add_argument("--min-time", type=_seconds, default=None,
                        help="seconds per timed sample (default 0.05, quick 0.002)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the torch.nn twin (slow to compile)")
    parser.add_argument("--tiny", action="store_true",
                        help="host-bound shapes instead (8x64 rows, 2x32x4x4 images): times the "
                             "per-call overhead of Python, dispatch and allocation")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--threads", type=_count, default=None,
                        help="torch.set_num_threads before timing (default: torch's)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc only: freed memory stays in the process (no mmap per large "
                             "tensor, no heap trimming), so no timed call pays for fresh pages; "
                             "the same for every provider, as under a caching allocator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, type=_json_path, metavar="PATH",
                        help="write all results here")


def _keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and never give memory back.

    A tensor of tens of MB is otherwise mmapped fresh (or the heap trimmed after it is freed), and
    the next call pays a page fault and a kernel zero-fill per 4 KB page, for torch and normlab
    alike: on a 2-core VM that cost rivals the normalization itself and makes forward+backward
    timings bimodal. Returns False where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (from :func:`add_arguments`); returns an exit code."""
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.min_time is None:
        args.min_time = 0.002 if args.quick else 0.05
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "keep_freed_memory", False) and not _keep_freed_memory():
        print("bench: --keep-freed-memory needs glibc's mallopt", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    try:
        cases = _cases(args.quick, args.ops, gpu=device.type == "cuda",
                       tiny=getattr(args, "tiny", False))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    meta = {
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "torch": torch.__version__,
        "normlab": normlab.__version__,
        "python": platform.python_version(),
        "quick": bool(args.quick),
        "tiny": bool(getattr(args, "tiny", False)),
        "keep_freed_memory": bool(getattr(args, "keep_freed_memory", False)),
    }
    records: list[dict[str, Any]] = []
    for case in cases:
        records.extend(_bench_case(case, args, device, dtype))
    _print_table(records, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
