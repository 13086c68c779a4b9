"""Batch norm variants: batch renorm, ghost batch norm, frozen batch norm, weight-standardized conv.

Oracles: torch.nn's batch norm (renorm with the corrections off, ghost per chunk, frozen in eval),
float64 NumPy formulas and autograd through plain float64 ops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nnn
from normlab.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_limits
from normlab.nn.ws_conv import WSConv2d

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}
CONSTANT = {"warmup_steps": 0, "r_max_ramp_steps": 0, "d_max_ramp_steps": 0}

# (variant classes, torch batch norm, input shape)
SHAPES = [
    (0, nn.BatchNorm1d, (8, 3)),
    (0, nn.BatchNorm1d, (6, 3, 5)),
    (1, nn.BatchNorm2d, (5, 3, 4, 3)),
    (2, nn.BatchNorm3d, (4, 3, 2, 3, 2)),
]
RENORMS = (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)
GHOSTS = (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)


def _randomize(*modules: nn.Module, seed: int = 0) -> None:
    """Same random affine parameters in every module."""
    g = torch.Generator().manual_seed(seed)
    c = modules[0].num_features
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w)
            m.bias.copy_(b)


def _step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """Forward + backward; returns (out, grad_input, grad_weight, grad_bias) and zeroes grads."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    grads = (x.grad, module.weight.grad.clone(), module.bias.grad.clone())
    module.weight.grad = module.bias.grad = None
    return (out.detach(), *grads)


def _assert_close_all(a, b, **tol) -> None:
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, **tol)


def _assert_same_buffers(m: nn.Module, ref: nn.Module, **tol) -> None:
    torch.testing.assert_close(m.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(m.running_var, ref.running_var, **tol)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# Batch renorm


@pytest.mark.parametrize("idx, torch_cls, shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_renorm_without_correction_is_batch_norm(idx, torch_cls, shape, momentum):
    torch.manual_seed(1)
    c = shape[1]
    m = RENORMS[idx](c, momentum=momentum, r_max=1.0, d_max=0.0)
    ref = torch_cls(c, momentum=momentum)
    _randomize(m, ref)
    for step in range(4):
        x = torch.randn(shape) * (1 + step) + step
        g = torch.randn(shape)
        _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[torch.float32])
        _assert_same_buffers(m, ref, **TOL[torch.float32])
    m.eval()
    ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), ref(x), **TOL[torch.float32])


def test_renorm_default_schedule_starts_as_batch_norm():
    torch.manual_seed(2)
    m, ref = BatchRenorm2d(3), nn.BatchNorm2d(3)
    _randomize(m, ref)
    for _ in range(3):
        x, g = torch.randn(4, 3, 3, 3) * 3 + 1, torch.randn(4, 3, 3, 3)
        _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[torch.float32])
    _assert_same_buffers(m, ref, **TOL[torch.float32])
    assert m.limits() == (1.0, 0.0)


def _renorm_np(x, weight, bias, running_mean, running_var, eps, r_max, d_max, momentum):
    """Float64 batch renorm forward (Ioffe 2017, Alg. 1) and the updated running statistics."""
    x = np.asarray(x, np.float64)
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mean - running_mean) / sigma, -d_max, d_max)
    x_hat = (x - mean.reshape(shape)) / sigma_b.reshape(shape)
    y = weight.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + bias.reshape(shape)
    m = x.size // x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    return y, new_mean, new_var, r, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_matches_numpy_oracle_with_active_clipping(dtype):
    torch.manual_seed(3)
    c = 4
    m = BatchRenorm2d(c, r_max=1.5, d_max=0.5, momentum=0.2, dtype=dtype, **CONSTANT)
    _randomize(m)
    # Channel 0: both corrections inside their clips; 1: r clipped high, d clipped low;
    # 2: r clipped low; 3: d clipped high.
    rm = torch.tensor([0.1, 2.0, 0.0, -3.0], dtype=dtype)
    rv = torch.tensor([1.2, 0.1, 9.0, 1.0], dtype=dtype)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    x = torch.randn(6, c, 3, 3, dtype=dtype)
    y = m(x)
    w, b = m.weight.detach().double().numpy(), m.bias.detach().double().numpy()
    y_np, mean_np, var_np, r, d = _renorm_np(
        x.double().numpy(), w, b, rm.double().numpy(), rv.double().numpy(), m.eps, 1.5, 0.5, 0.2
    )
    assert 1 / 1.5 < r[0] < 1.5 and -0.5 < d[0] < 0.5
    assert r[1] == 1.5 and d[1] == -0.5 and r[2] == 1 / 1.5 and d[3] == 0.5
    tol = TOL[dtype]
    torch.testing.assert_close(y, torch.from_numpy(y_np).to(dtype), **tol)
    torch.testing.assert_close(m.running_mean, torch.from_numpy(mean_np).to(dtype), **tol)
    torch.testing.assert_close(m.running_var, torch.from_numpy(var_np).to(dtype), **tol)


def _renorm_autograd_reference(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Batch renorm through plain differentiable float64 ops, r and d detached."""
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    sigma_b = (var + eps).sqrt()
    sigma = (running_var + eps).sqrt().view(shape)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean.view(shape)) / sigma).clamp(-d_max, d_max).detach()
    return weight.view(shape) * ((x - mean) / sigma_b * r + d) + bias.view(shape)


@pytest.mark.parametrize("shape", [(7, 3), (5, 3, 4, 3)])
def test_renorm_gradients_match_autograd_reference(shape):
    torch.manual_seed(4)
    c = shape[1]
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    m = cls(c, r_max=2.0, d_max=1.0, dtype=torch.float64, **CONSTANT)
    _randomize(m)
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.5, torch.rand(c, dtype=torch.float64) + 0.5
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    x = torch.randn(shape, dtype=torch.float64) * 1.3 + 0.2
    g = torch.randn(shape, dtype=torch.float64)
    out, gx, gw, gb = _step(m, x, g)

    xr = x.clone().requires_grad_(True)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    ref = _renorm_autograd_reference(xr, w, b, rm, rv, m.eps, 2.0, 1.0)
    ref.backward(g)
    tol = TOL[torch.float64]
    _assert_close_all((out, gx, gw, gb), (ref.detach(), xr.grad, w.grad, b.grad), **tol)


def test_renorm_gradcheck_with_saturated_clips():
    # With every r and d pinned at a clip bound they are locally constant, so finite differences
    # see exactly the function whose gradient the layer claims; momentum=0 keeps the running
    # statistics (and so r, d) fixed across gradcheck's evaluations.
    torch.manual_seed(5)
    c = 3
    m = BatchRenorm2d(c, momentum=0.0, r_max=1.2, d_max=0.3, dtype=torch.float64, **CONSTANT)
    with torch.no_grad():
        m.running_mean.fill_(10.0)
        m.running_var.fill_(1e-2)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    x = torch.randn(4, c, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))
    torch.testing.assert_close(m.running_mean, torch.full((c,), 10.0, dtype=torch.float64))


def test_renorm_affine_false_and_no_bias():
    torch.manual_seed(6)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    rm, rv = torch.tensor([0.5, -0.5, 0.0]), torch.tensor([0.5, 2.0, 1.0])
    plain = BatchRenorm1d(3, affine=False, r_max=1.4, d_max=0.2, dtype=torch.float64, **CONSTANT)
    nobias = BatchRenorm1d(3, bias=False, r_max=1.4, d_max=0.2, dtype=torch.float64, **CONSTANT)
    for m in (plain, nobias):
        with torch.no_grad():
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
    w = torch.ones(3, dtype=torch.float64)
    ref = _renorm_autograd_reference(x, w, 0 * w, rm.double(), rv.double(), 1e-5, 1.4, 0.2)
    torch.testing.assert_close(plain(x), ref, **TOL[torch.float64])
    torch.testing.assert_close(nobias(x), ref, **TOL[torch.float64])
    assert nobias.bias is None


def test_renorm_eval_uses_running_statistics():
    torch.manual_seed(7)
    m, ref = BatchRenorm2d(3, **CONSTANT), nn.BatchNorm2d(3)
    _randomize(m, ref)
    m.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for b in (m, ref):
            b.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
            b.running_var.copy_(torch.tensor([0.5, 3.0, 1.5]))
    m.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x), **TOL[torch.float32])


def test_renorm_schedule_values():
    assert renorm_limits(0) == (1.0, 0.0)
    assert renorm_limits(4999) == (1.0, 0.0)
    assert renorm_limits(5000) == (1.0, 0.0)
    r, d = renorm_limits(22500)  # halfway up r's ramp, 7/8 of d's
    assert r == pytest.approx(2.0) and d == pytest.approx(4.375)
    assert renorm_limits(25000) == (pytest.approx(1 + 2 * 20 / 35), 5.0)
    assert renorm_limits(40000) == (3.0, 5.0)
    assert renorm_limits(10**6) == (3.0, 5.0)
    assert renorm_limits(3, r_max=2, d_max=1, warmup_steps=3, r_max_ramp_steps=0,
                         d_max_ramp_steps=0) == (2.0, 1.0)


def test_renorm_schedule_step_is_num_batches_tracked():
    seen: list[int] = []

    def schedule(step: int) -> tuple[float, float]:
        seen.append(step)
        return 1.0 + step, 0.5 * step

    m = BatchRenorm1d(2, schedule=schedule)
    x = torch.randn(4, 2)
    for _ in range(3):
        m(x)
    assert seen == [0, 1, 2]
    assert m.limits() == (4.0, 1.5)
    m.eval()
    m(x)
    assert int(m.num_batches_tracked) == 3 and seen[-1] == 3  # eval: only limits() above
    assert "schedule=schedule" in repr(m)


def test_renorm_state_dict_is_batch_norms():
    torch.manual_seed(8)
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    m = BatchRenorm2d(3)
    m.load_state_dict(bn.state_dict(), strict=True)
    assert m.state_dict().keys() == bn.state_dict().keys()
    back = nn.BatchNorm2d(3)
    back.load_state_dict(m.state_dict(), strict=True)
    for k, t in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], t)


def test_renorm_errors():
    with pytest.raises(ValueError, match=r"r_max=0\.5 must be finite and >= 1"):
        BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max=-1\.0 must be finite and >= 0"):
        BatchRenorm2d(3, d_max=-1.0)
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="warmup_steps=-1 must be an integer >= 0"):
        BatchRenorm2d(3, warmup_steps=-1)
    with pytest.raises(TypeError, match="schedule must be a callable"):
        BatchRenorm2d(3, schedule=3.0)
    m = BatchRenorm1d(2, schedule=lambda step: (0.9, 0.0))
    with pytest.raises(ValueError, match=r"schedule at step 0\): r_max=0.9"):
        m(torch.randn(4, 2))
    assert int(m.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        BatchRenorm1d(2)(torch.randn(1, 2))
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchRenorm2d(2)(torch.randn(3, 2))


# ---------------------------------------------------------------------------------------------
# Ghost batch norm


def _ghost_oracle(ref: nn.Module, x: torch.Tensor, vbs: int):
    """Per-chunk torch batch norm from the same starting state, sharing ref's parameters.

    Returns the concatenated output and sets ref's running statistics to the chunk updates
    averaged with weights proportional to chunk size.
    """
    outs, means, vars_, sizes = [], [], [], []
    for chunk in x.split(vbs):
        rm, rv = ref.running_mean.clone(), ref.running_var.clone()
        momentum = ref.momentum
        if momentum is None:
            momentum = 1.0 / float(ref.num_batches_tracked + 1)
        outs.append(
            torch.nn.functional.batch_norm(chunk, rm, rv, ref.weight, ref.bias, True, momentum,
                                           ref.eps)
        )
        means.append(rm)
        vars_.append(rv)
        sizes.append(chunk.shape[0])
    wts = torch.tensor(sizes, dtype=x.dtype) / sum(sizes)
    with torch.no_grad():
        ref.running_mean.copy_(sum(w * m for w, m in zip(wts, means)))
        ref.running_var.copy_(sum(w * v for w, v in zip(wts, vars_)))
        ref.num_batches_tracked.add_(1)
    return torch.cat(outs)


class _ChunkedBN(nn.Module):
    """The per-chunk oracle as a module, so the _step helper drives both sides the same way."""

    def __init__(self, c: int, vbs: int, momentum: float | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c, momentum=momentum, dtype=dtype)
        self.vbs, self.num_features = vbs, c

    @property
    def weight(self):
        return self.bn.weight

    @property
    def bias(self):
        return self.bn.bias

    def forward(self, x):
        return _ghost_oracle(self.bn, x, self.vbs)


# vbs=1 on an (N, C) input is one value per channel: test_ghost_rejects_one_value_per_channel.
GHOST_CASES = [(*case, vbs) for case in SHAPES for vbs in (1, 2, 3) if len(case[2]) > 2 or vbs > 1]


@pytest.mark.parametrize("idx, torch_cls, shape, vbs", GHOST_CASES)
def test_ghost_matches_per_chunk_batch_norm(idx, torch_cls, shape, vbs):
    c = shape[1]
    torch.manual_seed(9)
    dtype = torch.float64
    m = GHOSTS[idx](c, vbs, momentum=0.3, dtype=dtype)
    ref = _ChunkedBN(c, vbs, 0.3, dtype)
    _randomize(m, ref.bn)
    for step in range(3):
        x = torch.randn(shape, dtype=dtype) * 2 + step
        g = torch.randn(shape, dtype=dtype)
        _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[dtype])
        _assert_same_buffers(m, ref.bn, **TOL[dtype])


def test_ghost_uneven_last_chunk_and_cumulative_momentum():
    torch.manual_seed(10)
    m = GhostBatchNorm2d(3, 4, momentum=None)
    ref = _ChunkedBN(3, 4, None, torch.float32)
    _randomize(m, ref.bn)
    for n in (10, 7, 9):  # last chunks of 2, 3 and 1 samples (1 sample still has 6 values)
        x, g = torch.randn(n, 3, 2, 3), torch.randn(n, 3, 2, 3)
        _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[torch.float32])
        _assert_same_buffers(m, ref.bn, **TOL[torch.float32])


@pytest.mark.parametrize("idx, torch_cls, shape", SHAPES)
@pytest.mark.parametrize("extra", [0, 5])
def test_ghost_with_one_chunk_is_batch_norm(idx, torch_cls, shape, extra):
    torch.manual_seed(11)
    c = shape[1]
    m = GHOSTS[idx](c, shape[0] + extra)
    ref = torch_cls(c)
    _randomize(m, ref)
    for _ in range(3):
        x, g = torch.randn(shape) * 2 - 1, torch.randn(shape)
        _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[torch.float32])
        _assert_same_buffers(m, ref, **TOL[torch.float32])
    m.eval()
    ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), ref(x), **TOL[torch.float32])


def test_ghost_eval_and_untracked_statistics():
    torch.manual_seed(12)
    m = GhostBatchNorm1d(3, 2, track_running_stats=False)
    ref = nn.BatchNorm1d(3, track_running_stats=False)
    _randomize(m, ref)
    x = torch.randn(8, 3)
    chunks = torch.cat([torch.nn.functional.batch_norm(
        c, None, None, ref.weight, ref.bias, True, 0.0, ref.eps) for c in x.split(2)])
    torch.testing.assert_close(m(x), chunks, **TOL[torch.float32])
    m.eval()
    ref.eval()
    # Without running statistics, evaluation normalizes with the whole batch, as BatchNorm does.
    torch.testing.assert_close(m(x), ref(x), **TOL[torch.float32])
    assert m.running_mean is None and m.num_batches_tracked is None


def test_ghost_rejects_one_value_per_channel():
    m = GhostBatchNorm1d(3, 2)
    with pytest.raises(ValueError, match="the last virtual batch holds 1 sample"):
        m(torch.randn(5, 3))
    with pytest.raises(ValueError, match="virtual batch holds 1 sample"):
        GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    assert int(m.num_batches_tracked) == 0  # a rejected call changes no state
    torch.testing.assert_close(m.running_mean, torch.zeros(3))
    with pytest.raises(ValueError, match="virtual_batch_size=0 must be a positive integer"):
        GhostBatchNorm2d(3, 0)


def test_ghost_state_dict_is_batch_norms():
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(3, 4, 2, 2))
    m = GhostBatchNorm2d(4, 8)
    m.load_state_dict(bn.state_dict(), strict=True)
    bn.load_state_dict(m.state_dict(), strict=True)
    assert "virtual_batch_size=8" in repr(m)


def test_ghost_channels_last_input():
    torch.manual_seed(13)
    m, ref = GhostBatchNorm2d(3, 2), _ChunkedBN(3, 2, 0.1, torch.float32)
    _randomize(m, ref.bn)
    x = torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last)
    g = torch.randn(6, 3, 4, 5)
    _assert_close_all(_step(m, x, g), _step(ref, x, g), **TOL[torch.float32])


@pytest.mark.parametrize("make", [
    lambda: BatchRenorm2d(3, r_max=2.0, d_max=1.0, **CONSTANT),
    lambda: GhostBatchNorm2d(3, 2),
])
def test_nonfinite_batches_follow_batch_norm_policy(make):
    x = torch.randn(4, 3, 2, 2)
    x[3, 1, 0, 0] = float("nan")
    m = make()
    with pytest.raises(FloatingPointError, match=r"NaN or infinite in channel\(s\) \[1\]"):
        m(x)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(3))
    m.on_nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="running statistics were not updated"):
        m(x)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))
    m.on_nonfinite = "commit"
    m(x)
    assert int(m.num_batches_tracked) == 1 and m.running_mean[1].isnan()


@pytest.mark.parametrize("make", [
    lambda: BatchRenorm2d(3, r_max=2.0, d_max=1.0, **CONSTANT),
    lambda: GhostBatchNorm2d(3, 2),
])
def test_bfloat16_input_with_float32_parameters(make):
    torch.manual_seed(19)
    x = torch.randn(4, 3, 2, 2)
    m32, m16 = make(), make()
    for m in (m32, m16):
        m.running_var.fill_(0.3)
    xb = x.bfloat16().requires_grad_(True)
    y = m16(xb)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and m16.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), m32(x), atol=0.05, rtol=0.02)
    torch.testing.assert_close(m16.running_mean, m32.running_mean, atol=0.02, rtol=0.02)


# ---------------------------------------------------------------------------------------------
# Frozen batch norm


def _trained_bn(cls=nn.BatchNorm2d, shape=(6, 4, 3, 3), seed: int = 14, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    bn = cls(shape[1], **kwargs)
    if bn.affine:
        _randomize(bn, seed=seed)
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    return bn.eval()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, nnn.BatchNorm2d])
def test_frozen_equals_eval_batch_norm(bn_cls):
    bn = _trained_bn(bn_cls, eps=1e-3)
    before = {k: t.clone() for k, t in bn.state_dict().items()}
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert frozen.eps == 1e-3 and not bn.training and not frozen.training
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), **TOL[torch.float32])
    frozen.train()  # the mode changes nothing
    torch.testing.assert_close(frozen(x), bn(x), **TOL[torch.float32])
    scale, shift = frozen.scale_and_shift()
    torch.testing.assert_close(frozen(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    for k, t in bn.state_dict().items():
        assert torch.equal(t, before[k])


def test_frozen_loads_batch_norm_state_dict_both_ways():
    bn = _trained_bn()
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), **TOL[torch.float32])
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    back = nn.BatchNorm2d(4).eval()
    back.load_state_dict(frozen.state_dict(), strict=True)
    torch.testing.assert_close(back(x), bn(x), **TOL[torch.float32])
    assert int(back.num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="Missing key"):
        FrozenBatchNorm2d(4).load_state_dict({"weight": torch.ones(4)}, strict=True)


def test_frozen_gradients():
    bn = _trained_bn()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn).double()
    assert list(frozen.parameters()) == []
    assert all(not b.requires_grad for b in frozen.buffers())
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    frozen(x).backward(g)
    scale, _ = frozen.scale_and_shift()
    torch.testing.assert_close(x.grad, g * scale.view(1, -1, 1, 1), **TOL[torch.float64])
    assert all(b.grad is None for b in frozen.buffers())
    assert torch.autograd.gradcheck(frozen, (x,))


@pytest.mark.parametrize("cls, bn_cls, shape", [
    (FrozenBatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (FrozenBatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (FrozenBatchNorm3d, nn.BatchNorm3d, (4, 4, 2, 2, 3)),
])
def test_frozen_other_ranks(cls, bn_cls, shape):
    bn = _trained_bn(bn_cls, shape)
    x = torch.randn(shape)
    torch.testing.assert_close(cls.from_batchnorm(bn)(x), bn(x), **TOL[torch.float32])


def test_frozen_from_non_affine_batch_norm():
    bn = _trained_bn(affine=False)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert torch.equal(frozen.weight, torch.ones(4)) and torch.equal(frozen.bias, torch.zeros(4))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), **TOL[torch.float32])


def test_frozen_errors():
    with pytest.raises(ValueError, match="has no running statistics"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="expected a batch norm module, got Linear"):
        FrozenBatchNorm2d.from_batchnorm(nn.Linear(2, 2))
    frozen = FrozenBatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        frozen(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels in dim 1"):
        frozen(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match="eps=0 must be finite and > 0"):
        FrozenBatchNorm2d(3, eps=0)
    assert repr(frozen) == "FrozenBatchNorm2d(3, eps=1e-05)"


# ---------------------------------------------------------------------------------------------
# Weight-standardized convolution


def _ws_reference(conv: WSConv2d, x: torch.Tensor) -> torch.Tensor:
    w = conv.weight.detach().double().numpy()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    var = flat.var(axis=1, keepdims=True)
    w_hat = torch.from_numpy(((flat - mean) / np.sqrt(var + conv.eps)).reshape(w.shape))
    bias = None if conv.bias is None else conv.bias.detach().double()
    return torch.nn.functional.conv2d(
        x.double(), w_hat, bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


@pytest.mark.parametrize("kwargs", [
    {"padding": 1},
    {"groups": 2, "bias": False, "stride": 2},
    {"dilation": 2, "padding": "same"},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ws_conv_matches_float64_reference(kwargs, dtype):
    torch.manual_seed(15)
    conv = WSConv2d(4, 6, 3, dtype=dtype, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(5).add_(torch.randn(6, 1, 1, 1, dtype=dtype))  # offsets and scales
    x = torch.randn(2, 4, 7, 7, dtype=dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(conv(x).double(), _ws_reference(conv, x), **tol)
    w_hat = conv.standardized_weight()
    torch.testing.assert_close(w_hat.mean((1, 2, 3)), torch.zeros(6, dtype=dtype),
                               atol=1e-6, rtol=0)


def test_ws_conv_gradcheck_through_standardization():
    torch.manual_seed(16)
    conv = WSConv2d(2, 3, 2, groups=1, dtype=torch.float64)

    def f(x, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x,))

    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)


def test_ws_conv_is_invariant_to_filter_scale_and_offset():
    torch.manual_seed(17)
    conv = WSConv2d(3, 4, 3, dtype=torch.float64, eps=1e-12)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([2.0, 0.5, 7.0, 1.0]).view(4, 1, 1, 1, ).double())
        conv.weight.add_(torch.tensor([1.0, -3.0, 0.0, 10.0]).view(4, 1, 1, 1).double())
    torch.testing.assert_close(conv(x), y, atol=1e-8, rtol=1e-8)


def test_ws_conv_with_group_norm_is_independent_of_the_batch():
    # The paper's pairing: WS + GN has no batch statistics, so training at batch 1 sees the same
    # function as at batch 4 (a batch norm in training mode would not).
    torch.manual_seed(18)
    model = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nnn.GroupNorm(4, 8), nn.ReLU()).train()
    x = torch.randn(4, 3, 6, 6)
    one = x[:1].clone().requires_grad_(True)
    model(one).sum().backward()
    torch.testing.assert_close(model(x)[:1], model(x[:1]), **TOL[torch.float32])
    assert one.grad is not None and torch.isfinite(one.grad).all()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_ws_conv_state_dict_and_errors():
    conv = WSConv2d(3, 4, 3, eps=1e-6)
    plain = nn.Conv2d(3, 4, 3)
    plain.load_state_dict(conv.state_dict(), strict=True)
    assert repr(conv).endswith("eps=1e-06)")
    with pytest.raises(ValueError, match=r"eps=-1\.0 must be finite and > 0"):
        WSConv2d(3, 4, 3, eps=-1.0)
