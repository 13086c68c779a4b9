"""gradcheck in float64 for every hand-written backward, in every mode that has one."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import normlab.functional as F


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


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm", "batch_norm_act", "add_layer_norm"])
def test_double_backward_is_refused_with_a_clear_error(op):
    from normlab.functional import fused

    x = _t(4, 3)
    y = {
        "layer_norm": lambda: F.layer_norm(x, (3,)),
        "batch_norm": lambda: F.batch_norm(x, None, None, training=True),
        "batch_norm_act": lambda: fused.batch_norm_act(x, None, None, training=True,
                                                       activation="silu"),
        "add_layer_norm": lambda: fused.add_layer_norm(x, _t(4, 3, seed=1), (3,))[0],
    }[op]()
    # `* x`: the gradient also flows around the norm, so it has a graph and a double backward
    # would run; without the refusal it would silently drop the norm's second derivative.
    (g,) = torch.autograd.grad((y * x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable"):
        g.sum().backward()
