r"""normlab's operators: every normalization is an op in PyTorch's dispatcher, ``torch.ops.normlab``.

The schemas below are the one contract between the Python layer and the kernels:

* ``normalize``: the primitive (statistics over ``reduce_dims``, parameters viewed as
  ``param_shape``, optional mean subtraction, fixed statistics and a fused activation), returning
  ``(out, mean, var, invstd)``;
* ``add_normalize``: the residual add fused in, returning ``(out, sum, mean, var, invstd)``;
* ``normalize_backward`` / ``add_normalize_backward``: the hand-derived backwards;
* ``update_running_stats_``: a training batch folded into the running buffers in place, returning
  whether it went in (a 0-dim bool tensor).

Each op has a kernel for real tensors (:func:`normlab.kernels.select` picks the C++ or Triton
kernel, or the plain-torch reference of :mod:`normlab.functional._normalize`), a fake kernel that
computes shapes, strides and dtypes only (meta tensors, ``FakeTensorMode``, ``torch.compile``,
``torch.export``), and autograd registered on the op. Only real tensors ever reach a kernel: a
fake, meta or wrapper-subclass tensor is answered by the fake kernel or unwrapped by its own
``__torch_dispatch__`` first.

Double backward is exact: when a graph is being built through the backward
(``create_graph=True``), the gradient is computed by the reference math from the inputs, with
the statistics recomputed from them, so second derivatives see every path through the mean and
the variance. Under ``torch.func`` transforms (vmap, grad, jacrev, jvp) and forward-mode AD the
public functions run the reference math directly (plain aten ops, which every transform knows).

Eager calls on plain tensors (no tracer, no dispatch mode, no subclass, no meta tensor) run the
same kernel functions and autograd formula without the dispatcher round trip, which from Python
costs more than a small normalization (``benchmarks/cpu_notes.md``, session 7); everything else
takes the op.

Output conventions (what the fake kernels promise): ``out`` and ``grad_input`` have the strides
``torch.empty_like(x)`` gives; statistics are contiguous in the compute dtype with the input's
shape and size 1 along ``reduce_dims`` (with fixed statistics: ``param_shape``, and ``var`` is
empty, since it would only copy the buffer); a gradient that was not asked for is an empty tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from normlab import kernels
from normlab.functional import _normalize as ref
from normlab.functional.moments import compute_dtype

__all__ = ["add_normalize", "commit_flag", "kernel_backward", "kernel_forward", "normalize"]

_NORM_ARGS = "int[] reduce_dims, int[] param_shape, bool center"


@functools.lru_cache(maxsize=512)
def _layout(reduce_dims: tuple[int, ...], param_shape: tuple[int, ...],
            center: bool) -> ref.Layout:
    return ref.Layout(reduce_dims, param_shape, center)


def _layout_of(reduce_dims: Sequence[int], param_shape: Sequence[int], center: bool) -> ref.Layout:
    return _layout(tuple(reduce_dims), tuple(param_shape), center)


def _run(kind: str, reference: kernels.Kernel, method: str, *args: Any,
         select_on: Tensor | None = None) -> Any:
    """`method` of the kernel :func:`normlab.kernels.select` picks for `kind` on `select_on`
    (default: the first argument), or of `reference` where that kernel declines (returns None):
    the one place the fallback happens."""
    kernel = kernels.select(kind, args[0] if select_on is None else select_on, reference)
    out = getattr(kernel, method)(*args)
    if out is None and kernel is not reference:
        out = getattr(reference, method)(*args)
    return out


def _dense(t: Tensor | None) -> Tensor | None:
    """`t` contiguous with its negative bit resolved (what a kernel reading its memory needs)."""
    if t is None:
        return None
    return (t.resolve_neg() if t.is_neg() else t).contiguous()


def _plain_kind(kind: str, activation: str | None) -> str:
    """A norm + activation kind without an activation is the plain norm (its kernels take no
    activation argument)."""
    return kind[:-4] if activation is None and kind.endswith("_act") else kind


def _stats_shape(x: Tensor, reduce_dims: Sequence[int]) -> list[int]:
    shape = list(x.shape)
    for d in reduce_dims:
        shape[d] = 1
    return shape


def _empty(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The stand-in for an output that is not there (a gradient nobody asked for, the variance of
    fixed statistics): schemas return tensors, never None."""
    return x.new_empty((0,), dtype=dtype)


def _like_input(x: Tensor, out: Tensor) -> Tensor:
    """`out` with the strides ``torch.empty_like(x)`` has (what the fake kernels promise); a copy
    only where a kernel wrote another layout (the row kernels write contiguous rows)."""
    if out.stride() == x.stride():
        return out
    target = torch.empty_like(x, dtype=out.dtype)
    return out if target.stride() == out.stride() else target.copy_(out)


# ------------------------------------------------------------------------------------------------
# normalize


def kernel_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: ref.Layout,
                    eps: float, stats: tuple[Tensor, Tensor] | None, activation: str | None,
                    kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel's (or the reference's) forward outputs as they come: with fixed statistics
    the mean and var may be the buffers themselves, flat."""
    kind = _plain_kind(kind, activation)
    if activation is None:
        return _run(kind, ref.REFERENCE, "forward", x, weight, bias, layout, eps, stats)
    return _run(kind, ref.NORM_ACT_REFERENCE, "forward", x, weight, bias, layout, eps, stats,
                activation)


def kernel_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     mean: Tensor, invstd: Tensor, layout: ref.Layout, batch_stats: bool,
                     needs: tuple[bool, bool, bool], activation: str | None,
                     kind: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The kernel's (or the reference's) ``(grad_input, grad_weight, grad_bias)``, the bias
    gradient as summed (not yet in the bias's shape)."""
    if grad_out.is_neg():  # a negative view's memory holds the other sign
        grad_out = grad_out.resolve_neg()
    grad_out = kernels.like(x, grad_out)
    kind = _plain_kind(kind, activation)
    if activation is None:
        return _run(kind, ref.REFERENCE, "backward", grad_out, x, weight, mean, invstd, layout,
                    batch_stats, needs, select_on=x)
    return _run(kind, ref.NORM_ACT_REFERENCE, "backward", grad_out, x, weight, bias, mean,
                invstd, layout, batch_stats, needs, activation, select_on=x)


def _normalize_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, reduce_dims: list[int],
                    param_shape: list[int], center: bool, eps: float, fixed_mean: Tensor | None,
                    fixed_var: Tensor | None, activation: str | None,
                    kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    layout = _layout_of(reduce_dims, param_shape, center)
    stats = None if fixed_mean is None or fixed_var is None else (fixed_mean, fixed_var)
    out, mean, var, invstd = kernel_forward(x, weight, bias, layout, eps, stats, activation,
                                            kind)
    out = _like_input(x, out)
    if stats is not None:
        # Outputs never alias inputs: the mean is copied out of the running buffer (its
        # backward reads it, and the buffer may move on), the variance is not returned.
        return (out, mean.reshape(layout.param_shape).clone(), _empty(x, mean.dtype),
                invstd.reshape(layout.param_shape))
    return (out, *_stats_out(mean, var, invstd))


def _stats_out(mean: Tensor, var: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batch statistics as the ops return them: contiguous, and never views of one buffer."""
    mean, var, invstd = mean.contiguous(), var.contiguous(), invstd.contiguous()
    return mean, _distinct(mean, var), _distinct(mean, invstd)


_normalize = torch.library.custom_op(
    "normlab::normalize", mutates_args=(),
    schema=f"(Tensor x, Tensor? weight, Tensor? bias, {_NORM_ARGS}, float eps, "
           "Tensor? fixed_mean, Tensor? fixed_var, str? activation, str kind) "
           "-> (Tensor, Tensor, Tensor, Tensor)",
)(_normalize_impl)


@_normalize.register_fake
def _normalize_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                    reduce_dims: list[int], param_shape: list[int], center: bool, eps: float,
                    fixed_mean: Tensor | None, fixed_var: Tensor | None, activation: str | None,
                    kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cdtype = compute_dtype(x.dtype)
    out = torch.empty_like(x)
    if fixed_mean is not None:
        stat = x.new_empty(param_shape, dtype=cdtype)
        return out, stat, _empty(x, cdtype), torch.empty_like(stat)
    shape = _stats_shape(x, reduce_dims)
    return (out, x.new_empty(shape, dtype=cdtype), x.new_empty(shape, dtype=cdtype),
            x.new_empty(shape, dtype=cdtype))


def _normalize_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, reduce_dims, param_shape, center, eps, fixed_mean, _fv, activation, kind = \
        inputs
    _out, mean, var, invstd = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.args = (reduce_dims, param_shape, center, eps, activation, kind, fixed_mean is None)
    ctx.mark_non_differentiable(mean, var, invstd)
    # No zero-filled gradients for the statistics (three allocations and fills per backward).
    ctx.set_materialize_grads(False)


def _normalize_backward(ctx: Any, grad_out: Tensor, *_stat_grads: Any) -> tuple[Any, ...]:
    x, weight, bias, mean, invstd = ctx.saved_tensors
    reduce_dims, param_shape, center, eps, activation, kind, batch_stats = ctx.args
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if grad_out is None:
        return (None,) * 11
    grads = _normalize_grads(
        grad_out, x, weight, bias, mean, invstd, _layout_of(reduce_dims, param_shape, center),
        eps, activation, batch_stats, needs,
        lambda: torch.ops.normlab.normalize_backward(
            grad_out, x, weight, bias, mean, invstd, reduce_dims, param_shape, center,
            batch_stats, needs, activation, kind))
    return (*grads, *(None,) * 8)


def _normalize_grads(grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     mean: Tensor, invstd: Tensor, layout: ref.Layout, eps: float,
                     activation: str | None, batch_stats: bool, needs: tuple[bool, bool, bool],
                     backward: Any) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """normalize's ``(grad_input, grad_weight, grad_bias)``, shared by the op's autograd and the
    eager function: with a graph being built through the backward (create_graph=True), the
    reference math differentiated from the inputs; else ``backward()``, the kernels."""
    if torch.is_grad_enabled():
        fixed = None if batch_stats else (mean.reshape(layout.param_shape),
                                          invstd.reshape(layout.param_shape))
        gi, gw, gb = _reference_grads(grad_out, (x, weight, bias), needs, lambda x, w, b: _ref_out(
            x, w, b, layout, eps, fixed, activation))
        return gi, gw, gb
    gi, gw, gb = backward()
    return gi if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None


_normalize.register_autograd(_normalize_backward, setup_context=_normalize_setup)


def _normalize_backward_op_impl(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                           bias: Tensor | None, mean: Tensor, invstd: Tensor,
                           reduce_dims: list[int], param_shape: list[int], center: bool,
                           batch_stats: bool, output_mask: list[bool], activation: str | None,
                           kind: str) -> tuple[Tensor, Tensor, Tensor]:
    layout = _layout_of(reduce_dims, param_shape, center)
    needs = (output_mask[0], output_mask[1], output_mask[2])
    gi, gw, gb = kernel_backward(grad_out, x, weight, bias, mean, invstd, layout, batch_stats,
                                 needs, activation, kind)
    return _grads_out(x, weight, bias, gi, gw, gb, needs)


_normalize_backward_op = torch.library.custom_op(
    "normlab::normalize_backward", mutates_args=(),
    schema=f"(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
           f"Tensor invstd, {_NORM_ARGS}, bool batch_stats, bool[] output_mask, str? activation, "
           "str kind) -> (Tensor, Tensor, Tensor)",
)(_normalize_backward_op_impl)


def _grads_out(x: Tensor, weight: Tensor | None, bias: Tensor | None, gi: Tensor | None,
               gw: Tensor | None, gb: Tensor | None,
               needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel gradients in the schema's form: the input's layout and the parameters' shapes and
    dtypes, empty where not asked for."""
    gi = _like_input(x, gi) if needs[0] and gi is not None else _empty(x)
    gw = (kernels.as_param_grad(gw, weight.shape, weight.dtype)
          if needs[1] and weight is not None and gw is not None else _empty(x))
    gb = (kernels.as_param_grad(gb, bias.shape, bias.dtype)
          if needs[2] and bias is not None and gb is not None else _empty(x))
    return gi, gw, _distinct(gw, gb)


def _distinct(a: Tensor, b: Tensor) -> Tensor:
    """`b`, copied if it is a view of the same buffer as `a` (kernels sum two parameter gradients
    in one launch; the outputs of an op may not alias each other)."""
    if b._base is not None and b._base is a._base:
        return b.clone()
    return b


def _grads_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    gi = torch.empty_like(x) if output_mask[0] else _empty(x)
    gw = torch.empty_like(weight) if output_mask[1] and weight is not None else _empty(x)
    gb = torch.empty_like(bias) if output_mask[2] and bias is not None else _empty(x)
    return gi, gw, gb


@_normalize_backward_op.register_fake
def _normalize_backward_fake(grad_out: Tensor, x: Tensor, weight: Tensor | None,
                             bias: Tensor | None, mean: Tensor, invstd: Tensor,
                             reduce_dims: list[int], param_shape: list[int], center: bool,
                             batch_stats: bool, output_mask: list[bool], activation: str | None,
                             kind: str) -> tuple[Tensor, Tensor, Tensor]:
    return _grads_fake(x, weight, bias, output_mask)


# ------------------------------------------------------------------------------------------------
# add_normalize


def _add_normalize_impl(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                   reduce_dims: list[int], param_shape: list[int], center: bool, eps: float,
                   activation: str | None, kind: str) -> tuple[Tensor, ...]:
    layout = _layout_of(reduce_dims, param_shape, center)
    out, s, mean, var, invstd = _run(kind, ref.ADD_NORM_REFERENCE, "forward", x, residual,
                                     weight, bias, layout, eps, activation)
    return (_like_input(x, out), _like_input(x, s), *_stats_out(mean, var, invstd))


_add_normalize = torch.library.custom_op(
    "normlab::add_normalize", mutates_args=(),
    schema=f"(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, {_NORM_ARGS}, float eps, "
           "str? activation, str kind) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)(_add_normalize_impl)


@_add_normalize.register_fake
def _add_normalize_fake(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                        reduce_dims: list[int], param_shape: list[int], center: bool, eps: float,
                        activation: str | None, kind: str) -> tuple[Tensor, ...]:
    cdtype = compute_dtype(x.dtype)
    shape = _stats_shape(x, reduce_dims)
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(shape, dtype=cdtype),
            x.new_empty(shape, dtype=cdtype), x.new_empty(shape, dtype=cdtype))


def _add_normalize_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _x, _r, weight, bias, reduce_dims, param_shape, center, eps, activation, kind = inputs
    _out, s, mean, var, invstd = output
    ctx.save_for_backward(s, weight, bias, mean, invstd)
    ctx.args = (reduce_dims, param_shape, center, eps, activation, kind)
    ctx.mark_non_differentiable(mean, var, invstd)
    ctx.set_materialize_grads(False)


def _add_normalize_backward(ctx: Any, grad_out: Tensor | None, grad_sum: Tensor | None,
                            *_stat_grads: Any) -> tuple[Any, ...]:
    s, weight, bias, mean, invstd = ctx.saved_tensors
    reduce_dims, param_shape, center, eps, activation, kind = ctx.args
    n = ctx.needs_input_grad
    needs = (n[0] or n[1], n[2], n[3])
    gs, gw, gb = _add_normalize_grads(
        grad_out, grad_sum, s, weight, bias, _layout_of(reduce_dims, param_shape, center), eps,
        activation, needs,
        lambda: torch.ops.normlab.add_normalize_backward(
            grad_out, grad_sum, s, weight, bias, mean, invstd, reduce_dims, param_shape, center,
            needs, activation, kind))
    return (gs if n[0] else None, gs if n[1] else None, gw, gb, *(None,) * 6)


def _add_normalize_grads(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor,
                         weight: Tensor | None, bias: Tensor | None, layout: ref.Layout,
                         eps: float, activation: str | None, needs: tuple[bool, bool, bool],
                         backward: Any) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """add_normalize's ``(grad_sum_total, grad_weight, grad_bias)`` (the first is the input's and
    the residual's), shared as :func:`_normalize_grads` is."""
    if grad_out is None and grad_sum is None:
        return None, None, None
    if torch.is_grad_enabled():
        gs, gw, gb = _add_reference_grads(grad_out, grad_sum, s, weight, bias, layout, eps,
                                          activation, needs)
    else:
        gs, gw, gb = backward()
    return gs, gw if needs[1] else None, gb if needs[2] else None


_add_normalize.register_autograd(_add_normalize_backward, setup_context=_add_normalize_setup)


def _add_normalize_backward_op_impl(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor,
                               weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                               invstd: Tensor, reduce_dims: list[int], param_shape: list[int],
                               center: bool, output_mask: list[bool], activation: str | None,
                               kind: str) -> tuple[Tensor, Tensor, Tensor]:
    layout = _layout_of(reduce_dims, param_shape, center)
    needs = (output_mask[0], output_mask[1], output_mask[2])
    gs, gw, gb = _run(kind, ref.ADD_NORM_REFERENCE, "backward", _dense(grad_out),
                      _dense(grad_sum), s, weight, bias, mean, invstd, layout, needs,
                      activation, select_on=s)
    return _grads_out(s, weight, bias, gs, gw, gb, needs)


_add_normalize_backward_op = torch.library.custom_op(
    "normlab::add_normalize_backward", mutates_args=(),
    schema=f"(Tensor? grad_out, Tensor? grad_sum, Tensor s, Tensor? weight, Tensor? bias, "
           f"Tensor mean, Tensor invstd, {_NORM_ARGS}, bool[] output_mask, str? activation, "
           "str kind) -> (Tensor, Tensor, Tensor)",
)(_add_normalize_backward_op_impl)


@_add_normalize_backward_op.register_fake
def _add_normalize_backward_fake(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor,
                                 weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                                 invstd: Tensor, reduce_dims: list[int], param_shape: list[int],
                                 center: bool, output_mask: list[bool], activation: str | None,
                                 kind: str) -> tuple[Tensor, Tensor, Tensor]:
    return _grads_fake(s, weight, bias, output_mask)


# ------------------------------------------------------------------------------------------------
# update_running_stats_


def _update_running_stats_impl(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                          count: int, momentum: float, check: bool) -> Tensor:
    if check and not mean.is_cpu:
        # No read-back on a device: the finiteness flag selects the update there.
        return ref.update_running_stats_masked(running_mean, running_var, mean, var, count,
                                               momentum)
    committed = _run("running_stats", ref.RUNNING_STATS_REFERENCE, "forward", running_mean,
                     running_var, mean, var, count, momentum, check, select_on=mean)
    return torch.full((), bool(committed), dtype=torch.bool, device=mean.device)


_update_running_stats = torch.library.custom_op(
    "normlab::update_running_stats_", mutates_args=("running_mean", "running_var"),
    schema="(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
           "SymInt count, float momentum, bool check) -> Tensor",
)(_update_running_stats_impl)


@_update_running_stats.register_fake
def _update_running_stats_fake(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                               var: Tensor, count: int, momentum: float, check: bool) -> Tensor:
    return mean.new_empty((), dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# The reference math as a differentiable function of the inputs (double backward, transforms).


def _pure_statistics(x: Tensor, layout: ref.Layout,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, var, invstd) of `x` over the layout's dims, in out-of-place ops only (the form
    decompositions and a graph through the backward need)."""
    xc = x.to(compute_dtype(x.dtype))
    dims = list(layout.reduce_dims)
    if layout.center:
        mean = xc.mean(dims, keepdim=True)
        var = (xc - mean).pow(2).mean(dims, keepdim=True)
    else:
        var = xc.pow(2).mean(dims, keepdim=True)
        mean = torch.zeros_like(var)
    return mean, var, (var + eps).rsqrt()


def _ref_out(x: Tensor, weight: Tensor | None, bias: Tensor | None, layout: ref.Layout,
             eps: float, fixed: tuple[Tensor, Tensor] | None, activation: str | None) -> Tensor:
    """The forward output as plain differentiable, out-of-place ops: statistics recomputed from
    `x`, or the fixed ``(mean, invstd)`` held constant."""
    if fixed is None:
        mean, _var, invstd = _pure_statistics(x, layout, eps)
    else:
        mean, invstd = fixed
    z = ref.affine_normalized(x, mean, invstd, weight, bias, layout, inplace=False)
    return ref.activate(z, activation).to(x.dtype)


def _add_reference_grads(grad_out: Tensor | None, grad_sum: Tensor | None, s: Tensor,
                         weight: Tensor | None, bias: Tensor | None, layout: ref.Layout,
                         eps: float, activation: str | None,
                         needs: Sequence[bool]) -> list[Tensor | None]:
    """add_normalize's gradients with a graph: the reference norm differentiated from the sum
    (whose own graph leads back to the input and the residual), plus the sum's gradient."""
    if grad_out is None:
        return [grad_sum, None, None]
    grads = _reference_grads(grad_out, (s, weight, bias), needs, lambda s, w, b: (
        _ref_out(s, w, b, layout, eps, None, activation)))
    if grads[0] is not None and grad_sum is not None:
        grads[0] = grads[0] + grad_sum
    return grads


def _reference_grads(grad_out: Tensor, inputs: tuple[Tensor | None, ...],
                     needs: Sequence[bool], forward: Any) -> list[Tensor | None]:
    """Gradients of ``forward(*inputs)`` against `grad_out`, with a graph (create_graph)."""
    with torch.enable_grad():
        out = forward(*inputs)
    wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
    result = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                      allow_unused=True))
    return [next(result) if n and t is not None else None for t, n in zip(inputs, needs)]


# ------------------------------------------------------------------------------------------------
# The calls the public functions make.


_PLAIN = (Tensor, torch.nn.Parameter)
_OP, _EAGER, _REFERENCE_MATH = 0, 1, 2


def _route(*tensors: Tensor | None) -> int:
    """How a call runs (decided once per call, cheapest checks first):

    * ``_REFERENCE_MATH`` inside a ``torch.func`` transform or with a forward-mode AD level (the
      ops register no vmap or jvp rule; the aten ops of the reference have them all);
    * ``_OP``, the ``torch.ops.normlab`` op, while a tracer runs (dynamo, jit), under a dispatch
      mode, or for fake/meta tensors, subclasses and negative or conjugate views (their memory
      holds other values; the dispatcher resolves them);
    * ``_EAGER`` otherwise: the ops' own kernels and autograd formula without the dispatcher round
      trip (tens of microseconds from Python per call, more than a small normalization).
    """
    # is_compiling() first: dynamo answers it without tracing into the C calls after it.
    if torch.compiler.is_compiling():
        return _OP
    # Private attributes (no public query exists); if one goes away, keep the op path.
    if getattr(forward_ad, "_current_level", -1) >= 0 or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return _REFERENCE_MATH
    if torch._C._is_tracing() or torch._C._len_torch_dispatch_stack():
        return _OP
    # A loop rather than all() over a generator: this runs on every call (1 us against 0.4).
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta or t.is_neg() or t.is_conj()):
            return _OP
    return _EAGER


def _needs_graph(x: Tensor, a: Tensor | None, b: Tensor | None, c: Tensor | None = None) -> bool:
    """Whether a call builds an autograd graph (fixed arity: a generator costs more than the
    test itself)."""
    return torch.is_grad_enabled() and (x.requires_grad or (a is not None and a.requires_grad)
                                        or (b is not None and b.requires_grad)
                                        or (c is not None and c.requires_grad))


class _EagerNormalize(torch.autograd.Function):
    """The normalize op's kernels and its autograd formula, bound without the dispatcher for
    eager calls. One output: the statistics leave through `stats_out` (each extra output of an
    autograd function, and marking it non-differentiable, costs host time on every call)."""

    # The non-tensor arguments travel as one `config` tuple: apply() walks every argument on
    # each call (about 0.3 us apiece).
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                fixed_mean: Tensor | None, fixed_var: Tensor | None,
                config: tuple[ref.Layout, float, str | None, str],
                stats_out: list[Tensor]) -> Tensor:
        layout, eps, activation, kind = config
        # A copy of a fixed mean: kernels may return it as the mean the backward reads, and the
        # running buffer can move on before the backward runs (the variance needs none: the
        # backward reads the invstd computed from it, always a new tensor).
        stats = None if fixed_mean is None or fixed_var is None else (fixed_mean.clone(),
                                                                      fixed_var)
        out, mean, var, invstd = kernel_forward(x, weight, bias, layout, eps, stats, activation,
                                                kind)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.config = (layout, eps, activation, kind, stats is None)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        stats_out += (mean, var)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, bias, mean, invstd = ctx.saved_tensors
        layout, eps, activation, kind, batch_stats = ctx.config
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])

        def kernels_backward() -> tuple[Tensor | None, ...]:
            gi, gw, gb = kernel_backward(grad_out, x, weight, bias, mean, invstd, layout,
                                         batch_stats, needs, activation, kind)
            if gb is not None and ctx.bias_meta is not None:
                gb = kernels.as_param_grad(gb, *ctx.bias_meta)
            return gi, gw, gb

        grads = _normalize_grads(grad_out, x, weight, bias, mean, invstd, layout, eps,
                                 activation, batch_stats, needs, kernels_backward)
        return (*grads, None, None, None, None)


class _EagerAddNormalize(torch.autograd.Function):
    """As :class:`_EagerNormalize`, for add_normalize: ``(out, sum)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, residual: Tensor, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None,
                config: tuple[ref.Layout, float, str | None, str]) -> tuple[Tensor, Tensor]:
        layout, eps, activation, kind = config
        out, s, mean, _var, invstd = _run(kind, ref.ADD_NORM_REFERENCE, "forward", x, residual,
                                          weight, bias, layout, eps, activation)
        ctx.save_for_backward(s, weight, bias, mean, invstd)
        ctx.config = (layout, eps, activation, kind)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.set_materialize_grads(False)
        return out, s

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None,  # type: ignore[override]
                 grad_sum: Tensor | None) -> tuple[Any, ...]:
        s, weight, bias, mean, invstd = ctx.saved_tensors
        layout, eps, activation, kind = ctx.config
        n = ctx.needs_input_grad
        needs = (n[0] or n[1], n[2], n[3])

        def kernels_backward() -> tuple[Tensor | None, ...]:
            gs, gw, gb = _run(kind, ref.ADD_NORM_REFERENCE, "backward", _dense(grad_out),
                              _dense(grad_sum), s, weight, bias, mean, invstd, layout, needs,
                              activation, select_on=s)
            if gb is not None and ctx.bias_meta is not None:
                gb = kernels.as_param_grad(gb, *ctx.bias_meta)
            return gs, gw, gb

        gs, gw, gb = _add_normalize_grads(grad_out, grad_sum, s, weight, bias, layout, eps,
                                          activation, needs, kernels_backward)
        return (gs if n[0] else None, gs if n[1] else None, gw, gb, None)


def normalize(x: Tensor, weight: Tensor | None, bias: Tensor | None, op: str, layout: ref.Layout,
              eps: float, stats: tuple[Tensor, Tensor] | None = None,
              activation: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The normalize op (differentiable in `x`, `weight`, `bias`); returns ``(out, mean, var)``
    with the statistics detached (``var`` empty for fixed statistics)."""
    fixed_mean, fixed_var = (None, None) if stats is None else stats
    route = _route(x, weight, bias, fixed_mean, fixed_var)
    if route == _REFERENCE_MATH:
        out, mean, var, _invstd = ref.norm_act_forward(x, weight, bias, layout, eps, stats,
                                                       activation)
        return out, mean.detach(), var.detach()
    if route == _OP:
        out, mean, var, _invstd = torch.ops.normlab.normalize(
            x, weight, bias, layout.reduce_dims, layout.param_shape, layout.center, eps,
            fixed_mean, fixed_var, activation, op)
    elif _needs_graph(x, weight, bias):
        stats_out: list[Tensor] = []
        out = _EagerNormalize.apply(x, weight, bias, fixed_mean, fixed_var,
                                    (layout, eps, activation, op), stats_out)
        mean, var = stats_out[0], stats_out[1]
    else:  # inference: the kernel without an autograd node (its set-up costs more)
        out, mean, var, _invstd = kernel_forward(x, weight, bias, layout, eps, stats,
                                                 activation, op)
    return out, mean, var


def add_normalize(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                  op: str, layout: ref.Layout, eps: float,
                  activation: str | None = None) -> tuple[Tensor, Tensor]:
    """The add_normalize op: ``(activation(norm(x + residual)), x + residual)``."""
    route = _route(x, residual, weight, bias)
    if route == _REFERENCE_MATH:
        out, s, *_ = ref.add_norm_forward(x, residual, weight, bias, layout, eps, activation)
        return out, s
    if route == _OP:
        out, s, *_ = torch.ops.normlab.add_normalize(
            x, residual, weight, bias, layout.reduce_dims, layout.param_shape, layout.center,
            eps, activation, op)
    elif _needs_graph(x, residual, weight, bias):
        out, s = _EagerAddNormalize.apply(x, residual, weight, bias, (layout, eps, activation, op))
    else:
        out, s, *_ = _run(op, ref.ADD_NORM_REFERENCE, "forward", x, residual, weight, bias,
                          layout, eps, activation)
    return out, s


def commit_flag(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                count: int, momentum: float, check: bool) -> bool | Tensor:
    """The update_running_stats_ op: whether the batch went in, a Python bool on the eager CPU
    path (no tensor to make and read back), else a 0-dim bool tensor."""
    route = _route(running_mean, running_var, mean, var)
    if route == _REFERENCE_MATH:
        return ref.update_running_stats(running_mean, running_var, mean, var, count, momentum,
                                        check)
    if route == _EAGER and mean.is_cpu:
        return bool(_run("running_stats", ref.RUNNING_STATS_REFERENCE, "forward", running_mean,
                         running_var, mean, var, count, momentum, check, select_on=mean))
    return torch.ops.normlab.update_running_stats_(running_mean, running_var, mean, var, count,
                                                   float(momentum), check)


# ------------------------------------------------------------------------------------------------
# Decompositions into aten ops, for exporters that lower a graph to a fixed operator set (ONNX):
# the norms become torch's standard norm ops, which the ONNX exporter writes as
# LayerNormalization, GroupNormalization, BatchNormalization, InstanceNormalization and
# RMSNormalization; everything else is the reference math. torch.compile and torch.export keep the
# normlab ops (their decomposition tables do not include these).


def _standard_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   layout: ref.Layout, eps: float, fixed: tuple[Tensor, Tensor] | None,
                   kind: str) -> Tensor | None:
    """The output as one of torch's norm ops where `kind` and `layout` are one, else None."""
    aten = torch.ops.aten
    given = [t for t in (weight, bias, *(fixed or ())) if t is not None]
    if any(t.dtype != x.dtype for t in given):
        return None  # torch's norm ops want one dtype (normlab also takes float32 parameters)
    nd, k = x.dim(), len(layout.param_shape)
    trailing = fixed is None and layout.reduce_dims == tuple(range(nd - k, nd))
    base = kind.removesuffix("_act")
    if base in ("layer_norm", "add_layer_norm") and trailing and layout.center:
        return aten.layer_norm.default(x, list(layout.param_shape), weight, bias, eps)
    if base in ("rms_norm", "add_rms_norm") and trailing and not layout.center:
        return aten.rms_norm.default(x, list(layout.param_shape), weight, eps)
    if base == "group_norm" and fixed is None and nd >= 3:
        groups = x.shape[1]
        out = aten.group_norm.default(x.flatten(1, 2), groups, weight, bias, eps)
        return out.unflatten(1, (groups, x.shape[2]))
    if base == "batch_norm" and fixed is not None:
        return aten.batch_norm.default(x, weight, bias, fixed[0], fixed[1], False, 0.0, eps,
                                       False)
    if base == "instance_norm" and fixed is None:
        return aten.instance_norm.default(x, weight, bias, None, None, True, 0.0, eps, False)
    return None


def _statistics(x: Tensor, layout: ref.Layout, eps: float,
                fixed: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, var, invstd) as the op returns them, in out-of-place ops."""
    if fixed is None:
        return _pure_statistics(x, layout, eps)
    cdtype = compute_dtype(x.dtype)
    mean, var = (s.to(cdtype).reshape(layout.param_shape) for s in fixed)
    return mean.clone(), _empty(x, cdtype), (var + eps).rsqrt()


@torch._decomp.register_decomposition(torch.ops.normlab.normalize.default)
def _normalize_decomposition(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                             reduce_dims: list[int], param_shape: list[int], center: bool,
                             eps: float, fixed_mean: Tensor | None, fixed_var: Tensor | None,
                             activation: str | None,
                             kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    layout = _layout_of(reduce_dims, param_shape, center)
    fixed = None if fixed_mean is None or fixed_var is None else (fixed_mean, fixed_var)
    mean, var, invstd = _statistics(x, layout, eps, fixed)
    out = _standard_norm(x, weight, bias, layout, eps, fixed, kind)
    if out is None:
        return _ref_out(x, weight, bias, layout, eps, (mean, invstd), activation), mean, var, invstd
    return ref.activate(out, activation), mean, var, invstd


@torch._decomp.register_decomposition(torch.ops.normlab.add_normalize.default)
def _add_normalize_decomposition(x: Tensor, residual: Tensor, weight: Tensor | None,
                                 bias: Tensor | None, reduce_dims: list[int],
                                 param_shape: list[int], center: bool, eps: float,
                                 activation: str | None, kind: str) -> tuple[Tensor, ...]:
    s = x + residual
    out, mean, var, invstd = _normalize_decomposition(
        s, weight, bias, reduce_dims, param_shape, center, eps, None, None, activation, kind)
    return out, s, mean, var, invstd
