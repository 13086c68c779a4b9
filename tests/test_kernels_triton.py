"""Triton kernels against the reference, on the CPU under ``TRITON_INTERPRET=1``.

The interpreter runs the kernels' Python semantics on CPU tensors, so correctness (statistics,
the two-stage parameter-gradient reduction, fused residual and activation) is checked without a
GPU. Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from interpreter import ACT_NAMES, TOL, interpreted
from normlab.functional import fused
from normlab.functional._normalize import Layout
from normlab.kernels import cpu


@pytest.fixture(scope="module")
def tk():
    return interpreted("normlab.kernels.triton_kernels")




def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.unflatten(1, (groups, x.shape[1] // groups))


CASES = {
    # name: (op, input shape, layout, param shape, use bias, fixed stats, groups)
    "layer_norm": ("layer_norm", (19, 37), Layout((1,), (37,)), (37,), True, False, None),
    "rms_norm": ("rms_norm", (5, 2, 24), Layout((2,), (24,), False), (24,), False, False, None),
    "group_norm": ("group_norm_act", (3, 6, 4, 5), Layout((2, 3, 4), (1, 3, 2, 1, 1)), (6,),
                   True, False, 3),
    "group_norm_2d": ("group_norm_act", (5, 6), Layout((2,), (1, 3, 2)), (6,), True, False, 3),
    "instance_norm": ("instance_norm", (2, 3, 5, 3), Layout((2, 3), (1, 3, 1, 1)), (3,), True,
                      False, None),
    "batch_norm": ("batch_norm_act", (3, 4, 3, 5), Layout((0, 2, 3), (1, 4, 1, 1)), (4,), True,
                   False, None),
    "batch_norm_eval": ("batch_norm", (3, 4, 3, 5), Layout((0, 2, 3), (1, 4, 1, 1)), (4,), True,
                        True, None),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("dtype", "act"), [(torch.float32, 0), (torch.float32, 3),
                                            (torch.bfloat16, 2), (torch.float16, 1)])
def test_triton_matches_reference(tk, name: str, dtype: torch.dtype, act: int) -> None:
    _check_case(tk, name, dtype, act)


@pytest.mark.parametrize("name", ["group_norm", "group_norm_2d", "instance_norm", "batch_norm"])
@pytest.mark.parametrize(("dtype", "act"), [(torch.float32, 0), (torch.float32, 2),
                                            (torch.bfloat16, 3)])
def test_triton_looped_backward_matches_reference(tk, monkeypatch, name: str,
                                                  dtype: torch.dtype, act: int) -> None:
    # Tiles over _LOOP_TILE elements take the two-sweep backward; shrunk so these small shapes
    # do, in chunks that leave a partial last chunk (S = 20, 1, 15; batch norm is unaffected).
    monkeypatch.setattr(tk, "_LOOP_TILE", 1)
    monkeypatch.setattr(tk, "_LOOP_CHUNK", 8)
    _check_case(tk, name, dtype, act)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_wide_rows_backward_matches_reference(tk, monkeypatch, name: str,
                                                     dtype: torch.dtype) -> None:
    # Rows of _WIDE_ROW features or more: layer norm with a bias takes the column-blocked
    # kernels (blocks of 8 over 37 features: a partial last block), RMS norm the 32-warp one.
    _shrink_wide(tk, monkeypatch)
    _check_case(tk, name, dtype, 0)


def _shrink_wide(tk, monkeypatch) -> None:
    monkeypatch.setattr(tk, "_WIDE_ROW", 16)
    monkeypatch.setattr(tk, "_WIDE_CHUNK", 8)


def _check_case(tk, name: str, dtype: torch.dtype, act: int) -> None:
    op, shape, layout, pshape, use_bias, fixed, groups = CASES[name]
    if act and op not in ("batch_norm_act", "group_norm_act"):
        act = 0
    g = torch.Generator().manual_seed(len(name) + act)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if groups:
        x = _grouped(x, groups)
    w = torch.randn(pshape, generator=g)
    b = torch.randn(pshape, generator=g) if use_bias else None
    stats = None
    if fixed:
        p = layout.param_shape
        stats = (torch.randn(p, generator=g), torch.rand(p, generator=g) + 0.5)
    out = tk.forward(op, x, w, b, layout, 1e-5, stats, act)
    assert out is not None, "the Triton kernel declined a supported case"
    ref = fused.norm_act_forward(x, w, b, layout, 1e-5, stats, ACT_NAMES[act])
    tol = TOL[dtype]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol)
    grad = torch.randn(out[0].shape, generator=g).to(dtype)
    needs = (True, True, use_bias)
    got = tk.backward(op, grad, x, w, b, out[1], out[3], layout, not fixed, needs, act)
    want = fused.norm_act_backward(grad, x, w, b, ref[1], ref[3], layout, not fixed, needs,
                                   ACT_NAMES[act])
    for p, q in zip(got, want):
        if q is None:
            assert p is None
            continue
        torch.testing.assert_close(p, q.view(p.shape), atol=tol["atol"] * max(1, q.abs().max()),
                                   rtol=tol["rtol"])


@pytest.mark.parametrize("wide", [False, True])
def test_triton_add_layer_norm_and_deterministic_param_grads(tk, monkeypatch, wide: bool) -> None:
    if wide:
        _shrink_wide(tk, monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    layout = Layout((1,), (16,))
    y, mean, _var, invstd, s = tk.forward("add_layer_norm", x, w, b, layout, 1e-5, None,
                                         residual=r)
    ref = fused.add_norm_forward(x, r, w, b, layout, 1e-5)
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close(s, ref[1])
    gy, gs = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    needs = (True, True, True)
    got = tk.backward("add_layer_norm", gy, s, w, None, mean, invstd, layout, True, needs,
                      dextra=gs)
    want = fused.add_norm_backward(gy, gs, s, w, b, ref[2], ref[4], layout, needs)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    again = tk.backward("add_layer_norm", gy, s, w, None, mean, invstd, layout, True, needs,
                        dextra=gs)
    for p, q in zip(got, again):
        assert torch.equal(p, q)  # two-stage reduction in a fixed order, no atomics


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("wide", [False, True])
def test_triton_add_layer_norm_with_activation(tk, monkeypatch, activation: str,
                                               wide: bool) -> None:
    if wide:
        _shrink_wide(tk, monkeypatch)
    act = cpu.ACTIVATIONS[activation]
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(24, 16, generator=g) * 2, torch.randn(24, 16, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    layout = Layout((1,), (16,))
    y, mean, _var, invstd, s = tk.forward("add_layer_norm", x, w, b, layout, 1e-5, None, act,
                                         residual=r)
    ref = fused.add_norm_forward(x, r, w, b, layout, 1e-5, activation)
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close(s, ref[1])
    gy, gs = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    needs = (True, True, True)
    got = tk.backward("add_layer_norm", gy, s, w, b, mean, invstd, layout, True, needs, act,
                      dextra=gs)
    want = fused.add_norm_backward(gy, gs, s, w, b, ref[2], ref[4], layout, needs, activation)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, atol=1e-5 * max(1, q.abs().max()), rtol=1e-4)


def test_triton_declines_what_it_does_not_cover(tk) -> None:
    assert tk.forward("layer_norm", torch.randn(2, 3, dtype=torch.float64), None, None,
                      Layout((1,), (3,)), 1e-5, None) is None


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_add_rms_norm_with_activation_and_no_bias(tk, monkeypatch, wide: bool,
                                                         dtype: torch.dtype) -> None:
    # RMS rows carry no bias gradient; with an activation the wide path still takes the column
    # blocks (the activation reads a bias), without a bias-gradient accumulator.
    if wide:
        _shrink_wide(tk, monkeypatch)
    act = cpu.ACTIVATIONS["silu"]
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(21, 40, generator=g) * 2).to(dtype)
    r = torch.randn(21, 40, generator=g).to(dtype)
    w = torch.randn(40, generator=g)
    layout = Layout((1,), (40,), False)
    y, mean, _var, invstd, s = tk.forward("add_rms_norm", x, w, None, layout, 1e-5, None, act,
                                         residual=r)
    ref = fused.add_norm_forward(x, r, w, None, layout, 1e-5, "silu")
    tol = TOL[dtype]
    torch.testing.assert_close(y, ref[0], **tol)
    torch.testing.assert_close(s, ref[1], **tol)
    gy, gs = torch.randn(21, 40, generator=g).to(dtype), torch.randn(21, 40, generator=g).to(dtype)
    needs = (True, True, False)
    got = tk.backward("add_rms_norm", gy, s, w, None, mean, invstd, layout, True, needs, act,
                      dextra=gs)
    want = fused.add_norm_backward(gy, gs, s, w, None, ref[2], ref[4], layout, needs, "silu")
    assert got[2] is None and want[2] is None
    for p, q in zip(got[:2], want[:2]):
        torch.testing.assert_close(p, q.to(p.dtype), atol=tol["atol"] * max(1, q.abs().max()),
                                   rtol=tol["rtol"])
