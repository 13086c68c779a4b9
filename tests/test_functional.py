"""normlab.functional against torch.nn.functional over seeded random cases: outputs, all
gradients and running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as F
from cases import TOL, Case, random_cases


def _params(case: Case, c_shape, gen_seed: int):
    gen = torch.Generator().manual_seed(gen_seed)
    if not case.affine:
        return None, None
    w = (torch.rand(c_shape, generator=gen, dtype=torch.float64) + 0.5).to(case.dtype)
    b = torch.randn(c_shape, generator=gen, dtype=torch.float64).to(case.dtype) if case.bias else None
    return w, b


def _run(fn, x, params, grad_out, upcast: bool = False):
    """Output and gradients of fn. With `upcast`, fn runs in float64 (torch as the oracle, free
    of its own float32 rounding) and the results are cast back to the input's dtype."""
    dtype = x.dtype
    if upcast:
        x, grad_out = x.double(), grad_out.double()
        params = [None if p is None else p.double() for p in params]
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    out = fn(x, *params)
    out.backward(grad_out)
    back = (lambda t: t if t is None else t.to(dtype)) if upcast else (lambda t: t)
    return back(out.detach()), back(x.grad), [None if p is None else back(p.grad) for p in params]


def _assert_same(ours, theirs, dtype, native=None):
    """`ours` equals the float64 oracle `theirs` to the dtype's tolerance. With `native` (torch in
    the input's dtype), the absolute tolerance widens to twice torch's own error per tensor: a row
    of nearly equal values is ill-conditioned (1 / std amplifies rounding) for torch as for us."""
    out, gx, gp = ours
    out_t, gx_t, gp_t = theirs
    assert out.dtype == out_t.dtype
    natives = [None] * (2 + len(gp)) if native is None else [native[0], native[1], *native[2]]

    def close(a, b, n):
        tol = dict(TOL[dtype])
        if n is not None:
            tol["atol"] = max(tol["atol"], 2 * (n - b).abs().max().item())
        torch.testing.assert_close(a, b, **tol)

    close(out, out_t, natives[0])
    close(gx, gx_t, natives[1])
    for a, b, n in zip(gp, gp_t, natives[2:]):
        if b is None:
            assert a is None
        else:
            close(a, b, n)


def _more_than_one_per_channel(cases):
    return [c for c in cases if c.shape[0] * _prod(c.shape[2:]) > 1]


def _more_than_one_spatial(cases):
    return [c for c in cases if _prod(c.shape[2:]) > 1]


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@pytest.mark.parametrize("case", _more_than_one_per_channel(random_cases(40, 2, 5, seed=1)), ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_batch_norm_training_matches_torch(case: Case, momentum: float):
    x = case.make()
    c = x.shape[1]
    w, b = _params(case, (c,), case.seed + 1)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 2), dtype=x.dtype)
    rm, rv = torch.randn(c, dtype=x.dtype), torch.rand(c, dtype=x.dtype) + 0.5
    rm_t, rv_t = rm.double(), rv.double()
    ours = _run(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, True, momentum, case.eps), x, [w, b], go)
    theirs = _run(lambda x, w, b: TF.batch_norm(x, rm_t, rv_t, w, b, True, momentum, case.eps), x, [w, b], go, upcast=True)
    _assert_same(ours, theirs, case.dtype)
    torch.testing.assert_close(rm, rm_t.to(case.dtype), **TOL[case.dtype])
    torch.testing.assert_close(rv, rv_t.to(case.dtype), **TOL[case.dtype])


@pytest.mark.parametrize("case", random_cases(20, 2, 5, seed=2), ids=str)
def test_batch_norm_eval_matches_torch(case: Case):
    x = case.make()
    c = x.shape[1]
    w, b = _params(case, (c,), case.seed + 1)
    go = torch.randn(x.shape, dtype=x.dtype)
    rm, rv = torch.randn(c, dtype=x.dtype), torch.rand(c, dtype=x.dtype) + 0.5
    ours = _run(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, 0.1, case.eps), x, [w, b], go)
    theirs = _run(lambda x, w, b: TF.batch_norm(x, rm.double(), rv.double(), w, b, False, 0.1, case.eps), x, [w, b], go, upcast=True)
    _assert_same(ours, theirs, case.dtype)


@pytest.mark.parametrize("case", random_cases(40, 1, 5, seed=3), ids=str)
def test_layer_norm_matches_torch(case: Case):
    x = case.make()
    k = 1 + case.seed % min(3, x.dim())
    shape = x.shape[-k:]
    w, b = _params(case, shape, case.seed + 1)
    go = torch.randn(x.shape, dtype=x.dtype)
    ours = _run(lambda x, w, b: F.layer_norm(x, shape, w, b, case.eps), x, [w, b], go)
    theirs = _run(lambda x, w, b: TF.layer_norm(x, shape, w, b, case.eps), x, [w, b], go, upcast=True)
    native = _run(lambda x, w, b: TF.layer_norm(x, shape, w, b, case.eps), x, [w, b], go)
    _assert_same(ours, theirs, case.dtype, native)


@pytest.mark.parametrize("case", random_cases(40, 2, 5, seed=4), ids=str)
def test_group_norm_matches_torch(case: Case):
    x = case.make()
    c = x.shape[1]
    groups = [g for g in range(1, c + 1) if c % g == 0][case.seed % len([g for g in range(1, c + 1) if c % g == 0])]
    w, b = _params(case, (c,), case.seed + 1)
    go = torch.randn(x.shape, dtype=x.dtype)
    ours = _run(lambda x, w, b: F.group_norm(x, groups, w, b, case.eps), x, [w, b], go)
    theirs = _run(lambda x, w, b: TF.group_norm(x, groups, w, b, case.eps), x, [w, b], go, upcast=True)
    native = _run(lambda x, w, b: TF.group_norm(x, groups, w, b, case.eps), x, [w, b], go)
    _assert_same(ours, theirs, case.dtype, native)


@pytest.mark.parametrize("case", _more_than_one_spatial(random_cases(30, 3, 5, seed=5)), ids=str)
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_matches_torch(case: Case, use_input_stats: bool):
    x = case.make()
    c = x.shape[1]
    w, b = _params(case, (c,), case.seed + 1)
    go = torch.randn(x.shape, dtype=x.dtype)
    rm, rv = torch.randn(c, dtype=x.dtype), torch.rand(c, dtype=x.dtype) + 0.5
    rm_t, rv_t = rm.double(), rv.double()
    ours = _run(lambda x, w, b: F.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3, case.eps), x, [w, b], go)
    theirs = _run(lambda x, w, b: TF.instance_norm(x, rm_t, rv_t, w, b, use_input_stats, 0.3, case.eps), x, [w, b], go, upcast=True)
    _assert_same(ours, theirs, case.dtype)
    torch.testing.assert_close(rm, rm_t.to(case.dtype), **TOL[case.dtype])
    torch.testing.assert_close(rv, rv_t.to(case.dtype), **TOL[case.dtype])


@pytest.mark.parametrize("case", random_cases(30, 1, 4, seed=6), ids=str)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch(case: Case, eps):
    x = case.make()
    k = 1 + case.seed % min(2, x.dim())
    shape = x.shape[-k:]
    w, _ = _params(case, shape, case.seed + 1)
    go = torch.randn(x.shape, dtype=x.dtype)
    ours = _run(lambda x, w: F.rms_norm(x, shape, w, eps), x, [w], go)
    # eps=None means the input dtype's machine epsilon: pin it before the oracle runs upcast.
    eps_t = eps if eps is not None else torch.finfo(case.dtype).eps
    theirs = _run(lambda x, w: TF.rms_norm(x, shape, w, eps_t), x, [w], go, upcast=True)
    native = _run(lambda x, w: TF.rms_norm(x, shape, w, eps_t), x, [w], go)
    _assert_same(ours, theirs, case.dtype, native)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_output_and_grad_keep_input_layout(layout: str):
    x = Case((4, 6, 5, 3), torch.float32, layout, True, True, 1e-5, 0).make()
    out = F.batch_norm(x, None, None, training=True)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, TF.batch_norm(x, None, None, training=True), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_inference_calls_skip_the_graph_and_agree_with_training_calls(path: str):
    # Without a tensor that needs a gradient the ops call the kernel directly (no autograd node);
    # outputs and running statistics must be exactly those of the graph-building call.
    from normlab import kernels
    from normlab.functional import fused

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 5, generator=g)
    w = torch.randn(6, generator=g).requires_grad_(True)
    b = torch.randn(6, generator=g).requires_grad_(True)
    r = torch.randn(4, 6, 5, 5, generator=g)
    calls = {
        "batch_norm": lambda w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training=True),
        "batch_norm_eval": lambda w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training=False),
        "layer_norm": lambda w, b, rm, rv: F.layer_norm(x, (5,), w[:5], b[:5]),
        "group_norm": lambda w, b, rm, rv: F.group_norm(x, 3, w, b),
        "instance_norm": lambda w, b, rm, rv: F.instance_norm(x, rm, rv, w, b),
        "rms_norm": lambda w, b, rm, rv: F.rms_norm(x, (5,), w[:5]),
        "batch_norm_act": lambda w, b, rm, rv: fused.batch_norm_act(x, rm, rv, w, b, True,
                                                                    activation="silu"),
        "group_norm_act": lambda w, b, rm, rv: fused.group_norm_act(x, 2, w, b, activation="gelu"),
        "add_layer_norm": lambda w, b, rm, rv: fused.add_layer_norm(x, r, (5,), w[:5], b[:5],
                                                                    activation="relu"),
    }
    ctx = kernels.use_reference() if path == "reference" else torch.enable_grad()
    with ctx:
        for name, call in calls.items():
            stats_graph = (torch.zeros(6), torch.ones(6))
            stats_plain = (torch.zeros(6), torch.ones(6))
            with_graph = call(w, b, *stats_graph)
            with torch.no_grad():
                plain = call(w, b, *stats_plain)
            with_graph = with_graph if isinstance(with_graph, tuple) else (with_graph,)
            plain = plain if isinstance(plain, tuple) else (plain,)
            assert with_graph[0].grad_fn is not None, name
            for a, e in zip(plain, with_graph):
                assert a.grad_fn is None, name
                assert torch.equal(a, e.detach()), name
            for a, e in zip(stats_plain, stats_graph):
                assert torch.equal(a, e), name


# torch's forward-AD helpers call the deprecated torch.jit.script internally.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_matches_torch():
    # Dual tensors do not set requires_grad: the tangent must still come through (the reference
    # math runs under a forward-AD level), equal to torch's own norms' jvp.
    import torch.autograd.forward_ad as fwAD

    from normlab.functional import fused

    x, t, r = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    tn = torch.nn.functional
    pairs = [
        (lambda d: F.layer_norm(d, (8,)), lambda d: tn.layer_norm(d, (8,))),
        (lambda d: F.batch_norm(d, None, None, training=True),
         lambda d: tn.batch_norm(d, None, None, training=True)),
        (lambda d: F.rms_norm(d, (8,)), lambda d: tn.rms_norm(d, (8,))),
        (lambda d: fused.add_layer_norm(d, r, 8)[0], lambda d: tn.layer_norm(d + r, (8,))),
    ]
    for ours, theirs in pairs:
        tangents = []
        for fn in (ours, theirs):
            with fwAD.dual_level():
                out = fn(fwAD.make_dual(x, t))
                tangents.append(fwAD.unpack_dual(out).tangent)
        assert tangents[0] is not None
        torch.testing.assert_close(tangents[0], tangents[1], atol=1e-5, rtol=1e-4)


def test_negative_views_give_torch_values():
    # A negative view's memory holds the other sign (torch._neg_view, conj of real views): the
    # eager path must not hand that memory to a kernel as it is.
    from normlab.functional import fused

    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(4, 8, generator=g), torch.randn(8, generator=g), torch.randn(4, 8, generator=g)
    tn = torch.nn.functional
    torch.testing.assert_close(F.layer_norm(torch._neg_view(x), (8,)), tn.layer_norm(-x, (8,)))
    torch.testing.assert_close(F.layer_norm(x, (8,), torch._neg_view(w)), tn.layer_norm(x, (8,), -w))
    torch.testing.assert_close(F.batch_norm(torch._neg_view(x), None, None, training=True),
                               tn.batch_norm(-x, None, None, training=True))
    torch.testing.assert_close(fused.add_layer_norm(torch._neg_view(x), r, 8)[0],
                               tn.layer_norm(-x + r, (8,)))
    for upstream in (lambda y: torch._neg_view(y), lambda y: y):  # a negative gradient too
        xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ga,) = torch.autograd.grad(upstream(F.layer_norm(xi, (8,))), xi, torch.ones(4, 8))
        (gb,) = torch.autograd.grad(upstream(tn.layer_norm(xt, (8,))), xt, torch.ones(4, 8))
        torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("training", [True, False])
def test_running_buffers_that_require_grad_are_refused(training):
    # torch refuses them too: their gradient would be dropped, and training would write a leaf.
    rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3)
    with pytest.raises(ValueError, match="running_mean requires grad"):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=training)
    with pytest.raises(ValueError, match="running_var requires grad"):
        F.instance_norm(torch.randn(2, 3, 5), torch.zeros(3), torch.ones(3, requires_grad=True))
    assert torch.equal(rm.detach(), torch.zeros(3))
    with torch.no_grad():  # no graph being built: nothing to drop, as in torch
        F.batch_norm(torch.randn(4, 3), rm, rv, training=training)
