"""C++ CPU kernels for every normalization op, registered behind :mod:`normlab.kernels`.

Each op's :class:`~normlab.functional._normalize.Layout` and the input's strides are mapped onto
one of two canonical problems solved by ``csrc/normlab_cpu.cpp``:

* rows: ``x`` is ``[R][K][S]`` contiguous with statistics per row (layer/RMS norm, group and
  instance norm on NCHW) or per channel across rows (batch norm on NCHW);
* columns: ``x`` is ``[O][P][C]`` contiguous with channels innermost (channels_last batch,
  instance and group norm, and ``(N, C)`` batch norm), statistics per ``(o, group)``.

Inputs with other strides are made contiguous first. Forward returns the reference's
``(out, mean, var, invstd)`` with the same shapes and dtypes, so the kernel and the reference are
interchangeable between forward and backward; the backward saves nothing beyond them. When the
library cannot be built, every call runs the reference (after one warning).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from normlab import kernels
from normlab.kernels import _build
from normlab.kernels.problems import ChannelRows, Columns, FixedRows, Rows, plan

__all__ = ["ACTIVATIONS", "DTYPE_CODES", "register_all", "running_stats"]

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
ACTIVATIONS = kernels.ACTIVATION_CODES


def _applies(x: Tensor) -> bool:
    # Whether this input's variant builds is known per call (library() returns None, and the
    # kernel declines): one variant that fails leaves the others working.
    return x.is_cpu and x.dtype in DTYPE_CODES and x.layout == torch.strided


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"normlab CPU kernel {name} rejected its arguments (code {rc})")


_FILLED_CACHED_MAX = 1 << 16  # elements: at most 64 stand-ins of 256 KB (float32) stay alive


@functools.lru_cache(maxsize=64)
def _filled_cached(n: int, cdtype: torch.dtype, fill: float, device: str) -> Tensor:
    return torch.full((n,), fill, dtype=cdtype, device=device)


def _filled(n: int, cdtype: torch.dtype, fill: float, device: str) -> Tensor:
    # Read-only stand-ins for a missing weight (ones) or bias (zeros), cached where small:
    # rebuilding them costs more than a small kernel call, and caching large ones by count would
    # hold hundreds of MB after the tensors they served are gone.
    if n > _FILLED_CACHED_MAX:
        return torch.full((n,), fill, dtype=cdtype, device=device)
    return _filled_cached(n, cdtype, fill, device)


def _param(p: Tensor | None, n: int, cdtype: torch.dtype, fill: float,
           device: torch.device | None = None) -> Tensor:
    """A flat, contiguous `cdtype` view of a parameter; kernels only read its data pointer."""
    if p is None:  # the device's name only here: str(device) costs a microsecond per call
        return _filled(n, cdtype, fill, "cpu" if device is None else str(device))
    if p.dtype == cdtype and p.is_contiguous():
        return p  # the common case, without four tensor calls of overhead
    return p.detach().to(cdtype).reshape(-1).contiguous()


def _flat(t: Tensor) -> Tensor:
    """`t` with its elements contiguous: kernels read statistics through the data pointer as a
    flat vector, whatever the view's shape, so a contiguous tensor needs no reshape op."""
    return t if t.is_contiguous() else t.contiguous()


def new_stats(shape: tuple[int, ...], cdtype: torch.dtype,
              device: torch.device | None = None) -> tuple[Tensor, ...]:
    """Empty (mean, var, invstd) outputs of `shape`. Shared by the CPU and Triton kernels.

    Three allocations, not views of one: outputs of an op may not alias each other (and on the
    CPU, a layer norm 8x64 forward took 37 us with one allocation and its unbind, 31 us so)."""
    return (torch.empty(*shape, dtype=cdtype, device=device),
            torch.empty(*shape, dtype=cdtype, device=device),
            torch.empty(*shape, dtype=cdtype, device=device))


def fixed_stats(stats: tuple[Tensor, Tensor],
                cdtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, var, invstd) for fixed statistics: mean and var as given when they already are
    contiguous `cdtype` tensors (kernels only read them; the autograd functions pass copies), and
    an empty invstd that the kernel fills with 1 / sqrt(var + eps). Each small torch op costs
    tens of microseconds on the cold caches a large sweep leaves behind, so this makes none in
    the common case. Shared by the CPU and Triton kernels."""
    mean, var = (s if s.dtype == cdtype and s.is_contiguous() else s.to(cdtype).contiguous()
                 for s in stats)
    return mean, var, torch.empty_like(var)


# ------------------------------------------------------------------------------------------------
# Launchers. All take contiguous-in-the-right-order inputs and flat float parameter vectors.


def _row_forward(lib: Any, x: Tensor, w: Tensor, b: Tensor, R: int, K: int, S: int, Gp: int,
                 eps: float, center: bool, stats_shape: tuple[int, ...], act: int = 0,
                 residual: Tensor | None = None) -> tuple[Tensor, ...]:
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    mean, var, invstd = new_stats(stats_shape, w.dtype)
    _check(lib.nl_row_forward(DTYPE_CODES[x.dtype], act, x.data_ptr(), _ptr(residual), _ptr(s),
                              y.data_ptr(), R, K, S, Gp, w.data_ptr(), b.data_ptr(), float(eps),
                              int(center), mean.data_ptr(), var.data_ptr(), invstd.data_ptr()),
           "row_forward")
    return y, mean, var, invstd, s  # type: ignore[return-value]


_ONE_CHUNK = 16384  # elements up to which a layer/RMS-norm backward runs as one chunk


def _row_backward(lib: Any, dy: Tensor, x: Tensor, w: Tensor, b: Tensor, mean: Tensor,
                  invstd: Tensor, R: int, K: int, S: int, Gp: int, smod: int, center: bool,
                  batch_stats: bool, need_dx: bool, act: int = 0,
                  dextra: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """Returns (dx, grad_weight, grad_bias) with the parameter grads summed to (Gp*K,)."""
    cd = w.dtype
    dx = torch.empty_like(x) if need_dx else None
    per_elem = S == 1 and Gp == 1  # layer/RMS norm: partials per chunk of rows
    mean, invstd = _flat(mean), _flat(invstd)  # held: a temporary's pointer would dangle

    def call(gw_ptr: int, gb_ptr: int, nchunk: int) -> None:
        _check(lib.nl_row_backward(DTYPE_CODES[x.dtype], act, dy.data_ptr(), x.data_ptr(),
                                   _ptr(dextra), _ptr(dx), R, K, S, Gp, smod, w.data_ptr(),
                                   b.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
                                   int(center), int(batch_stats), gw_ptr, gb_ptr, nchunk),
               "row_backward")

    if per_elem and R * K > _ONE_CHUNK:
        # Weight and bias partials per chunk of rows, in one buffer ([nchunk][K] each), summed by
        # one (parallel) torch op.
        nchunk = min(R, 64)
        parts = torch.empty(2, nchunk, K, dtype=cd)
        call(parts.data_ptr(), parts.data_ptr() + parts.numel() // 2 * parts.element_size(),
             nchunk)
        # Two sums, not one and an unbind: outputs of an op may not be views of one tensor.
        return dx, parts[0].sum(0), parts[1].sum(0)
    # The sums directly: a small layer/RMS norm runs as one chunk (its partials are the sums);
    # the other row problems sum their per-row partials in the kernel.
    n = K if per_elem else Gp * K
    gw, gb = torch.empty(n, dtype=cd), torch.empty(n, dtype=cd)
    call(gw.data_ptr(), gb.data_ptr(), 1 if per_elem else 0)
    return dx, gw, gb


def _col_forward(lib: Any, x: Tensor, w: Tensor, b: Tensor, outer: int, P: int, C: int, G: int,
                 eps: float, stats_shape: tuple[int, ...],
                 given: tuple[Tensor, Tensor, Tensor] | None = None,
                 act: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = torch.empty_like(x)
    if given is None:
        mean, var, invstd = new_stats(stats_shape, w.dtype)
    else:
        mean, var, invstd = given
    _check(lib.nl_col_forward(DTYPE_CODES[x.dtype], act, x.data_ptr(), y.data_ptr(), outer, P, C, G,
                              w.data_ptr(), b.data_ptr(), float(eps), int(given is not None),
                              mean.data_ptr(), var.data_ptr(), invstd.data_ptr()), "col_forward")
    return y, mean, var, invstd


def _opc_strides(t: Tensor, nchan: int, outer: int, P: int,
                 C: int) -> tuple[int, int, int] | None:
    """Element strides of `t` (N, *channel dims, *spatial) seen as [outer][P][C], if a view.

    The kernel then gathers tiles of `t` itself, which is cheaper than a full-tensor copy (e.g.
    group norm's grad_out arrives NCHW-contiguous for a channels_last input).
    """
    return _opc_strides_of(tuple(t.shape), t.stride(), nchan, outer, P, C)


@functools.lru_cache(maxsize=1024)
def _opc_strides_of(shape: tuple[int, ...], stride: tuple[int, ...], nchan: int, outer: int,
                    P: int, C: int) -> tuple[int, int, int] | None:
    # From shape and strides alone, on a storage-less meta tensor (cached: a movedim and a view
    # per call cost microseconds).
    t = torch.empty_strided(shape, stride, device="meta")
    v = t.movedim(tuple(range(1, 1 + nchan)), tuple(range(t.dim() - nchan, t.dim())))
    try:
        v = v.view(outer, P, C)
    except RuntimeError:  # not expressible as a view
        return None
    return v.stride(0), v.stride(1), v.stride(2)


def _col_backward(lib: Any, dy: Tensor, x: Tensor, w: Tensor, b: Tensor, mean: Tensor,
                  invstd: Tensor, outer: int, P: int, C: int, G: int, batch_stats: bool,
                  need_dx: bool, act: int = 0, nchan: int = 1) -> tuple[Tensor | None, Tensor,
                                                                          Tensor]:
    dx = torch.empty_like(x) if need_dx else None
    gw, gb = torch.empty(C, dtype=w.dtype), torch.empty(C, dtype=w.dtype)
    mean, invstd = _flat(mean), _flat(invstd)
    strides = _opc_strides(dy, nchan, outer, P, C)
    if strides is None:  # no uniform (o, p, c) strides: copy into x's layout
        dy = kernels.like(x, dy)
        strides = (P * C, C, 1)
    _check(lib.nl_col_backward(DTYPE_CODES[x.dtype], act, dy.data_ptr(), *strides, x.data_ptr(),
                               _ptr(dx), outer, P, C, G, w.data_ptr(), b.data_ptr(),
                               mean.data_ptr(), invstd.data_ptr(), int(batch_stats),
                               gw.data_ptr(), gb.data_ptr()), "col_backward")
    return dx, gw, gb


def _forward(op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: Any,
             eps: float, stats: tuple[Tensor, Tensor] | None, act: int = 0,
             residual: Tensor | None = None) -> tuple[Tensor, ...] | None:
    """Kernel forward, or None when the reference must run (unsupported plan, no library)."""
    problem = plan(op, x, layout, stats is not None)
    if problem is None or (residual is not None and not isinstance(problem, Rows)):
        return None
    lib = _build.library(DTYPE_CODES[x.dtype], act != 0)
    if lib is None:
        return None
    xk = problem.input(x)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _param(weight, problem.nparam, cd, 1.0)
    b = _param(bias, problem.nparam, cd, 0.0)
    given = None if stats is None else fixed_stats(stats, cd)
    p = problem
    if isinstance(p, Rows):
        res = None if residual is None else residual.contiguous()
        y, mean, var, invstd, s = _row_forward(lib, xk, w, b, p.R, p.K, p.S, p.Gp, eps,
                                               layout.center, p.stats_shape, act, res)
        return (y, mean, var, invstd, s) if residual is not None else (y, mean, var, invstd)
    if isinstance(p, Columns):
        return _col_forward(lib, xk, w, b, p.O, p.P, p.C, p.G, eps, p.stats_shape, given, act)
    if isinstance(p, FixedRows):
        assert given is not None
        y = torch.empty_like(xk)
        mean, var, invstd = given
        _check(lib.nl_row_normalize(DTYPE_CODES[x.dtype], act, xk.data_ptr(), y.data_ptr(),
                                    p.R, p.K, p.S, p.Gp, p.smod, w.data_ptr(), b.data_ptr(),
                                    mean.data_ptr(), var.data_ptr(), float(eps),
                                    invstd.data_ptr()),
               "row_normalize")
        return y, mean, var, invstd
    assert isinstance(p, ChannelRows)
    y = torch.empty_like(xk)
    mean, var, invstd = new_stats(p.stats_shape, cd)
    _check(lib.nl_bn_rows_forward(DTYPE_CODES[x.dtype], act, xk.data_ptr(), y.data_ptr(),
                                  p.N, p.C, p.S, w.data_ptr(), b.data_ptr(), float(eps),
                                  mean.data_ptr(), var.data_ptr(), invstd.data_ptr()),
           "bn_rows_forward")
    return y, mean, var, invstd


def _backward(op: str, grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
              mean: Tensor, invstd: Tensor, layout: Any, batch_stats: bool,
              needs: tuple[bool, bool, bool], act: int = 0,
              dextra: Tensor | None = None) -> tuple[Tensor | None, ...] | None:
    p = plan(op, x, layout, not batch_stats)
    if p is None:
        return None
    lib = _build.library(DTYPE_CODES[x.dtype], act != 0)
    if lib is None:
        return None
    xk = p.input(x)
    cd = mean.dtype
    w = _param(weight, p.nparam, cd, 1.0)
    b = _param(bias, p.nparam, cd, 0.0)
    dy = grad_out if isinstance(p, Columns) else kernels.like(xk, grad_out)
    if isinstance(p, Rows):
        de = None if dextra is None else kernels.like(xk, dextra)
        dx, gw, gb = _row_backward(lib, dy, xk, w, b, mean, invstd, p.R, p.K, p.S, p.Gp, 0,
                                   layout.center, batch_stats, needs[0], act, de)
    elif isinstance(p, FixedRows):
        dx, gw, gb = _row_backward(lib, dy, xk, w, b, mean, invstd, p.R, p.K, p.S, p.Gp, p.smod,
                                   True, False, needs[0], act)
    elif isinstance(p, Columns):
        dx, gw, gb = _col_backward(lib, dy, xk, w, b, mean, invstd, p.O, p.P, p.C, p.G,
                                   batch_stats, needs[0], act, p.nchan)
    else:  # ChannelRows
        dx = torch.empty_like(xk) if needs[0] else None
        gw, gb = torch.empty(p.C, dtype=cd), torch.empty(p.C, dtype=cd)
        mean, invstd = _flat(mean), _flat(invstd)  # held: a temporary's pointer would dangle
        _check(lib.nl_bn_rows_backward(DTYPE_CODES[x.dtype], act, dy.data_ptr(),
                                       xk.data_ptr(), _ptr(dx), p.N, p.C, p.S,
                                       w.data_ptr(), b.data_ptr(), mean.data_ptr(),
                                       invstd.data_ptr(), gw.data_ptr(), gb.data_ptr()),
               "bn_rows_backward")
    grad_weight = kernels.as_param_grad(gw, weight.shape, weight.dtype) \
        if needs[1] and weight is not None else None
    grad_bias = gb if needs[2] else None
    return dx, grad_weight, grad_bias


def running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                  count: int, momentum: float, check: bool) -> bool | None:
    """The ``"running_stats"`` kernel: one C++ call (see ``running_stats`` in the source) where
    buffers and statistics are contiguous and all float32 or all float64; else None (the
    reference runs)."""
    dtype = mean.dtype
    code = DTYPE_CODES.get(dtype)
    lib = _build.library(code) if code in (0, 1) else None
    if lib is None or not (running_mean.dtype == running_var.dtype == var.dtype == dtype
                           and running_mean.is_cpu and running_var.is_cpu and var.is_cpu
                           and mean.is_contiguous() and var.is_contiguous()
                           and running_mean.is_contiguous() and running_var.is_contiguous()):
        return None
    rc = lib.nl_running_stats(code, mean.data_ptr(), var.data_ptr(), running_mean.data_ptr(),
                              running_var.data_ptr(), running_mean.numel(),
                              count / max(count - 1, 1), float(momentum), int(check))
    if rc == 3:
        return False
    _check(rc, "running_stats")
    return True


def register_all() -> None:
    """Register the CPU kernels for the norm ops, the fused ones and the running-statistics
    update (nothing is compiled here)."""
    kernels.register_backend("cpu", _applies, _forward, _backward)
    kernels.register("running_stats", kernels.Kernel(forward=running_stats, name="cpu:running_stats",
                                                     applies=_applies))
