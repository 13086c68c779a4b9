"""gradcheck in float64 for every hand-written backward, in every mode that has one."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab.functional as F
import normlab.nn as nnl
from normlab.functional import fused


def _t(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 if positive else torch.randn(shape, generator=g, dtype=torch.float64)
    return t.requires_grad_()


_RM = torch.tensor([0.3, -1.2], dtype=torch.float64)
_RV = torch.tensor([0.7, 2.5], dtype=torch.float64)

CHECKS = {
    "batch_norm_train_2d": lambda: (lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (_t(4, 3), _t(3, positive=True), _t(3))),
    "batch_norm_train_4d": lambda: (lambda x, w, b: F.batch_norm(x, None, None, w, b, True, eps=1e-3), (_t(3, 2, 3, 2), _t(2, positive=True), _t(2))),
    "batch_norm_eval": lambda: (lambda x, w, b: F.batch_norm(x, _RM, _RV, w, b, False), (_t(3, 2, 4), _t(2, positive=True), _t(2))),
    "batch_norm_no_affine": lambda: (lambda x: F.batch_norm(x, None, None, training=True), (_t(5, 3, 2),)),
    "layer_norm": lambda: (lambda x, w, b: F.layer_norm(x, (3, 4), w, b), (_t(2, 3, 4), _t(3, 4, positive=True), _t(3, 4))),
    "layer_norm_no_batch": lambda: (lambda x, w: F.layer_norm(x, (5,), w, None), (_t(5), _t(5, positive=True))),
    "group_norm": lambda: (lambda x, w, b: F.group_norm(x, 2, w, b), (_t(2, 4, 3), _t(4, positive=True), _t(4))),
    "group_norm_channels_last": lambda: (lambda x, w, b: F.group_norm(x.contiguous(memory_format=torch.channels_last), 3, w, b), (_t(2, 6, 2, 3), _t(6, positive=True), _t(6))),
    "instance_norm": lambda: (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (_t(2, 3, 5), _t(3, positive=True), _t(3))),
    "instance_norm_running": lambda: (lambda x, w, b: F.instance_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), w, b, use_input_stats=False), (_t(2, 3, 5), _t(3, positive=True), _t(3))),
    "rms_norm": lambda: (lambda x, w: F.rms_norm(x, (4,), w), (_t(3, 4), _t(4, positive=True))),
    "rms_norm_2d_shape": lambda: (lambda x, w: F.rms_norm(x, (2, 3), w, eps=1e-4), (_t(2, 2, 3), _t(2, 3, positive=True))),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_gradcheck(name):
    fn, inputs = CHECKS[name]()
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


FUSED_CHECKS = {
    "batch_norm_act_silu": lambda: (lambda x, w, b: fused.batch_norm_act(x, None, None, w, b, True, activation="silu"), (_t(4, 3), _t(3, positive=True), _t(3))),
    "batch_norm_act_gelu_eval": lambda: (lambda x, w, b: fused.batch_norm_act(x, _RM, _RV, w, b, False, activation="gelu"), (_t(3, 2, 4), _t(2, positive=True), _t(2))),
    "group_norm_act_silu": lambda: (lambda x, w, b: fused.group_norm_act(x, 2, w, b, activation="silu"), (_t(2, 4, 3), _t(4, positive=True), _t(4))),
    "add_layer_norm": lambda: (lambda x, r, w, b: fused.add_layer_norm(x, r, (3,), w, b), (_t(4, 3), _t(4, 3, seed=1), _t(3, positive=True), _t(3))),
    "add_layer_norm_gelu": lambda: (lambda x, r, w, b: fused.add_layer_norm(x, r, (3,), w, b, activation="gelu"), (_t(4, 3), _t(4, 3, seed=1), _t(3, positive=True), _t(3))),
    "add_rms_norm": lambda: (lambda x, r, w: fused.add_rms_norm(x, r, (3,), w), (_t(4, 3), _t(4, 3, seed=1), _t(3, positive=True))),
}


@pytest.mark.parametrize("name", sorted(CHECKS) + sorted(FUSED_CHECKS))
def test_gradgradcheck(name):
    # Double backward is exact: a graph through the backward runs the reference math with the
    # statistics recomputed from the input, so every path through mean and variance counts.
    fn, inputs = {**CHECKS, **FUSED_CHECKS}[name]()
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_penalty_through_layer_norm_equals_torch(dtype):
    # WGAN-GP: the penalty on the input gradient's norm, differentiated into the parameters.
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), nnl.LayerNorm(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).to(dtype)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                 torch.nn.Linear(8, 1)).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, dtype=dtype)

    def penalty(model):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        loss = (g.norm(dim=1) - 1).pow(2).mean()
        # allow_unused: the last layer's bias does not reach the input gradient
        return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    got, want = penalty(ours), penalty(theirs)
    assert [g is None for g in got] == [w is None for w in want] == [False] * 5 + [True]
    for a, b in zip(got[:5], want[:5]):
        torch.testing.assert_close(a, b, **tol)
