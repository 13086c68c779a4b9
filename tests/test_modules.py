"""normlab.nn against torch.nn: same contract (arguments, attributes, state_dict keys, repr,
resets) and same numbers over several training steps with train/eval switching."""

from __future__ import annotations

import io
import random

import pytest
import torch
from torch import nn

import normlab.nn as nnl

# (normlab class, torch class, constructor kwargs, input shape)
CASES = [
    (nnl.BatchNorm1d, nn.BatchNorm1d, dict(num_features=5), (6, 5)),
    (nnl.BatchNorm1d, nn.BatchNorm1d, dict(num_features=5, momentum=None), (4, 5, 7)),
    (nnl.BatchNorm1d, nn.BatchNorm1d, dict(num_features=5, affine=False), (3, 5, 2)),
    (nnl.BatchNorm2d, nn.BatchNorm2d, dict(num_features=3, eps=1e-3, momentum=0.3), (4, 3, 5, 6)),
    (nnl.BatchNorm2d, nn.BatchNorm2d, dict(num_features=3, track_running_stats=False), (2, 3, 4, 4)),
    (nnl.BatchNorm2d, nn.BatchNorm2d, dict(num_features=3, bias=False), (2, 3, 1, 3)),
    (nnl.BatchNorm3d, nn.BatchNorm3d, dict(num_features=2, momentum=None), (2, 2, 3, 2, 3)),
    (nnl.InstanceNorm1d, nn.InstanceNorm1d, dict(num_features=4), (3, 4, 9)),
    (nnl.InstanceNorm1d, nn.InstanceNorm1d, dict(num_features=4, affine=True), (4, 9)),
    (nnl.InstanceNorm2d, nn.InstanceNorm2d, dict(num_features=3, affine=True, track_running_stats=True), (2, 3, 5, 4)),
    (nnl.InstanceNorm2d, nn.InstanceNorm2d, dict(num_features=3, track_running_stats=True, momentum=0.5), (3, 5, 4)),
    (nnl.InstanceNorm3d, nn.InstanceNorm3d, dict(num_features=2, affine=True), (2, 2, 3, 3, 2)),
    (nnl.LayerNorm, nn.LayerNorm, dict(normalized_shape=7), (3, 7)),
    (nnl.LayerNorm, nn.LayerNorm, dict(normalized_shape=(4, 5), eps=1e-3), (2, 3, 4, 5)),
    (nnl.LayerNorm, nn.LayerNorm, dict(normalized_shape=[5], elementwise_affine=False), (5,)),
    (nnl.LayerNorm, nn.LayerNorm, dict(normalized_shape=6, bias=False), (2, 6)),
    (nnl.GroupNorm, nn.GroupNorm, dict(num_groups=2, num_channels=6), (3, 6, 4, 4)),
    (nnl.GroupNorm, nn.GroupNorm, dict(num_groups=3, num_channels=3, affine=False), (2, 3, 5)),
    (nnl.GroupNorm, nn.GroupNorm, dict(num_groups=1, num_channels=4, bias=False), (2, 4)),
    (nnl.RMSNorm, nn.RMSNorm, dict(normalized_shape=8), (3, 8)),
    (nnl.RMSNorm, nn.RMSNorm, dict(normalized_shape=[2, 3], eps=1e-6), (4, 2, 3)),
    (nnl.RMSNorm, nn.RMSNorm, dict(normalized_shape=4, elementwise_affine=False), (2, 5, 4)),
]
IDS = [f"{ours.__name__}-{kw}-{shape}" for ours, _, kw, shape in CASES]


def _pair(ours_cls, torch_cls, kwargs, dtype=torch.float64):
    torch.manual_seed(0)
    theirs = torch_cls(**kwargs, dtype=dtype)
    ours = ours_cls(**kwargs, dtype=dtype)
    # Non-trivial affine parameters, shared.
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize(("ours_cls", "torch_cls", "kwargs", "shape"), CASES, ids=IDS)
def test_contract_matches_torch(ours_cls, torch_cls, kwargs, shape):
    ours, theirs = ours_cls(**kwargs), torch_cls(**kwargs)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                 "normalized_shape", "elementwise_affine", "num_groups", "num_channels"):
        assert getattr(ours, name, "absent") == getattr(theirs, name, "absent"), name
    for name, t in theirs.state_dict().items():
        assert ours.state_dict()[name].dtype == t.dtype
        torch.testing.assert_close(ours.state_dict()[name], t)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "kwargs", "shape"), CASES, ids=IDS)
def test_training_steps_and_eval_match_torch(ours_cls, torch_cls, kwargs, shape):
    ours, theirs = _pair(ours_cls, torch_cls, kwargs)
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        train = step not in (2, 4)
        ours.train(train)
        theirs.train(train)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad)
        for (n1, p1), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, msg=n1)
        for (n1, b1), (_, b2) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(b1, b2, msg=n1)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "kwargs", "shape"), CASES, ids=IDS)
def test_state_dict_round_trips_both_ways(ours_cls, torch_cls, kwargs, shape):
    ours, theirs = _pair(ours_cls, torch_cls, kwargs)
    x = torch.randn(shape, dtype=torch.float64)
    theirs.train()
    theirs(x)  # moves running statistics
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    fresh = torch_cls(**kwargs, dtype=torch.float64)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), ours(x))


@pytest.mark.parametrize("cls", [nnl.BatchNorm2d, nnl.InstanceNorm2d])
def test_reset_running_stats_and_parameters(cls):
    m = cls(3, affine=True, track_running_stats=True)
    m.train()
    m(torch.randn(4, 3, 5, 5) * 3 + 1)
    with torch.no_grad():
        m.weight.fill_(2.0)
    m.reset_running_stats()
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))
    assert torch.equal(m.weight, torch.full((3,), 2.0))  # parameters untouched by this reset
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))


def test_momentum_none_is_cumulative_average():
    m = nnl.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(5, 2) * (i + 1) + i for i in range(4)]
    for b in batches:
        m(b)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(m.running_mean, expected_mean)
    torch.testing.assert_close(m.running_var, expected_var)
    assert m.num_batches_tracked.item() == 4


def test_running_var_is_bessel_corrected_while_batch_uses_biased():
    m = nnl.BatchNorm1d(1, momentum=1.0, affine=False)
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    y = m(x)
    biased = x.var(unbiased=False)
    torch.testing.assert_close(y, (x - x.mean()) / torch.sqrt(biased + m.eps))
    torch.testing.assert_close(m.running_var, x.var(unbiased=True).reshape(1))


def test_track_running_stats_false_uses_batch_stats_in_eval():
    m = nnl.BatchNorm1d(3, track_running_stats=False, affine=False).eval()
    x = torch.randn(8, 3) * 4 + 2
    torch.testing.assert_close(m(x), (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5))


def test_loads_pre_version_2_checkpoint_without_num_batches_tracked():
    old = nn.BatchNorm2d(3).state_dict()
    old.pop("num_batches_tracked")
    old._metadata = {"": {"version": 1}}
    m = nnl.BatchNorm2d(3)
    m.load_state_dict(old, strict=True)
    assert m.num_batches_tracked.item() == 0


def test_modules_inside_a_model_train_like_torch():
    def make(lib):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), lib.BatchNorm2d(4), nn.ReLU(),
                             lib.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                             lib.LayerNorm(8), nn.Linear(8, 3))

    a, b = make(nnl), make(nn)
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(6, 1, 8, 8, generator=gen)
        t = torch.randint(0, 3, (6,), generator=gen)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("make", [lambda: nnl.BatchNorm2d(3),
                                  lambda: nnl.BatchNormAct2d(3, activation="silu")],
                         ids=["BatchNorm2d", "BatchNormAct2d"])
def test_eval_graph_keeps_its_statistics_when_the_buffers_move_before_backward(make):
    # Eval-mode forwards hand the running buffers to the kernels without copying them; a graph
    # must still hold the statistics of its own forward, not the buffers' later values.
    torch.manual_seed(0)
    m = make().eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    want_out = m(x)
    want = torch.autograd.grad(want_out, [x, m.weight, m.bias], g)
    out = m(x)
    with torch.no_grad():  # the buffers move on (a train-mode step would) before backward
        m.running_mean.add_(3.0)
        m.running_var.mul_(5.0)
    got = torch.autograd.grad(out, [x, m.weight, m.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # inference reads the buffers as they are now, and leaves them alone
        before = (m.running_mean.clone(), m.running_var.clone())
        ref = nn.functional.batch_norm(x, before[0], before[1], m.weight, m.bias, False)
        if isinstance(m, nnl.BatchNormAct2d):
            ref = nn.functional.silu(ref)
        torch.testing.assert_close(m(x), ref)
        assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
