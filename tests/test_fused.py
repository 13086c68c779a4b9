"""Fused ops and modules against the eager torch chains they replace, on both normlab paths."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch
import torch.nn.functional as tf
from torch import nn

from normlab import kernels
from normlab.functional import fused as FF
from normlab.kernels import _build
from normlab.nn import fused as NF

HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
PATHS = ["kernel", "reference"]
ACTS = {"relu": tf.relu, "silu": tf.silu, "gelu": tf.gelu, None: lambda t: t}
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 4e-2, "rtol": 2e-2},
       torch.float64: {"atol": 1e-10, "rtol": 1e-10}}


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest):
    if request.param == "kernel":
        if not HAVE_CXX:
            pytest.skip("no C++ compiler to build the CPU kernels")
        _build.build_variants([(0, False), (0, True), (2, False), (2, True)])
        assert _build.available()
        yield "kernel"
    else:
        with kernels.use_reference():
            yield "reference"


def _compare(f_ours, f_torch, inputs, dtype, grads_seed=0):
    g = torch.Generator().manual_seed(grads_seed)
    a_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    b_in = [t.detach().clone().requires_grad_(True) for t in inputs]
    a = f_ours(*a_in)
    b = f_torch(*b_in)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    outs_g = [torch.randn(t.shape, generator=g).to(t.dtype) for t in a]
    ga = torch.autograd.grad(a, a_in, outs_g)
    gb = torch.autograd.grad(b, b_in, outs_g)
    tol = TOL[dtype]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, atol=tol["atol"] * max(1.0, q.abs().max().item()),
                                   rtol=tol["rtol"])
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_add_layer_norm_matches_eager_chain(path: str, dtype: torch.dtype, strided: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 48, generator=g).to(dtype)
    r = torch.randn(5, 3, 96 if strided else 48, generator=g).to(dtype)
    if strided:
        r = r[..., ::2]
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    if dtype != torch.bfloat16:
        w, b = w.to(dtype), b.to(dtype)
    _compare(lambda x, r, w, b: FF.add_layer_norm(x, r, 48, w, b),
             lambda x, r, w, b: (tf.layer_norm((x + r).float(), (48,), w.float(), b.float())
                                 .to(dtype), x + r),
             [x, r, w, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_eager_chain(path: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(9, 33, generator=g).to(dtype), torch.randn(9, 33, generator=g).to(dtype)
    w = torch.randn(33, generator=g)
    eps = torch.finfo(torch.float32).eps
    _compare(lambda x, r, w: FF.add_rms_norm(x, r, 33, w),
             lambda x, r, w: (tf.rms_norm((x + r).float(), (33,), w, eps).to(dtype), x + r),
             [x, r, w], dtype)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_norm_activation_matches_eager_chain(path: str, norm: str, activation: str,
                                                 dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(6, 4, 40, generator=g) * 2 + 1).to(dtype)
    r = torch.randn(6, 4, 40, generator=g).to(dtype)
    w, b = torch.randn(40, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    act = ACTS[activation]
    if norm == "layer_norm":
        _compare(lambda x, r, w, b: FF.add_layer_norm(x, r, 40, w, b, activation=activation),
                 lambda x, r, w, b: (act(tf.layer_norm(x + r, (40,), w, b)), x + r),
                 [x, r, w, b], dtype)
    else:
        eps = torch.finfo(dtype).eps
        _compare(lambda x, r, w: FF.add_rms_norm(x, r, 40, w, activation=activation),
                 lambda x, r, w: (act(tf.rms_norm(x + r, (40,), w, eps)), x + r),
                 [x, r, w], dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_add_norm_activation_gradcheck_float64(path: str, activation: str) -> None:
    g = torch.Generator().manual_seed(12)
    x, r = (torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(2))
    w, b = (torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: FF.add_layer_norm(x, r, 5, w, b, activation=activation),
        (x, r, w, b), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda x, r, w: FF.add_rms_norm(x, r, 5, w, activation=activation),
        (x, r, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_add_norm_gradient_through_the_sum_only(path: str, activation: str | None) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    r = torch.randn(4, 16, generator=g, requires_grad=True)
    _, s = FF.add_layer_norm(x, r, 16, activation=activation)
    gx, gr = torch.autograd.grad(s.square().sum(), [x, r])
    torch.testing.assert_close(gx, 2 * (x + r).detach())
    torch.testing.assert_close(gr, gx)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_matches_eager_chain(path: str, activation: str | None, layout: str,
                                            training: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 5, 7, generator=g) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    rm0, rv0 = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    bufs_ours, bufs_torch = (rm0.clone(), rv0.clone()), (rm0.clone(), rv0.clone())
    out = _compare(
        lambda x, w, b: FF.batch_norm_act(x, *bufs_ours, w, b, training, 0.3, 1e-5, activation),
        lambda x, w, b: ACTS[activation](tf.batch_norm(x, *bufs_torch, w, b, training, 0.3, 1e-5)),
        [x, w, b], torch.float32)
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(bufs_ours, bufs_torch):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_act_matches_eager_chain(path: str, activation: str, layout: str,
                                            dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 12, 5, 3, generator=g) * 3 - 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(12, generator=g), torch.randn(12, generator=g)
    out = _compare(
        lambda x, w, b: FF.group_norm_act(x, 4, w, b, activation=activation),
        lambda x, w, b: ACTS[activation](tf.group_norm(x.float(), 4, w, b)).to(dtype),
        [x, w, b], dtype)
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


# Every activation on the hand-written reference backward; the kernel shares one code path for
# all activations, so gelu (the most involved derivative) covers it (float64 gradcheck is slow).
@pytest.mark.parametrize(("path", "activation"), [
    ("reference", "relu"), ("reference", "silu"), ("reference", "gelu"), ("kernel", "gelu"),
])
def test_fused_backward_gradcheck_float64(path: str, activation: str) -> None:
    if path == "kernel":
        if not HAVE_CXX:
            pytest.skip("no C++ compiler to build the CPU kernels")
        _build.build_variants([(1, False), (1, True)])
        assert _build.available()
        _gradchecks(activation)
    else:
        with kernels.use_reference():
            _gradchecks(activation)


def _gradchecks(activation: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    xr = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rr = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    wr = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    br = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    # ReLU's kink: keep pre-activations away from 0 so finite differences are valid.
    assert torch.autograd.gradcheck(
        lambda x, w, b: FF.batch_norm_act(x, None, None, w, b, True, activation=activation),
        (x, w, b), eps=1e-6, atol=1e-5)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: FF.group_norm_act(x, 2, w, b, activation=activation),
        (xcl, w, b), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x, r, w, b: FF.add_layer_norm(x, r, 5, w, b),
                                    (xr, rr, wr, br), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda x, r, w: FF.add_rms_norm(x, r, 5, w),
                                    (xr, rr, wr), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize(("ours", "theirs", "shape"), [
    (lambda: NF.BatchNormAct2d(6, activation="silu"), lambda: nn.BatchNorm2d(6), (2, 6, 3, 3)),
    (lambda: NF.GroupNormAct(3, 6, activation="gelu"), lambda: nn.GroupNorm(3, 6), (2, 6, 3, 3)),
    (lambda: NF.FusedAddLayerNorm(6), lambda: nn.LayerNorm(6), (2, 6)),
    (lambda: NF.FusedAddRMSNorm(6), lambda: nn.RMSNorm(6), (2, 6)),
    (lambda: NF.FusedAddLayerNorm(6, activation="gelu"), lambda: nn.LayerNorm(6), (2, 6)),
    (lambda: NF.FusedAddRMSNorm(6, activation="silu"), lambda: nn.RMSNorm(6), (2, 6)),
])
def test_module_state_dict_is_the_torch_norms(ours, theirs, shape) -> None:
    a, b = ours(), theirs()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    assert set(a.state_dict()) == set(b.state_dict())
    a.load_state_dict(b.state_dict(), strict=True)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(shape, generator=g)
    act = ACTS[a.activation]
    if isinstance(a, (NF.FusedAddLayerNorm, NF.FusedAddRMSNorm)):
        r = torch.randn(shape, generator=g)
        normed, s = a(x, r)
        torch.testing.assert_close(s, x + r)
        torch.testing.assert_close(normed, act(b(x + r)))
    else:
        torch.testing.assert_close(a(x), act(b(x)))
    if a.activation is None:
        assert "activation" not in repr(a)
    else:
        assert f"activation='{a.activation}'" in repr(a)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_fused_add_norm_modules_match_functional(path: str, activation: str) -> None:
    g = torch.Generator().manual_seed(13)
    ln = NF.FusedAddLayerNorm(12, activation=activation)
    rms = NF.FusedAddRMSNorm(12, activation=activation)
    with torch.no_grad():
        for p in (*ln.parameters(), *rms.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    x, r = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    want_ln = FF.add_layer_norm(x, r, 12, ln.weight, ln.bias, activation=activation)
    want_rms = FF.add_rms_norm(x, r, 12, rms.weight, activation=activation)
    for got, want in ((ln(x, r), want_ln), (rms(x, r), want_rms)):
        for p, q in zip(got, want):
            torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_batch_norm_act_module_tracks_running_stats_like_torch() -> None:
    ours, theirs = NF.BatchNormAct2d(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, generator=g)
        torch.testing.assert_close(ours(x), tf.relu(theirs(x)))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(ours(x), tf.relu(theirs(x)))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="activation='tanh' is not supported"):
        NF.BatchNormAct2d(4, activation="tanh")
    with pytest.raises(ValueError, match="activation='elu' is not supported"):
        FF.group_norm_act(torch.randn(2, 4, 3), 2, activation="elu")
    with pytest.raises(ValueError, match="add_layer_norm: activation='tanh' is not supported"):
        FF.add_layer_norm(torch.randn(2, 4), torch.randn(2, 4), 4, activation="tanh")
    with pytest.raises(ValueError, match="add_rms_norm: activation='elu' is not supported"):
        FF.add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), 4, activation="elu")
    with pytest.raises(ValueError, match="FusedAddLayerNorm: activation='tanh' is not supported"):
        NF.FusedAddLayerNorm(4, activation="tanh")
    with pytest.raises(ValueError, match="FusedAddRMSNorm: activation='swish' is not supported"):
        NF.FusedAddRMSNorm(4, activation="swish")
    with pytest.raises(ValueError, match="residual must match the input's shape"):
        FF.add_layer_norm(torch.randn(2, 4), torch.randn(2, 5), 4)
    with pytest.raises(ValueError, match="num_channels=6 is not divisible by num_groups=4"):
        FF.group_norm_act(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        FF.batch_norm_act(torch.randn(1, 3), None, None, training=True)


def test_kernels_registered_for_fused_ops() -> None:
    x = torch.randn(2, 3)
    for op in ("add_layer_norm", "add_rms_norm", "batch_norm_act", "group_norm_act"):
        kernel = kernels.select(op, x, FF.NORM_ACT_REFERENCE)
        assert kernel.name == f"cpu:{op}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels.use_reference())
        assert kernels.select("batch_norm_act", x, FF.NORM_ACT_REFERENCE) is \
            FF.NORM_ACT_REFERENCE


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_kernels_do_not_fall_back(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    from fallback import forbid_fallback

    forbid_fallback(monkeypatch)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 8, 3, 5, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(8, generator=g, requires_grad=True)
    outs = [FF.batch_norm_act(x, None, None, w, None, True, activation="silu"),
            FF.group_norm_act(x, 4, w, None, activation="gelu"),
            *FF.add_layer_norm(x, x.detach(), 5), FF.add_rms_norm(x, x.detach(), 5)[0],
            *FF.add_layer_norm(x, x.detach(), 5, w[:5], w[3:], activation="gelu"),
            FF.add_rms_norm(x, x.detach(), 5, w[:5], activation="silu")[0]]
    torch.autograd.grad(sum(o.sum() for o in outs), [x, w])
