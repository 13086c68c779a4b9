"""Numeric edge cases and exact properties (claim C15: the invariances of LN/GN/IN/RMS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import normlab.functional as F
import normlab.nn as nnl
from reference import batch_norm_np, group_norm_np, instance_norm_np, layer_norm_np, rms_norm_np


def _err(out, oracle):
    return (out.double() - oracle).abs().max().item()


@pytest.mark.parametrize(
    ("name", "shape"),
    [("batch_norm", (64, 8, 16, 16)), ("layer_norm", (16, 4096)), ("group_norm", (8, 32, 8, 8)),
     ("instance_norm", (4, 8, 32, 32)), ("rms_norm", (16, 4096))],
)
def test_large_offset_error_no_worse_than_torch(name, shape):
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    calls = {
        "batch_norm": (lambda f, t: f(t, None, None, training=True), F.batch_norm, TF.batch_norm),
        "layer_norm": (lambda f, t: f(t, (shape[-1],)), F.layer_norm, TF.layer_norm),
        "group_norm": (lambda f, t: f(t, 8), F.group_norm, TF.group_norm),
        "instance_norm": (lambda f, t: f(t), F.instance_norm, TF.instance_norm),
        "rms_norm": (lambda f, t: f(t, (shape[-1],)), F.rms_norm, TF.rms_norm),
    }
    call, ours, theirs = calls[name]
    oracle = call(theirs, x.double())
    err_ours, err_torch = _err(call(ours, x), oracle), _err(call(theirs, x), oracle)
    assert err_ours <= err_torch * 1.01 + 1e-6, (err_ours, err_torch)


def test_large_offset_error_does_not_grow_with_row_length():
    errors = []
    for n in (2**10, 2**14, 2**20):
        gen = torch.Generator().manual_seed(n)
        x = (1e4 + 0.01 * torch.randn(1, n, generator=gen, dtype=torch.float64)).float()
        errors.append(_err(F.layer_norm(x, (n,)), TF.layer_norm(x.double(), (n,))))
    # float32 cannot store the mean 1e4 closer than half an ulp (4.9e-4): relative to std 0.01
    # that bounds the error near 0.05 whatever the length; naive summation would grow with n.
    assert max(errors) < 0.1, errors


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
def test_constant_input_gives_beta_and_finite_grads(op):
    x = torch.full((4, 6, 5), 3.25, requires_grad=True)
    w = torch.rand(6 if op != "layer_norm" else 5) + 0.5
    b = torch.randn_like(w)
    w.requires_grad_()
    b.requires_grad_()
    out = {
        "batch_norm": lambda: F.batch_norm(x, None, None, w, b, True),
        "layer_norm": lambda: F.layer_norm(x, (5,), w, b),
        "group_norm": lambda: F.group_norm(x, 3, w, b),
        "instance_norm": lambda: F.instance_norm(x, weight=w, bias=b),
    }[op]()
    shape = (1, 6, 1) if op != "layer_norm" else (5,)
    torch.testing.assert_close(out, b.detach().view(shape).expand_as(out))
    out.backward(torch.randn_like(out))
    for t in (x, w, b):
        assert torch.isfinite(t.grad).all()
    # x_hat is exactly 0, so dL/dx = invstd * (g - mean(g)) and dL/dw = 0.
    torch.testing.assert_close(w.grad, torch.zeros_like(w))


def test_rms_norm_of_zeros_is_zero_not_nan():
    x = torch.zeros(3, 8, requires_grad=True)
    out = F.rms_norm(x, (8,))
    assert torch.equal(out, torch.zeros(3, 8))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 1.0, 1e6])
def test_tiny_and_huge_eps_match_numpy(eps):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    np.testing.assert_allclose(F.batch_norm(x, None, None, w, b, True, eps=eps).numpy(),
                               batch_norm_np(x.numpy(), w.numpy(), b.numpy(), eps), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(F.group_norm(x, 2, w, b, eps).numpy(),
                               group_norm_np(x.numpy(), 2, w.numpy(), b.numpy(), eps), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(F.instance_norm(x, weight=w, bias=b, eps=eps).numpy(),
                               instance_norm_np(x.numpy(), w.numpy(), b.numpy(), eps), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x, (3,), eps=eps).numpy(),
                               layer_norm_np(x.numpy(), 1, None, None, eps), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(F.rms_norm(x, (4, 3), eps=eps).numpy(),
                               rms_norm_np(x.numpy(), 2, None, eps), rtol=1e-9, atol=1e-12)


def test_batch_of_two_normalizes_to_plus_minus_one():
    x = torch.tensor([[1.0, -3.0], [5.0, 7.0]])
    out = F.batch_norm(x, None, None, training=True, eps=1e-12)
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32_and_returns_input_dtype(dtype):
    gen = torch.Generator().manual_seed(2)
    x32 = torch.randn(8, 16, 32, generator=gen) * 30 + 100  # sums overflow float16 range
    x = x32.to(dtype)
    w = torch.rand(16) + 0.5  # float32 parameters with low-precision input (mixed precision)
    rm, rv = torch.zeros(16), torch.ones(16)
    out = F.batch_norm(x, rm, rv, w, None, training=True)
    assert out.dtype == dtype and rm.dtype == torch.float32
    oracle = TF.batch_norm(x.double(), None, None, w.double(), None, True)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.double(), oracle, atol=tol * 3, rtol=tol)
    assert torch.isfinite(rv).all()
    torch.testing.assert_close(rm, 0.1 * x.double().mean((0, 2)).float(), atol=1e-2, rtol=1e-3)
    for fn in (lambda t: F.layer_norm(t, (32,)), lambda t: F.rms_norm(t, (32,)),
               lambda t: F.group_norm(t, 4), lambda t: F.instance_norm(t)):
        assert fn(x).dtype == dtype
        torch.testing.assert_close(fn(x).double(), fn(x.double()), atol=tol * 3, rtol=tol)


def test_empty_batch_gives_empty_output_and_leaves_state_alone():
    m = nnl.BatchNorm1d(3)
    x = torch.zeros(0, 3, requires_grad=True)
    out = m(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 3)
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))


# --- exact properties (claim C15) -----------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.sampled_from([2, 4, 6]), st.integers(2, 5))
scales = st.floats(0.01, 100.0)
shifts = st.floats(-100.0, 100.0)


@given(shapes, scales, shifts, st.integers(0, 10_000))
def test_layer_group_instance_norm_invariant_to_per_sample_affine(shape, scale, shift, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = x * scale + shift
    eps = 1e-30  # far below any variance drawn here, so eps cannot break the invariance
    torch.testing.assert_close(F.layer_norm(y, shape[1:], eps=eps), F.layer_norm(x, shape[1:], eps=eps), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(F.group_norm(y, 2, eps=eps), F.group_norm(x, 2, eps=eps), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(F.instance_norm(y, eps=eps), F.instance_norm(x, eps=eps), atol=1e-6, rtol=1e-6)


@given(shapes, scales, st.integers(0, 10_000))
def test_rms_norm_invariant_to_scaling_only(shape, scale, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(F.rms_norm(x * scale, shape[1:], eps=1e-14), F.rms_norm(x, shape[1:], eps=1e-14), atol=1e-6, rtol=1e-6)


@given(shapes, st.integers(0, 10_000))
def test_layer_norm_is_group_norm_with_one_group_and_instance_norm_is_group_norm_with_c(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(F.group_norm(x, 1), F.layer_norm(x, shape[1:]))
    torch.testing.assert_close(F.group_norm(x, shape[1]), F.instance_norm(x))


@given(st.integers(2, 6), st.integers(0, 10_000))
def test_batch_norm_is_equivariant_to_batch_permutation(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(F.batch_norm(x[perm], None, None, training=True),
                               F.batch_norm(x, None, None, training=True)[perm])


@given(shapes, st.integers(0, 10_000))
def test_outputs_have_zero_mean_unit_variance(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5 + 3
    y = F.layer_norm(x, shape[1:], eps=1e-12).flatten(1)
    torch.testing.assert_close(y.mean(1), torch.zeros(shape[0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(shape[0], dtype=torch.float64), atol=1e-6, rtol=0)


@given(st.lists(st.integers(0, 7), min_size=1, max_size=6), st.integers(0, 10_000))
def test_streaming_moments_merge_equals_two_pass(sizes, seed):
    from normlab.functional import Moments

    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(s, 3, generator=gen, dtype=torch.float64) * 2 + 1e3 for s in sizes]
    acc = Moments.empty((3,))
    for c in chunks:
        acc = acc.merge(Moments.of(c, [0]))
    data = torch.cat(chunks)
    if len(data) == 0:
        assert acc.count.item() == 0
        return
    torch.testing.assert_close(acc.mean, data.mean(0))
    torch.testing.assert_close(acc.var(0), data.var(0, unbiased=False))
