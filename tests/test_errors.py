"""Every documented error: the right exception type and a message that names the problem."""

from __future__ import annotations

import math

import pytest
import torch

import normlab.functional as F
import normlab.nn as nnl


@pytest.mark.parametrize(
    ("module", "x", "match"),
    [
        (nnl.BatchNorm1d(3), torch.randn(2, 3, 4, 5), r"BatchNorm1d: expected 2D or 3D input \(got 4D"),
        (nnl.BatchNorm2d(3), torch.randn(2, 3, 4), r"BatchNorm2d: expected 4D input \(got 3D"),
        (nnl.BatchNorm3d(3), torch.randn(2, 3, 4, 4), r"expected 5D input"),
        (nnl.BatchNorm2d(3), torch.randn(2, 4, 5, 5), r"expected 3 channels in dim 1 \(num_features\), got input of shape \[2, 4, 5, 5\]"),
        (nnl.BatchNorm1d(3), torch.randn(1, 3), r"more than 1 value per channel when training"),
        (nnl.BatchNorm2d(3), torch.randn(1, 3, 1, 1), r"more than 1 value per channel when training"),
        (nnl.InstanceNorm2d(3), torch.randn(2, 3, 1, 1), r"more than 1 spatial element when training"),
        (nnl.InstanceNorm2d(3), torch.randn(2, 3), r"expected 3D \(unbatched\) or 4D \(batched\)"),
        (nnl.InstanceNorm1d(3, affine=True), torch.randn(2, 4, 5), r"size at dim=1 to match num_features \(3\)"),
        (nnl.LayerNorm((4, 5)), torch.randn(2, 5, 4), r"trailing dimensions are \[4, 5\], got shape \[2, 5, 4\]"),
        (nnl.RMSNorm(4), torch.randn(4, 3), r"trailing dimensions are \[4\]"),
        (nnl.GroupNorm(2, 4), torch.randn(2, 6, 3), r"expected an \(N, 4, \*\) input"),
    ],
)
def test_wrong_input_shapes_raise_value_error(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.batch_norm(x, None, None, training=True),
        lambda x: F.layer_norm(x, (4,)),
        lambda x: F.group_norm(x, 2),
        lambda x: F.instance_norm(x),
        lambda x: F.rms_norm(x, (4,)),
        lambda x: nnl.BatchNorm1d(4)(x),
        lambda x: nnl.GroupNorm(2, 4)(x),
    ],
)
def test_non_float_dtypes_raise_type_error_naming_the_dtype(fn, dtype):
    x = torch.ones(2, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"floating-point input, got dtype {dtype}"):
        fn(x)


def test_group_count_must_divide_channels_at_construction():
    with pytest.raises(ValueError, match=r"num_channels=6 is not divisible by num_groups=4"):
        nnl.GroupNorm(4, 6)
    with pytest.raises(ValueError, match=r"num_channels=6 is not divisible by num_groups=4"):
        F.group_norm(torch.randn(2, 6, 3), 4)


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.nan, math.inf])
@pytest.mark.parametrize("ctor", [nnl.BatchNorm2d, nnl.InstanceNorm1d, lambda c, eps: nnl.GroupNorm(1, c, eps), nnl.LayerNorm, nnl.RMSNorm])
def test_eps_must_be_finite_and_positive(ctor, eps):
    with pytest.raises(ValueError, match=r"eps=.* must be finite and > 0"):
        ctor(4, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan])
def test_momentum_must_be_in_unit_interval(momentum):
    with pytest.raises(ValueError, match=r"momentum=.* must be in \[0, 1\]"):
        nnl.BatchNorm1d(3, momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum=.* must be in \[0, 1\]"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match=r"num_features=.* must be a positive integer"):
        nnl.BatchNorm1d(bad)
    with pytest.raises(ValueError, match=r"num_groups=.* must be a positive integer"):
        nnl.GroupNorm(bad, 4)


def test_normalized_shape_must_be_non_empty_and_positive():
    with pytest.raises(ValueError, match="normalized_shape must be non-empty"):
        nnl.LayerNorm([])
    with pytest.raises(ValueError, match="positive sizes"):
        nnl.RMSNorm([3, 0])


def test_accepted_normalized_shapes_are_remembered_as_ints():
    from normlab.functional import _validate as v

    assert v.as_normalized_shape("op", (5, 7)) == (5, 7)
    again = v.as_normalized_shape("op", (5.0, 7))  # equal to a remembered shape
    assert again == (5, 7) and all(type(s) is int for s in again)
    with pytest.raises(TypeError, match="must be an int or a sequence of ints"):
        v.as_normalized_shape("op", ([5], 7))
    with pytest.raises(ValueError, match="positive sizes"):
        v.as_normalized_shape("op", (5, -7))


def test_parameter_shape_dtype_and_device_mismatch():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), expected \(3,\)"):
        F.batch_norm(x, None, None, torch.ones(4), None, True)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64 but the input has dtype torch.float32"):
        F.layer_norm(x, (3,), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight is on meta but the input is on cpu"):
        F.rms_norm(x, (3,), torch.ones(3, device="meta"))


def test_eval_without_running_stats_is_an_error():
    with pytest.raises(ValueError, match="running_mean and running_var are None"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(ValueError, match="give both running_mean and running_var"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_rejected_call_leaves_state_untouched():
    m = nnl.BatchNorm2d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(2, 4, 3, 3), torch.ones(2, 3, 2, 2, dtype=torch.long)):
        with pytest.raises((ValueError, TypeError)):
            m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
