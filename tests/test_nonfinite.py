"""Non-finite inputs: propagated in outputs, never committed to running statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normlab.functional as F
import normlab.nn as nnl


def _poisoned(shape=(4, 3, 5), channel=1, value=math.nan):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, channel, 0] = value
    return x


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls", [nnl.BatchNorm1d, nnl.InstanceNorm1d])
def test_default_refuses_the_batch_and_names_the_channel(cls, value):
    m = cls(3, track_running_stats=True)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"channel\(s\) \[1\] \(1 of 3\); the running statistics were not updated"):
        m(_poisoned(value=value))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_skip_warns_keeps_buffers_and_propagates_nan_in_the_output():
    m = nnl.BatchNorm1d(3, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="were not updated"):
        out = m(_poisoned())
    assert torch.isnan(out[:, 1]).all()  # the poisoned channel's statistics are NaN: never masked
    assert torch.isfinite(out[:, [0, 2]]).all()  # other channels unaffected
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.running_mean, torch.zeros(3))


def test_commit_reproduces_torch_and_the_helper_finds_the_damage():
    model = nn.Sequential(nn.Linear(3, 3), nnl.BatchNorm1d(3, on_nonfinite="commit"))
    x = torch.randn(4, 3)
    x[0, 0] = math.nan
    model(x)
    assert nnl.nonfinite_buffers(model) == ["1.running_mean", "1.running_var"]
    assert nnl.nonfinite_buffers(nn.Sequential(nnl.BatchNorm1d(3))) == []


def test_per_sample_norms_keep_nonfinite_values_within_their_sample():
    x = torch.randn(3, 8)
    x[1, 2] = math.inf
    for out in (F.layer_norm(x, (8,)), F.rms_norm(x, (8,)), F.group_norm(x.view(3, 8, 1), 2).view(3, 8)):
        assert torch.isfinite(out[[0, 2]]).all()
        assert not torch.isfinite(out[1]).all()


def test_float16_running_statistics_saturate_instead_of_overflowing():
    m = nnl.BatchNorm1d(4, momentum=1.0).half()
    x = (torch.randn(64, 4) * 1000).half()  # variance ~1e6, beyond float16's 65504
    out = m(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.isfinite(m.running_var).all()
    assert (m.running_var == torch.finfo(torch.float16).max).all()
    # float32 buffers with float16 input (mixed precision) hold the true value.
    m32 = nnl.BatchNorm1d(4, momentum=1.0)
    F.batch_norm(x, m32.running_mean, m32.running_var, training=True, momentum=1.0)
    torch.testing.assert_close(m32.running_var, x.float().var(0), rtol=1e-3, atol=0)


def test_invalid_policy_is_rejected():
    with pytest.raises(ValueError, match=r"on_nonfinite='ignore' must be one of"):
        nnl.BatchNorm2d(3, on_nonfinite="ignore")


def test_fused_batch_norm_act_refuses_nonfinite_batches_too():
    m = nnl.BatchNormAct2d(3, activation="relu")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    x[0, 2, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"channel\(s\) \[2\]"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.on_nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="were not updated"):
        m(x)
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize(("make", "shape"), [
    (lambda: nnl.BatchNorm1d(3, on_nonfinite="mask"), (4, 3, 5)),
    (lambda: nnl.BatchNormAct2d(3, activation="relu", on_nonfinite="mask"), (4, 3, 5, 2)),
    (lambda: nnl.BatchRenorm1d(3, on_nonfinite="mask"), (4, 3, 5)),
    (lambda: nnl.GhostBatchNorm1d(3, virtual_batch_size=2, on_nonfinite="mask"), (4, 3, 5)),
])
def test_mask_drops_a_nonfinite_batch_silently_and_matches_error_on_finite_ones(make, shape,
                                                                                recwarn):
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(_poisoned(shape))
    assert torch.isnan(out[:, 1]).any()  # the output still carries the NaN
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # buffers and counter untouched
    assert not [w for w in recwarn if "not updated" in str(w.message)]
    # On finite batches "mask" commits exactly what the default does.
    ref = make()
    ref.on_nonfinite = "error"
    for seed in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert m.num_batches_tracked.item() == 3


def test_meta_tensors_read_nothing_back():
    # Meta tensors have no values (deferred init, FSDP): nothing may be read back from them, as a
    # device sync would stall a GPU. "mask" never reads back; the default policy, which does on
    # real tensors, turns its check into an in-graph assertion on a tensor without values.
    x = torch.randn(4, 3, 5, 5, device="meta")
    for policy in ("mask", "error", "skip"):
        m = nnl.BatchNorm2d(3, on_nonfinite=policy).to("meta")
        assert m(x).shape == x.shape
        assert m.num_batches_tracked.device.type == "meta"


def test_mask_saturates_half_precision_buffers():
    m = nnl.BatchNorm1d(2, on_nonfinite="mask").half()
    x = torch.tensor([[6e4, 0.0], [-6e4, 1.0]], dtype=torch.float16)
    m(x)
    assert torch.isfinite(m.running_var).all() and m.num_batches_tracked.item() == 1


def test_huge_but_finite_statistics_are_not_mistaken_for_nonfinite():
    # Per-channel variances near 1e35 are finite (and far from overflowing their own sums), but
    # 8192 of them sum past float32's largest value: a healthy batch that a check on the sum of
    # the statistics alone would refuse.
    m = nnl.BatchNorm1d(8192)
    x = torch.randn(32, 8192, generator=torch.Generator().manual_seed(0)) * 3e17
    out = m(x)
    assert torch.isfinite(out).all()
    assert torch.isfinite(m.running_var).all() and m.num_batches_tracked.item() == 1
    assert m.running_var.min() > 1e33
    assert not torch.isfinite(x.var(0).sum())  # the premise: the batch variances' sum overflows
