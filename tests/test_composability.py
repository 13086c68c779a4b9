"""normlab's layers under what PyTorch users do to models: torch.compile, torch.export, ONNX,
torch.jit.trace, torch.func, meta and fake tensors, wrapper subclasses, opcheck. Each against
torch.nn's twin on the same model (or, for the layers torch lacks, against normlab's own eager
result). Cases that could crash the process run in a subprocess."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import normlab.nn as nnl

torch.manual_seed(0)


class AddNorm(nn.Module):
    """A fused add+norm module as a one-input block (the residual is a scaled copy)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        out, s = self.norm(x, 0.5 * x)
        return out + s


class TorchAddNorm(nn.Module):
    def __init__(self, norm: nn.Module, act=None) -> None:
        super().__init__()
        self.norm, self.act = norm, act or nn.Identity()

    def forward(self, x):
        s = x + 0.5 * x
        return self.act(self.norm(s)) + s


def _seq(*mods):
    return nn.Sequential(*mods)


# name -> (normlab model, torch twin or None (compare with normlab's eager), input shape)
MODELS = {
    "BatchNorm1d": (lambda: _seq(nn.Linear(6, 8), nnl.BatchNorm1d(8)),
                    lambda: _seq(nn.Linear(6, 8), nn.BatchNorm1d(8)), (5, 6)),
    "BatchNorm2d": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.BatchNorm2d(4)),
                    lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 3, 6, 6)),
    "BatchNorm3d": (lambda: _seq(nnl.BatchNorm3d(3)), lambda: _seq(nn.BatchNorm3d(3)),
                    (2, 3, 3, 4, 2)),
    "LayerNorm": (lambda: _seq(nn.Linear(6, 8), nnl.LayerNorm(8)),
                  lambda: _seq(nn.Linear(6, 8), nn.LayerNorm(8)), (5, 6)),
    "GroupNorm": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.GroupNorm(2, 4)),
                  lambda: _seq(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), (3, 3, 6, 6)),
    "InstanceNorm1d": (lambda: _seq(nnl.InstanceNorm1d(3, affine=True, track_running_stats=True)),
                       lambda: _seq(nn.InstanceNorm1d(3, affine=True, track_running_stats=True)),
                       (2, 3, 7)),
    "InstanceNorm2d": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.InstanceNorm2d(4, affine=True)),
                       lambda: _seq(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True)),
                       (3, 3, 6, 6)),
    "InstanceNorm3d": (lambda: _seq(nnl.InstanceNorm3d(3, track_running_stats=True)),
                       lambda: _seq(nn.InstanceNorm3d(3, track_running_stats=True)),
                       (2, 3, 3, 4, 2)),
    "RMSNorm": (lambda: _seq(nn.Linear(6, 8), nnl.RMSNorm(8)),
                lambda: _seq(nn.Linear(6, 8), nn.RMSNorm(8)), (5, 6)),
    "FusedAddLayerNorm": (lambda: AddNorm(nnl.FusedAddLayerNorm(8, activation="gelu")),
                          lambda: TorchAddNorm(nn.LayerNorm(8), nn.GELU()), (5, 8)),
    "FusedAddRMSNorm": (lambda: AddNorm(nnl.FusedAddRMSNorm(8)),
                        lambda: TorchAddNorm(nn.RMSNorm(8)), (5, 8)),
    "BatchNormAct2d": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.BatchNormAct2d(4, activation="silu")),
                       lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()),
                       (3, 3, 6, 6)),
    "GroupNormAct": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.GroupNormAct(2, 4, activation="relu")),
                     lambda: _seq(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU()),
                     (3, 3, 6, 6)),
    "BatchRenorm2d": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.BatchRenorm2d(4, warmup_steps=0)),
                      None, (3, 3, 6, 6)),
    "GhostBatchNorm2d": (lambda: _seq(nn.Conv2d(3, 4, 3),
                                      nnl.GhostBatchNorm2d(4, virtual_batch_size=2)),
                         None, (4, 3, 6, 6)),
    "FrozenBatchNorm2d": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.FrozenBatchNorm2d(4)), None,
                          (3, 3, 6, 6)),
    "SyncBatchNorm": (lambda: _seq(nn.Conv2d(3, 4, 3), nnl.SyncBatchNorm(4)),
                      lambda: _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 3, 6, 6)),
}
MODES = ("train", "eval")


def _pair(name: str, mode: str):
    """(normlab model, oracle model, input): the oracle is torch's twin with the same state, or a
    copy of the normlab model (run eagerly) where torch has none."""
    make, make_twin, shape = MODELS[name]
    torch.manual_seed(0)
    ours = make()
    for buf_name, buf in ours.named_buffers():  # non-trivial running statistics
        if buf_name.endswith("running_mean"):
            buf.normal_()
        elif buf_name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    oracle = make_twin() if make_twin is not None else make()
    oracle.load_state_dict(ours.state_dict())
    ours.train(mode == "train")
    oracle.train(mode == "train")
    x = torch.randn(shape)
    return ours, oracle, x


def _step(model, x):
    """Output, input gradient and parameter gradients of one forward/backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    return out.detach(), grads


def _assert_state_close(a: nn.Module, b: nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va.float(), vb.float(), atol=1e-5, rtol=1e-4, msg=ka)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_has_no_graph_breaks_and_matches_eager(name, mode):
    ours, oracle, x = _pair(name, mode)
    explained = torch._dynamo.explain(copy.deepcopy(ours))(x.clone())  # it runs the model
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    # aot_eager runs dynamo, AOTAutograd (fake tensors, functionalization, the joint graph) and the
    # ops' real kernels; inductor's code generation is covered by the test below.
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, grads = _step(compiled, x)
    want_out, want_grads = _step(oracle, x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    _assert_state_close(ours, oracle)  # the running statistics moved as eagerly



def _graph_targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm2d", "GroupNormAct", "FusedAddRMSNorm"])
def test_compile_inductor_keeps_normlab_ops_and_matches(name):
    ours, oracle, x = _pair(name, "train")
    seen: list[set[str]] = []

    def spy(gm, example_inputs):
        seen.append(_graph_targets(gm))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(ours, fullgraph=True, backend=spy)
    out, grads = _step(compiled, x)
    want_out, want_grads = _step(oracle, x)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert any("normlab." in t for targets in seen for t in targets), seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_runs_and_matches(name, mode):
    ours, oracle, x = _pair(name, mode)
    program = torch.export.export(ours, (x,))
    assert any("normlab." in t for t in _graph_targets(program.graph_module))
    out = program.module()(x)
    torch.testing.assert_close(out, oracle(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jit_trace_saves_loads_and_matches(name):
    ours, oracle, x = _pair(name, "eval")
    for p in ours.parameters():  # the case that returned uninitialised memory before
        p.requires_grad_(False)
    traced = torch.jit.trace(ours, (x,))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    want = oracle(x)
    torch.testing.assert_close(traced(x), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_export_runs_in_onnxruntime(name):
    import onnxruntime

    ours, oracle, x = _pair(name, "eval")
    program = torch.onnx.export(ours, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), oracle(x).detach(), atol=1e-5, rtol=1e-4)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert not any("normlab" in op for op in ops)
    if name == "LayerNorm":  # the standard operator, not its arithmetic
        assert "LayerNormalization" in ops


# ------------------------------------------------------------------------------------------------
# torch.func


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "RMSNorm", "FusedAddLayerNorm",
                                  "InstanceNorm2d", "BatchNorm2d"])
def test_per_sample_gradients_equal_a_loop(name):
    from torch.func import functional_call, grad, vmap

    ours, oracle, x = _pair(name, "eval")
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = dict(ours.named_buffers())

    def loss(p, sample):
        return functional_call(ours, (p, buffers), (sample.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        oracle.zero_grad()
        oracle(x[i: i + 1]).square().sum().backward()
        for (k, g), (_k, p) in zip(per_sample.items(), oracle.named_parameters()):
            torch.testing.assert_close(g[i], p.grad, atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm1d", "RMSNorm", "GroupNorm"])
@pytest.mark.parametrize("mode", MODES)
def test_jacrev_and_jvp_match_torch(name, mode):
    from torch.func import functional_call, jacrev, jvp

    ours, oracle, x = _pair(name, mode)
    if mode == "train":  # the running statistics would be written from inside a transform
        for m in (ours, oracle):
            for mod in m.modules():
                if hasattr(mod, "track_running_stats"):
                    mod.track_running_stats = False
                    mod.running_mean = mod.running_var = None
    state = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    twin_state = {**dict(oracle.named_parameters()), **dict(oracle.named_buffers())}

    def f(model, st):
        return lambda inp: functional_call(model, st, (inp,))

    torch.testing.assert_close(jacrev(f(ours, state))(x), jacrev(f(oracle, twin_state))(x),
                               atol=1e-4, rtol=1e-4)
    t = torch.randn_like(x)
    got = jvp(f(ours, state), (x,), (t,))
    want = jvp(f(oracle, twin_state), (x,), (t,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Meta device, fake tensors, wrapper subclasses


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_meta_device_then_to_empty(name, mode):
    make, make_twin, shape = MODELS[name]
    with torch.device("meta"):
        ours = make().train(mode == "train")
        twin = (make_twin() if make_twin else make()).train(mode == "train")
        x = torch.randn(shape, requires_grad=True)
        out, want = ours(x), twin(x)
        assert (out.shape, out.dtype, out.device.type) == (want.shape, want.dtype, "meta")
        out.sum().backward()
        assert x.grad.shape == x.shape
    ours.to_empty(device="cpu")
    reference, oracle, xr = _pair(name, mode)
    ours.load_state_dict(reference.state_dict())
    ours.train(mode == "train")
    torch.testing.assert_close(ours(xr), oracle(xr), atol=1e-5, rtol=1e-4)


def _run_isolated(code: str) -> str:
    """Run `code` in a fresh interpreter: a crash fails this test, not the run."""
    prelude = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_composability import MODELS, _pair
        import torch
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_fake_tensor_mode_forward_and_backward_give_torch_shapes():
    out = _run_isolated("""
        from torch._subclasses.fake_tensor import FakeTensorMode
        for name in sorted(MODELS):
            for mode in ("train", "eval"):
                ours, oracle, x = _pair(name, mode)
                with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                    fx = fake_mode.from_tensor(x).requires_grad_()
                    y, want = ours(fx), oracle(fx)
                    assert type(y).__name__ == "FakeTensor", type(y)
                    assert (y.shape, y.dtype, y.stride()) == (want.shape, want.dtype,
                                                              want.stride()), name
                    y.sum().backward()
                    assert fx.grad.shape == x.shape
        print("checked", len(MODELS))
    """)
    assert f"checked {len(MODELS)}" in out


def test_wrapper_subclass_passes_through_with_torch_values():
    out = _run_isolated("""
        from torch.utils._pytree import tree_map

        class Wrapper(torch.Tensor):  # the pattern of DTensor, torchao, LoggingTensor
            @staticmethod
            def __new__(cls, elem):
                return torch.Tensor._make_wrapper_subclass(
                    cls, elem.shape, dtype=elem.dtype, device=elem.device,
                    strides=elem.stride(), requires_grad=elem.requires_grad)

            def __init__(self, elem):
                self.elem = elem

            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                unwrap = lambda t: t.elem if isinstance(t, Wrapper) else t
                wrap = lambda t: Wrapper(t) if isinstance(t, torch.Tensor) else t
                return tree_map(wrap, func(*tree_map(unwrap, args),
                                           **tree_map(unwrap, kwargs or {})))

        for name in sorted(MODELS):
            for mode in ("train", "eval"):
                ours, oracle, x = _pair(name, mode)
                wx = Wrapper(x.clone()).requires_grad_()
                y = ours(wx)
                assert isinstance(y, Wrapper), (name, type(y))
                torch.testing.assert_close(y.elem, oracle(x), atol=1e-5, rtol=1e-4)
                y.sum().backward()
                assert isinstance(wx.grad, Wrapper)
        print("checked", len(MODELS))
    """)
    assert f"checked {len(MODELS)}" in out


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch


def _opcheck_cases():
    from cases import as_layout

    normalize = torch.ops.normlab.normalize.default
    cases = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for layout in ("contiguous", "channels_last", "strided"):
            x4 = as_layout(torch.randn(3, 4, 5, 6).to(dtype), layout).requires_grad_()
            w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
            rm, rv = torch.randn(4), torch.rand(4) + 0.5
            g = x4.detach().unflatten(1, (2, 2)).requires_grad_()
            cases += [
                (f"batch_norm {dtype} {layout}", normalize,
                 (x4, w, b, [0, 2, 3], [1, 4, 1, 1], True, 1e-5, None, None, None, "batch_norm")),
                (f"batch_norm eval {dtype} {layout}", normalize,
                 (x4, w, b, [0, 2, 3], [1, 4, 1, 1], True, 1e-5, rm, rv, None, "batch_norm")),
                (f"batch_norm_act {dtype} {layout}", normalize,
                 (x4, w, b, [0, 2, 3], [1, 4, 1, 1], True, 1e-5, None, None, "silu",
                  "batch_norm_act")),
                (f"instance_norm {dtype} {layout}", normalize,
                 (x4, w, None, [2, 3], [1, 4, 1, 1], True, 1e-5, None, None, None,
                  "instance_norm")),
                (f"group_norm {dtype} {layout}", normalize,
                 (g, w, b, [2, 3, 4], [1, 2, 2, 1, 1], True, 1e-5, None, None, None,
                  "group_norm")),
                (f"layer_norm {dtype} {layout}", normalize,
                 (x4, torch.randn(6, requires_grad=True), None, [3], [6], True, 1e-5, None, None,
                  None, "layer_norm")),
                (f"rms_norm {dtype} {layout}", normalize,
                 (x4, torch.randn(5, 6, requires_grad=True), None, [2, 3], [5, 6], False, 1e-6,
                  None, None, None, "rms_norm")),
            ]
        x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
        r = torch.randn(4, 8, dtype=dtype, requires_grad=True)
        w8, b8 = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
        cases += [
            (f"add_layer_norm gelu {dtype}", torch.ops.normlab.add_normalize.default,
             (x, r, w8, b8, [1], [8], True, 1e-5, "gelu", "add_layer_norm")),
            (f"add_rms_norm {dtype}", torch.ops.normlab.add_normalize.default,
             (x, r, w8, None, [1], [8], False, 1e-6, None, "add_rms_norm")),
        ]
    mean, var = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1)
    cases.append(("update_running_stats_", torch.ops.normlab.update_running_stats_.default,
                  (torch.zeros(4), torch.ones(4), mean, var, 10, 0.1, True)))
    cases.append(("normalize_backward", torch.ops.normlab.normalize_backward.default,
                  (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), None,
                   torch.randn(3, 1), torch.rand(3, 1), [1], [8], True, True,
                   [True, True, False], None, "layer_norm")))
    return cases


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize(("op", "args"), [c[1:] for c in _OPCHECK], ids=[c[0] for c in _OPCHECK])
def test_opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


_DECOMPOSED = [c for c in _OPCHECK if c[1] in (torch.ops.normlab.normalize.default,
                                                torch.ops.normlab.add_normalize.default)]


@pytest.mark.parametrize(("op", "args"), [c[1:] for c in _DECOMPOSED],
                         ids=[c[0] for c in _DECOMPOSED])
def test_decomposition_equals_the_op(op, args):
    # What ONNX export lowers each op to (torch's standard norm ops where one fits, else the
    # reference math in out-of-place aten ops) gives the op's own outputs, statistics included.
    from torch._decomp import decomposition_table

    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    got = decomposition_table[op](*detached)
    want = op(*detached)
    tol = {"atol": 2e-2, "rtol": 2e-2} if detached[0].dtype == torch.bfloat16 else \
        {"atol": 1e-5, "rtol": 1e-4}
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.to(w.dtype), w, **tol)


# ------------------------------------------------------------------------------------------------
# Opacus (DP-SGD): per-sample gradients in both of its grad-sample modes


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm"])
def test_opacus_per_sample_gradients_equal_torch_and_dp_sgd_trains(name, grad_sample_mode):
    import warnings

    from opacus import GradSampleModule, PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore", module="opacus")
    ours, oracle, x = _pair(name, "train")
    # hooks mode takes functorch for layers it has no hand-written rule for (normlab's)
    functorch = grad_sample_mode == "functorch"
    got, want = (GradSampleModule(m, force_functorch=functorch) for m in (ours, oracle))
    for m in (got, want):
        m(x).square().sum().backward()
    for (k, p), (_k, q) in zip(got.named_parameters(), want.named_parameters()):
        assert p.grad_sample.shape == (x.shape[0], *p.shape), k
        torch.testing.assert_close(p.grad_sample, q.grad_sample, atol=1e-4, rtol=1e-4, msg=k)

    model = _pair(name, "train")[0]
    before = [p.detach().clone() for p in model.parameters()]
    data = TensorDataset(torch.randn(32, *x.shape[1:]), torch.randn(32, *model(x).shape[1:]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=grad_sample_mode)
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = (model(xb) - yb).square().mean()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------------------------------------
# What eager users already relied on keeps working beside the ops


def test_autocast_bf16_trains_like_torch():
    ours, oracle, x = _pair("LayerNorm", "train")
    results = []
    for m in (ours, oracle):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xi)
        out.float().square().sum().backward()
        results.append((out.float(), xi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm2d", "FusedAddLayerNorm"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    from torch.utils.checkpoint import checkpoint

    ours, _oracle, x = _pair(name, "eval")
    plain_out, plain_grads = _step(ours, x)
    xi = x.clone().requires_grad_()
    out = checkpoint(ours, xi, use_reentrant=False)
    grads = torch.autograd.grad(out.square().sum(), [xi, *ours.parameters()])
    torch.testing.assert_close(out.detach(), plain_out)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_whole_model_save_and_load():
    ours, oracle, x = _pair("BatchNormAct2d", "eval")
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), oracle(x), atol=1e-5, rtol=1e-4)


def test_threads_share_a_model():
    from concurrent.futures import ThreadPoolExecutor

    ours, oracle, x = _pair("GroupNorm", "eval")
    inputs = [torch.randn_like(x) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda inp: _step(ours, inp), inputs))
    for inp, (out, _grads) in zip(inputs, outs):
        torch.testing.assert_close(out, oracle(inp).detach(), atol=1e-5, rtol=1e-4)


def _ddp_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    ours, _oracle, _x = _pair("BatchNorm2d", "train")
    model = DistributedDataParallel(ours)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(rank))
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


def test_ddp_averages_gradients_across_processes():
    from normlab.distributed import spawn

    grads = spawn(_ddp_worker, 2, timeout=120)
    for a, b in zip(*grads):  # DDP's all-reduce: every rank ends with the same gradients
        torch.testing.assert_close(a, b)
    ours, _oracle, _x = _pair("BatchNorm2d", "train")
    for rank in range(2):  # and they are the mean of the per-rank gradients
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(rank))
        ours(x).square().sum().backward()
    for g, p in zip(grads[0], ours.parameters()):
        torch.testing.assert_close(g, p.grad / 2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_and_compile_with_a_dynamic_batch(name, mode):
    # A symbolic batch size must stay symbolic through the ops (no specialization), and module
    # floats such as eps arrive symbolic under torch.compile(dynamic=True).
    from torch.export import Dim

    ours, oracle, x = _pair(name, mode)
    bigger = torch.cat([x, x])
    if name == "GhostBatchNorm2d" and mode == "train":
        # The number of virtual batches is the graph's structure (one set of statistics each):
        # a batch of any size cannot be one graph, and export says so instead of guessing.
        with pytest.raises(torch._dynamo.exc.UserError, match=r"Constraints violated \(batch\)"):
            torch.export.export(ours, (x,), dynamic_shapes=({0: Dim("batch", min=2)},))
        return
    program = torch.export.export(copy.deepcopy(ours), (x,),
                                  dynamic_shapes=({0: Dim("batch", min=2)},))
    torch.testing.assert_close(program.module()(bigger), copy.deepcopy(oracle)(bigger),
                               atol=1e-5, rtol=1e-4)
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend="aot_eager")
    for inp in (x, bigger):
        torch.testing.assert_close(compiled(inp), oracle(inp), atol=1e-5, rtol=1e-4)


BF16_MODELS = ["BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm",
               "FusedAddLayerNorm", "BatchNormAct2d"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BF16_MODELS)
def test_bfloat16_models_compile_and_export(name, mode):
    ours, oracle, x = _pair(name, mode)
    ours, oracle, x = ours.to(torch.bfloat16), oracle.to(torch.bfloat16), x.to(torch.bfloat16)
    tol = {"atol": 6e-2, "rtol": 6e-2}
    program = torch.export.export(copy.deepcopy(ours), (x,))
    torch.testing.assert_close(program.module()(x), copy.deepcopy(oracle)(x), **tol)
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, grads = _step(compiled, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _step(oracle, x)[0], **tol)
    # Gradients against normlab's own eager run: torch's bfloat16 convolution backward rounds
    # differently, and what is under test is that compiling changes nothing.
    for g, w in zip(grads, _step(eager, x)[1]):
        torch.testing.assert_close(g, w, **tol)


def test_onnx_opset_23_writes_rms_normalization():
    # RMSNormalization is an ONNX operator from opset 23 on; below it RMS norm is its arithmetic.
    import onnxruntime

    ours, oracle, x = _pair("RMSNorm", "eval")
    program = torch.onnx.export(ours, (x,), dynamo=True, opset_version=23, verbose=False)
    assert "RMSNormalization" in {n.op_type for n in program.model_proto.graph.node}
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), oracle(x).detach(), atol=1e-5, rtol=1e-4)
