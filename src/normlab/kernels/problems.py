"""What a normalization asks of a kernel, as typed descriptions.

A :class:`Layout` says how one norm's statistics and parameters line up with its input; the
functional layer builds one per call (interned per geometry). :func:`plan` maps an op's layout and
its input's shape and strides onto one of four canonical problems the kernels solve:

* :class:`Rows`: ``x`` is ``[R][K][S]`` contiguous, statistics per row (layer/RMS norm, group
  and instance norm on NCHW);
* :class:`FixedRows`: the same with given per-channel statistics (eval batch norm, instance norm
  with running statistics, on NCHW);
* :class:`ChannelRows`: ``x`` is ``[N][C][S]`` contiguous, statistics per channel across rows
  (training batch norm on NCHW);
* :class:`Columns`: ``x`` is ``[O][P][C]`` with channels innermost (channels_last batch, instance
  and group norm, and ``(N, C)`` batch norm), statistics per ``(o, group)``.

Plans are cached per geometry: one serves an op's forward and backward and every later call on
that shape. Inputs with other strides are made contiguous (:meth:`Rows.input`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Union

from torch import Tensor

__all__ = ["ChannelRows", "Columns", "FixedRows", "Layout", "Problem", "Rows", "grouped_layout",
           "plan", "trailing_layout"]


@dataclass(frozen=True)
class Layout:
    """How one norm's statistics and parameters line up with its input.

    Attributes:
        reduce_dims: dimensions of the (possibly viewed) input the statistics average over.
        param_shape: shape weight/bias are viewed as so they broadcast against the input.
        center: subtract the mean (False for RMS norm, which normalizes by the root mean square).
    """

    reduce_dims: tuple[int, ...]
    param_shape: tuple[int, ...]
    center: bool = True


# Layouts are interned per geometry (cached factories): building one per call costs more than the
# lookup, and the plan cache keys on them.


@functools.lru_cache(maxsize=256)
def trailing_layout(ndim: int, shape: tuple[int, ...], center: bool = True) -> Layout:
    """Statistics over the trailing ``len(shape)`` dims of an `ndim`-dim input, parameters of
    `shape` (layer and RMS norm)."""
    return Layout(reduce_dims=tuple(range(ndim - len(shape), ndim)), param_shape=shape,
                  center=center)


@functools.lru_cache(maxsize=256)
def grouped_layout(ndim: int, groups: int, per_group: int) -> Layout:
    """Statistics per (sample, group) of an input viewed as (N, G, C/G, *spatial) with `ndim`
    dims; per-channel parameters (group norm)."""
    spatial = tuple(range(3, ndim))
    return Layout(reduce_dims=(2, *spatial),
                  param_shape=(1, groups, per_group, *(1,) * len(spatial)))


class _ReadsContiguous:
    """A row problem: its kernels read the input contiguous."""

    def input(self, x: Tensor) -> Tensor:
        """`x` as the row kernels read it: contiguous (a copy only where it is not)."""
        return x.contiguous()


@dataclass(frozen=True)
class Rows(_ReadsContiguous):
    """``[R][K][S]``: R rows of K channels by S positions, statistics per row; parameter index
    ``(row % Gp) * K + k`` (Gp groups of K channels per sample)."""

    R: int
    K: int
    S: int
    Gp: int
    nparam: int
    stats_shape: tuple[int, ...]


@dataclass(frozen=True)
class FixedRows(_ReadsContiguous):
    """:class:`Rows` normalized with given statistics, one per ``row % smod``."""

    R: int
    K: int
    S: int
    Gp: int
    smod: int
    nparam: int
    stats_shape: tuple[int, ...]


@dataclass(frozen=True)
class ChannelRows(_ReadsContiguous):
    """``[N][C][S]``: statistics per channel over N samples and S positions (NCHW batch norm)."""

    N: int
    C: int
    S: int
    nparam: int
    stats_shape: tuple[int, ...]

    # As rows: N*C rows of one channel, C parameter groups.
    @property
    def R(self) -> int:
        return self.N * self.C

    K = 1

    @property
    def Gp(self) -> int:
        return self.C


@dataclass(frozen=True)
class Columns:
    """``[O][P][C]``: channels innermost, statistics per ``(o, group)`` of C/G channels; `nchan`
    dims after the batch dim hold the channels (2 for the grouped (N, G, C/G, *) view)."""

    O: int  # noqa: E741 (the problem's own name for its outer dim)
    P: int
    C: int
    G: int
    nchan: int
    nparam: int
    stats_shape: tuple[int, ...]

    def input(self, x: Tensor) -> Tensor:
        """`x` as it is: the column kernels read channels_last strides directly."""
        return x


Problem = Union[Rows, FixedRows, ChannelRows, Columns]  # noqa: UP007 (a runtime alias)

_PLANS: dict[tuple[Any, ...], Problem | None] = {}
_MAX_PLANS = 4096  # many distinct shapes (e.g. variable sequence lengths): start over


def plan(op: str, x: Tensor, layout: Layout, fixed: bool) -> Problem | None:
    """The canonical problem for `op` on `x` (with fixed statistics or not), or None when no
    kernel problem fits (the reference runs)."""
    key = (op, x.shape, x.stride(), layout, fixed)
    try:
        return _PLANS[key]
    except KeyError:
        pass
    problem = _make_plan(op, x, layout, fixed)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = problem
    return problem


def channels_last(x: Tensor, nchan: int = 1) -> bool:
    """True if the `nchan` dims after the batch dim are innermost and the tensor is dense."""
    # From the strides (a movedim + is_contiguous costs ~20 us of host time per call): dense in
    # the order (batch, spatial..., channel dims...), size-1 dims ignored as torch does.
    nd = x.dim()
    order = (0, *range(1 + nchan, nd), *range(1, 1 + nchan))
    expected = 1
    for d in reversed(order):
        size = x.shape[d]
        if size != 1 and x.stride(d) != expected:
            return False
        expected *= size
    return True


def _make_plan(op: str, x: Tensor, layout: Layout, fixed: bool) -> Problem | None:
    nd = x.dim()
    if x.numel() == 0:
        return None
    if op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        k = len(layout.param_shape)
        if fixed or layout.reduce_dims != tuple(range(nd - k, nd)):
            return None
        M = math.prod(layout.param_shape)
        return Rows(R=x.numel() // M, K=M, S=1, Gp=1, nparam=M,
                    stats_shape=(*x.shape[: nd - k], *(1,) * k))
    if op in ("group_norm", "group_norm_act"):
        if fixed or nd < 3 or layout.reduce_dims != tuple(range(2, nd)):
            return None
        N, G, K = x.shape[:3]
        S = math.prod(x.shape[3:])
        shape = (N, G, *(1,) * (nd - 2))
        if not x.is_contiguous() and channels_last(x, 2):
            return Columns(O=N, P=S, C=G * K, G=G, nchan=2, nparam=G * K, stats_shape=shape)
        return Rows(R=N * G, K=K, S=S, Gp=G, nparam=G * K, stats_shape=shape)
    if op in ("batch_norm", "batch_norm_act", "instance_norm"):
        if nd < 2:
            return None
        N, C = x.shape[:2]
        S = math.prod(x.shape[2:])
        per_sample = op == "instance_norm" and not fixed
        want = tuple(range(2, nd)) if op == "instance_norm" else (0, *range(2, nd))
        if layout.reduce_dims != want or (op == "instance_norm" and nd < 3):
            return None
        shape = (N, C, *(1,) * (nd - 2)) if per_sample else (1, C, *(1,) * (nd - 2))
        if channels_last(x):
            if per_sample:
                return Columns(O=N, P=S, C=C, G=C, nchan=1, nparam=C, stats_shape=shape)
            return Columns(O=1, P=N * S, C=C, G=C, nchan=1, nparam=C, stats_shape=shape)
        if per_sample:
            return Rows(R=N * C, K=1, S=S, Gp=C, nparam=C, stats_shape=shape)
        if fixed:
            return FixedRows(R=N * C, K=1, S=S, Gp=C, smod=C, nparam=C, stats_shape=shape)
        return ChannelRows(N=N, C=C, S=S, nparam=C, stats_shape=shape)
    return None
