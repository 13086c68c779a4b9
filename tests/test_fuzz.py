"""Property-based fuzzing (issue 7): random shapes (size-0 and size-1 dims included), dtypes,
flags, eps and momentum thrown at every functional op and module. Each call either raises a
documented error or returns finite values that match the float64 NumPy oracle.

NORMLAB_HYPOTHESIS_EXAMPLES raises the example count for a deeper run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab.functional as F
import normlab.nn as nnl
from reference import batch_norm_np, group_norm_np, instance_norm_np, layer_norm_np, rms_norm_np

DOCUMENTED = (ValueError, TypeError)
dims = st.lists(st.integers(0, 4), min_size=1, max_size=5)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
eps_values = st.one_of(st.sampled_from([1e-5, 1e-3, 1.0]), st.floats(allow_nan=True, allow_infinity=True))
momenta = st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(math.nan))
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _input(shape, dtype, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 1
    return x.to(dtype)


def _check(out, oracle, x):
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    if out.numel():
        # Scale the tolerance with the largest output value (low-precision rounding is relative).
        tol = TOL[x.dtype] * max(1.0, float(np.abs(oracle).max()))
        np.testing.assert_allclose(out.double().numpy(), oracle, atol=tol, rtol=TOL[x.dtype])


def _call(fn):
    try:
        return fn(), None
    except DOCUMENTED as err:
        return None, err


@given(dims, dtypes, eps_values, st.booleans(), st.integers(0, 2**16))
def test_fuzz_batch_norm(shape, dtype, eps, training, seed):
    x = _input(shape, dtype, seed) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    c = shape[1] if len(shape) > 1 else 0
    rm, rv = torch.zeros(c), torch.ones(c)
    out, err = _call(lambda: F.batch_norm(x, rm, rv, training=training, eps=eps))
    if err is not None:
        return
    assert len(shape) >= 2 and dtype.is_floating_point and eps > 0 and math.isfinite(eps)
    if training and x.numel():
        xd = x.double().numpy()
        _check(out, batch_norm_np(xd, None, None, eps), x)
        assert torch.isfinite(rm).all() and torch.isfinite(rv).all()
    assert x.numel() // max(c, 1) != 1 or not training or c == 0


@given(dims, dtypes, eps_values, st.integers(1, 3), st.integers(0, 2**16))
def test_fuzz_layer_and_rms_norm(shape, dtype, eps, k, seed):
    x = _input(shape, dtype, seed) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    normalized = tuple(shape[-k:])
    out, err = _call(lambda: F.layer_norm(x, normalized, eps=eps))
    if err is None:
        if x.numel():
            _check(out, layer_norm_np(x.double().numpy(), len(normalized), None, None, eps), x)
    else:
        assert not dtype.is_floating_point or not (eps > 0 and math.isfinite(eps)) or 0 in normalized or k > len(shape)
    out, err = _call(lambda: F.rms_norm(x, normalized, eps=eps))
    if err is None and x.numel():
        _check(out, rms_norm_np(x.double().numpy(), len(normalized), None, eps), x)


@given(dims, dtypes, st.integers(-1, 4), st.integers(0, 2**16))
def test_fuzz_group_and_instance_norm(shape, dtype, groups, seed):
    x = _input(shape, dtype, seed) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    out, err = _call(lambda: F.group_norm(x, groups))
    if err is None:
        assert groups > 0 and shape[1] % groups == 0
        if x.numel():
            _check(out, group_norm_np(x.double().numpy(), groups, None, None, 1e-5), x)
    out, err = _call(lambda: F.instance_norm(x))
    if err is None:
        assert len(shape) >= 3
        if x.numel():
            _check(out, instance_norm_np(x.double().numpy(), None, None, 1e-5), x)


@given(st.integers(-1, 5), eps_values, momenta, st.booleans(), st.booleans())
def test_fuzz_module_construction(features, eps, momentum, affine, track):
    for ctor in (
        lambda: nnl.BatchNorm1d(features, eps, momentum, affine, track),
        lambda: nnl.InstanceNorm1d(features, eps, 0.1 if momentum is None else momentum, affine, track),
        lambda: nnl.GroupNorm(1, features, eps, affine),
        lambda: nnl.LayerNorm(features, eps, affine),
        lambda: nnl.RMSNorm(features, eps, affine),
    ):
        _module, err = _call(ctor)
        if err is None:
            assert features > 0 and eps > 0 and math.isfinite(eps)
        else:
            assert str(err)  # every rejection explains itself


@given(st.lists(st.integers(0, 4), min_size=2, max_size=4), st.sampled_from([None, 0.0, 0.3, 1.0]),
       st.integers(0, 2**16))
def test_fuzz_batch_norm_module_steps_keep_state_finite(shape, momentum, seed):
    m = nnl.BatchNorm1d(shape[1] if shape[1] else 1, momentum=momentum) if len(shape) <= 3 else nnl.BatchNorm2d(max(shape[1], 1), momentum=momentum)
    x = _input(shape, torch.float32, seed)
    before = int(m.num_batches_tracked)
    out, err = _call(lambda: m(x))
    if err is not None:
        assert int(m.num_batches_tracked) == before
        return
    assert torch.isfinite(out).all()
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    assert int(m.num_batches_tracked) == before + (1 if x.numel() else 0)
