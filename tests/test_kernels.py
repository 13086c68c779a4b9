"""The C++ CPU kernels against the plain-torch reference path (the oracle).

Every public op runs twice on the same inputs, once on the kernel path and once inside
``kernels.use_reference()``; outputs, input/weight/bias gradients and running statistics must
agree to a per-dtype tolerance. Shapes are drawn from a seeded generator and include odd sizes and
size-1 dims; layouts cover contiguous, channels_last and non-contiguous inputs.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
import torch

from normlab import functional as F
from normlab import kernels
from normlab.kernels import _build, cpu

HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None

pytestmark = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler to build the CPU kernels")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 5e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
}


@pytest.fixture(scope="module", autouse=True)
def built_kernels() -> None:
    # Compile the variants these tests use concurrently (cached on disk after the first run).
    _build.build_variants([(code, False) for code in range(4)])
    assert _build.available(), "the C++ CPU kernels failed to build"


@pytest.fixture
def num_threads() -> Iterator[Callable[[int], None]]:
    """Sets torch's intra-op thread count for one test (the suite runs on one: conftest)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the kernel path silently falls back to the reference."""
    from fallback import forbid_fallback

    forbid_fallback(monkeypatch)


# ------------------------------------------------------------------------------------------------
# Cases: (op, layout) -> a shape drawn from `rng` and a call of the public op.

OPS = ["layer_norm", "layer_norm_2d", "rms_norm", "group_norm", "instance_norm",
       "instance_norm_eval", "batch_norm", "batch_norm_eval", "batch_norm_1d"]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _dim(rng: random.Random) -> int:
    return rng.choice([1, 2, 3, 5, 7, 16, 33])


def _shape(op: str, rng: random.Random) -> tuple[int, ...]:
    if op in ("layer_norm", "rms_norm"):
        return (rng.choice([1, 3, 17]), rng.choice([1, 2, 5]), rng.choice([1, 7, 64, 257]))
    if op == "layer_norm_2d":
        return (rng.choice([1, 4, 9]), rng.choice([3, 8]), rng.choice([1, 5, 33]))
    if op == "group_norm":
        g = rng.choice([1, 2, 3])
        spatial = rng.choice([(), (_dim(rng),), (_dim(rng), _dim(rng))])
        return (rng.choice([1, 2, 5]), g * rng.choice([1, 2, 5]), *spatial)
    if op == "batch_norm_1d":
        return (rng.choice([2, 3, 17, 64]), rng.choice([1, 3, 16]))
    n = rng.choice([2, 3, 5]) if op.startswith("batch") else rng.choice([1, 2, 3])
    h, w = _dim(rng), _dim(rng)
    if h * w == 1:
        h = 2
    return (n, rng.choice([1, 3, 8, 13]), h, w)


def _make_input(shape: tuple[int, ...], layout: str, dtype: torch.dtype,
                g: torch.Generator) -> torch.Tensor:
    if layout == "channels_last" and len(shape) != 4:
        shape = (*shape, *(3,) * (4 - len(shape)))
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    if layout == "channels_last":
        return base.to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor, then a transpose-free view
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=torch.float64)
        wide[..., ::2] = base
        return wide.to(dtype)[..., ::2]
    return base.to(dtype)


def _run(op: str, x: torch.Tensor, params: dict[str, torch.Tensor | None]) -> torch.Tensor:
    w, b, rm, rv = params["w"], params["b"], params["rm"], params["rv"]
    if op == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], w, b)
    if op == "layer_norm_2d":
        return F.layer_norm(x, x.shape[-2:], w, b, eps=1e-3)
    if op == "rms_norm":
        return F.rms_norm(x, x.shape[-1:], w)
    if op == "group_norm":
        return F.group_norm(x, params["groups"], w, b)  # type: ignore[arg-type]
    if op == "instance_norm":
        return F.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.3)
    if op == "instance_norm_eval":
        return F.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    if op in ("batch_norm", "batch_norm_1d"):
        return F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)
    if op == "batch_norm_eval":
        return F.batch_norm(x, rm, rv, w, b, training=False)
    raise ValueError(op)


def _params(op: str, x: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor | None]:
    # Low-precision inputs: bfloat16 uses float32 parameters (mixed precision), float16 its own.
    pdtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    if op.startswith("layer_norm_2d"):
        pshape = tuple(x.shape[-2:])
    elif op in ("layer_norm", "rms_norm"):
        pshape = tuple(x.shape[-1:])
    else:
        pshape = (x.shape[1],)

    def rand(scale: float, shift: float) -> torch.Tensor:
        t = torch.randn(pshape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(pdtype)

    out: dict[str, torch.Tensor | None] = {"w": rand(0.5, 1.0), "b": rand(0.5, 0.0),
                                           "rm": None, "rv": None, "groups": None}
    if op == "rms_norm":
        out["b"] = None
    if op.startswith(("batch", "instance")):
        out["rm"] = rand(0.3, 0.0)
        out["rv"] = rand(0.1, 1.0).abs() + 0.1
    if op == "group_norm":
        out["groups"] = next(d for d in (3, 2, 1) if x.shape[1] % d == 0)
    return out


def _grads(op: str, x: torch.Tensor, params: dict) -> tuple[torch.Tensor, list, dict]:
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()
              if k in ("w", "b") and v is not None}
    buffers = {k: v.clone() for k, v in params.items() if k in ("rm", "rv") and v is not None}
    xg = x.detach().clone().requires_grad_(True)
    # Keep the clone's layout: clone() preserves strides of dense inputs, not of strided ones.
    if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        xg = x.detach().requires_grad_(True)
    out = _run(op, xg, {**params, **leaves, **buffers})
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    inputs = [xg, *leaves.values()]
    grads = torch.autograd.grad(out, inputs, grad)
    return out, list(grads), buffers


def _case_id(op: str, layout: str, dtype: torch.dtype) -> str:
    return f"{op}-{layout}-{str(dtype).removeprefix('torch.')}"


CASES = [
    (op, layout, dtype)
    for op in OPS
    for layout in LAYOUTS
    for dtype in DTYPES
    if layout != "channels_last" or op in ("group_norm", "instance_norm", "instance_norm_eval",
                                           "batch_norm", "batch_norm_eval")
]


@pytest.mark.parametrize(("op", "layout", "dtype"), CASES,
                         ids=[_case_id(*c) for c in CASES])
def test_kernel_matches_reference(op: str, layout: str, dtype: torch.dtype,
                                  no_fallback: None) -> None:
    seed = sum(map(ord, _case_id(op, layout, dtype)))
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):  # two random shapes per case
        x = _make_input(_shape(op, rng), layout, dtype, g)
        params = _params(op, x, g)
        out_k, grads_k, bufs_k = _grads(op, x, params)
        with kernels.use_reference():
            out_r, grads_r, bufs_r = _grads(op, x, params)
        tol = TOL[dtype]
        torch.testing.assert_close(out_k, out_r, **tol)
        if layout == "channels_last":
            assert out_k.is_contiguous(memory_format=torch.channels_last)
        for gk, gr in zip(grads_k, grads_r):
            # Parameter gradients sum over many elements: compare relative to their scale.
            torch.testing.assert_close(gk, gr, atol=tol["atol"] * max(1.0, gr.abs().max().item()),
                                       rtol=tol["rtol"])
        for k in bufs_k:
            torch.testing.assert_close(bufs_k[k], bufs_r[k], **tol)


@pytest.mark.parametrize(("op", "layout"), [
    *[(op, "contiguous") for op in ("layer_norm", "rms_norm", "group_norm", "instance_norm",
                                    "batch_norm", "batch_norm_eval", "batch_norm_1d")],
    *[(op, "channels_last") for op in ("group_norm", "instance_norm", "batch_norm",
                                       "batch_norm_eval")],
])
def test_kernel_gradcheck_float64(op: str, layout: str, no_fallback: None) -> None:
    g = torch.Generator().manual_seed(3)
    shape = {"layer_norm": (3, 6), "rms_norm": (3, 6), "batch_norm_1d": (5, 3)}.get(op, (2, 4, 3, 2))
    x = _make_input(shape, layout, torch.float64, g).requires_grad_(True)
    params = _params(op, x, g)
    w = params["w"].requires_grad_(True)  # type: ignore[union-attr]
    b = params["b"].requires_grad_(True) if params["b"] is not None else None

    def f(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        p = {**params, "w": w, "b": rest[0] if rest else None}
        if p["rm"] is not None:  # fresh buffers: the op mutates them
            p["rm"], p["rv"] = params["rm"].clone(), params["rv"].clone()  # type: ignore
        return _run(op, x, p)

    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("op", "layout"), [
    *[(op, "contiguous") for op in ("layer_norm", "rms_norm", "group_norm", "instance_norm",
                                    "batch_norm")],
    *[(op, "channels_last") for op in ("group_norm", "instance_norm", "batch_norm")],
])
def test_large_offset_no_worse_than_torch(op: str, layout: str) -> None:
    # 1e4 + 0.01 * noise in float32: E[x^2] - E[x]^2 loses every digit; the kernels must match
    # torch's own error against a float64 oracle (they do far better: the mean is carried in double).
    g = torch.Generator().manual_seed(11)
    shape = (8, 512) if op in ("layer_norm", "rms_norm") else (8, 8, 24, 24)
    x = 1e4 + 0.01 * torch.randn(shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    tf = torch.nn.functional
    ours, theirs = {
        "layer_norm": (lambda t: F.layer_norm(t, t.shape[-1:]),
                       lambda t: tf.layer_norm(t, t.shape[-1:])),
        "rms_norm": (lambda t: F.rms_norm(t, t.shape[-1:]), lambda t: tf.rms_norm(t, t.shape[-1:])),
        "group_norm": (lambda t: F.group_norm(t, 4), lambda t: tf.group_norm(t, 4)),
        "instance_norm": (lambda t: F.instance_norm(t), lambda t: tf.instance_norm(t)),
        "batch_norm": (lambda t: F.batch_norm(t, None, None, training=True),
                       lambda t: tf.batch_norm(t, None, None, training=True)),
    }[op]
    with kernels.use_reference():  # two-pass float64 oracle (torch's float64 GN on
        oracle = ours(x.double())  # channels_last itself loses digits at this offset)
    err_ours = (ours(x).double() - oracle).abs().max().item()
    err_torch = (theirs(x).double() - oracle).abs().max().item()
    assert err_ours <= max(err_torch, 4 * torch.finfo(torch.float32).eps), (err_ours, err_torch)


@pytest.mark.parametrize(("op", "shape", "channels_last", "threads"), [
    # Batch norm NCHW, by channel size against the cache budget (512 KB per thread): a channel of
    # 4 x 40000 floats (640 KB) takes two sweeps on one thread and the shared-channel schedule
    # (each thread its rows, a barrier per channel) on two; 4 x 90000 (1.4 MB) two sweeps on two;
    # 3 x 22500 (270 KB, rows split 1 + 2) is shared by two threads; channels under 256 KB
    # (4 x 10000, 4 x 400), a single row per channel, and more threads than CPUs leave a channel
    # per thread.
    ("batch_norm", (4, 3, 200, 200), False, 1),
    ("batch_norm", (4, 3, 200, 200), False, 2),
    ("batch_norm", (4, 3, 300, 300), False, 2),
    ("batch_norm", (3, 3, 150, 150), False, 2),
    ("batch_norm", (4, 3, 100, 100), False, 2),
    ("batch_norm", (4, 3, 200, 200), False, 3),
    ("batch_norm", (4, 3, 20, 20), False, 2),
    ("batch_norm", (1, 5, 20, 20), False, 2),
    # channels_last group/instance norm: a 1.1 MB sample takes the two-sweep schedule; 1100
    # channels leave one row per flat stretch, 5 groups of 220.
    ("group_norm", (2, 1100, 16, 16), True, 2),
    ("instance_norm", (2, 1100, 16, 16), True, 2),
    ("group_norm", (3, 20, 7, 9), True, 2),
    # channels_last batch norm whose statistics merge 8 chunks of 4096 rows.
    ("batch_norm", (8, 16, 64, 64), True, 2),
])
def test_every_kernel_schedule_matches_the_reference(op: str, shape: tuple[int, ...],
                                                     channels_last: bool, threads: int,
                                                     no_fallback, num_threads) -> None:
    num_threads(threads)
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(shape, generator=g) * 3 + 1).requires_grad_(True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    c = shape[1]
    w = (torch.randn(c, generator=g) + 1).requires_grad_(True)
    b = torch.randn(c, generator=g).requires_grad_(True)
    call = {
        "batch_norm": lambda t, w, b: F.batch_norm(t, None, None, w, b, training=True),
        "group_norm": lambda t, w, b: F.group_norm(t, 5 if c % 5 == 0 else 4, w, b),
        "instance_norm": lambda t, w, b: F.instance_norm(t, None, None, w, b),
    }[op]
    grad = torch.randn(shape, generator=g)
    out = call(x, w, b)
    got = (out, *torch.autograd.grad(out, [x, w, b], grad))
    with kernels.use_reference():
        xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
        ref = call(xd, wd, bd)
        want = (ref, *torch.autograd.grad(ref, [xd, wd, bd], grad.double()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=2e-4 * max(1.0, e.abs().max().item()),
                                   rtol=1e-4)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("shape", [
    (3, 5000),  # at most cpu._ONE_CHUNK elements: one chunk writes the parameter sums itself
    (40, 1000),  # more: per-chunk partials, summed after the kernel
])
def test_both_row_backward_schedules_match_the_reference(op: str, shape: tuple[int, int],
                                                         no_fallback) -> None:
    from normlab.functional import fused
    from normlab.kernels import cpu

    assert (shape[0] * shape[1] <= cpu._ONE_CHUNK) == (shape == (3, 5000))
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=g) * 2 + 1).requires_grad_(True)
    r = torch.randn(shape, generator=g).requires_grad_(True)
    w = (torch.randn(shape[1], generator=g) + 1).requires_grad_(True)
    b = torch.randn(shape[1], generator=g).requires_grad_(True)
    call = {
        "layer_norm": lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b) + 0 * r,
        "rms_norm": lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w) + 0 * (r + b),
        "add_layer_norm": lambda x, r, w, b: fused.add_layer_norm(x, r, x.shape[-1:], w, b)[0],
    }[op]
    grad = torch.randn(shape, generator=g)
    out = call(x, r, w, b)
    got = (out, *torch.autograd.grad(out, [x, r, w, b], grad))
    with kernels.use_reference():
        leaves = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
        ref = call(*leaves)
        want = (ref, *torch.autograd.grad(ref, leaves, grad.double()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-4 * max(1.0, e.abs().max().item()),
                                   rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    # Long rows whose sum would saturate or round away in 16-bit accumulation.
    g = torch.Generator().manual_seed(5)
    x = (3.0 + torch.randn(4, 16384, generator=g)).to(dtype)
    out = F.layer_norm(x, (16384,))
    with kernels.use_reference():
        oracle = F.layer_norm(x.double(), (16384,))
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    # One rounding of an O(4) value, plus float32 noise.
    assert (out.double() - oracle).abs().max().item() <= 4 * ulp * 1.01


@pytest.mark.parametrize(("channels_last", "dtype"), [
    (True, torch.float32), (False, torch.float32), (False, torch.bfloat16)])
def test_results_do_not_depend_on_thread_count(channels_last: bool, dtype: torch.dtype,
                                               num_threads) -> None:
    # NCHW batch norm (with and without a fused activation): channels of 64 x 2304 values (590 KB
    # in float32, two sweeps on one thread; 295 KB in bfloat16) are shared by 2 or 3 threads (3
    # where the process has 3 CPUs, else a channel per thread).
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 8, 48, 48, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(8).requires_grad_(True)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    results = []
    for n in (1, 2, 3):
        num_threads(n)
        outs = []
        for fn in (lambda t: F.batch_norm(t, None, None, w, None, training=True),
                   lambda t: F.batch_norm_act(t, None, None, w, None, training=True,
                                              activation="silu"),
                   lambda t: F.group_norm(t, 4, w),
                   lambda t: F.layer_norm(t, t.shape[-1:])):
            out = fn(x)
            outs.append((out, *torch.autograd.grad(out, [x, w], grad, allow_unused=True)))
        results.append(outs)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for ta, tb in zip(a, b):
                if ta is not None:
                    assert torch.equal(ta, tb)


def test_kernel_selected_for_cpu_and_not_forced_reference() -> None:
    from normlab.functional._normalize import REFERENCE as _REFERENCE

    x = torch.randn(2, 3)
    for op in ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"):
        assert kernels.select(op, x, _REFERENCE).name == f"cpu:{op}"
        assert kernels.select(op, x.to(torch.int32), _REFERENCE) is _REFERENCE
        with kernels.use_reference():
            assert kernels.select(op, x, _REFERENCE) is _REFERENCE


def test_a_kernel_registered_after_a_selection_is_chosen(monkeypatch) -> None:
    # select() remembers its choice per kind of input; a registration must start over.
    from normlab.functional._normalize import REFERENCE as _REFERENCE

    x = torch.randn(2, 3)
    assert kernels.select("layer_norm", x, _REFERENCE).name == "cpu:layer_norm"
    monkeypatch.setitem(kernels._REGISTRY, "layer_norm", list(kernels._REGISTRY["layer_norm"]))
    custom = kernels.Kernel(forward=_REFERENCE.forward, backward=_REFERENCE.backward,
                            name="custom", applies=lambda t: t.dtype == torch.float32)
    try:
        kernels.register("layer_norm", custom)
        assert kernels.select("layer_norm", x, _REFERENCE) is custom
        assert kernels.select("layer_norm", x.double(), _REFERENCE).name == "cpu:layer_norm"
    finally:
        kernels._CHOSEN.clear()  # the registry is restored by monkeypatch


def test_missing_compiler_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path) -> None:
    monkeypatch.setattr(_build, "_libs", {})
    monkeypatch.setattr(_build, "_failed", {})
    monkeypatch.setattr(_build, "_warned", set())
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="could not build the C.. CPU kernels"):
        out = F.layer_norm(x, (8,))
    assert not _build.available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        out2 = F.layer_norm(x, (8,))
    with kernels.use_reference():
        ref = F.layer_norm(x, (8,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, ref)


def test_import_compiles_nothing(tmp_path) -> None:
    code = textwrap.dedent("""
        import normlab
        from normlab.kernels import _build
        assert not _build._libs, "import normlab loaded a kernel library"
        assert not any(_build.cache_dir().glob("**/*.so")), "import normlab compiled a kernel"
        print("ok")
    """)
    env = {**os.environ, "NORMLAB_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_channels_last_check_from_strides_matches_movedim() -> None:
    # The stride walk that replaced `x.movedim(channels, last).is_contiguous()` (host time per
    # call) must agree with it on every dim order, size-1 dims and non-dense views included.
    import itertools

    from normlab.kernels.problems import channels_last as _channels_last

    def by_movedim(x: torch.Tensor, nchan: int) -> bool:
        src = tuple(range(1, 1 + nchan))
        return x.movedim(src, tuple(range(x.dim() - nchan, x.dim()))).is_contiguous()

    checked = 0
    for shape in [(2, 3, 4, 5), (1, 3, 1, 1), (2, 1, 4, 5), (2, 3, 1, 5), (3, 4, 5),
                  (2, 3, 4, 5, 6), (1, 1, 1, 1), (4, 6, 2, 3, 3)]:
        base = torch.randn(shape)
        for perm in itertools.permutations(range(len(shape))):
            inverse = [perm.index(i) for i in range(len(shape))]
            y = base.permute(perm).contiguous().permute(inverse)
            for t in (y, y[..., ::2]):
                for nchan in (1, 2):
                    assert _channels_last(t, nchan) == by_movedim(t, nchan), (shape, perm, nchan)
                    checked += 1
    assert checked > 1000


@pytest.mark.parametrize(("op", "shape", "layout", "batch_stats"), [
    ("layer_norm", (6, 33), ((1,), (33,)), True),
    ("batch_norm", (4, 5, 3, 7), ((0, 2, 3), (1, 5, 1, 1)), True),
    ("batch_norm", (4, 5, 3, 7), ((0, 2, 3), (1, 5, 1, 1)), False),
    ("group_norm", (3, 2, 4, 5), ((2, 3), (1, 2, 4, 1)), True),
])
def test_backward_reads_non_contiguous_statistics(op: str, shape: tuple[int, ...], layout,
                                                  batch_stats: bool) -> None:
    # Saved statistics that are strided views (every other element of a larger buffer) are made
    # contiguous for the kernel, and the copies stay alive through the call: a freed temporary's
    # pointer would let the second copy reuse the first one's memory.
    from normlab.functional._normalize import Layout, normalize_backward

    lay = Layout(*layout)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    stat_shape = ((shape[0], 1) if op == "layer_norm" else
                  (1, shape[1], 1, 1) if op == "batch_norm" else (shape[0], shape[1], 1, 1))
    big_m = torch.randn(*stat_shape[:-1], 2 * stat_shape[-1], generator=g)
    big_r = torch.rand(*stat_shape[:-1], 2 * stat_shape[-1], generator=g) + 0.5
    mean, invstd = big_m[..., ::2], big_r[..., ::2]
    assert not mean.is_contiguous() and not invstd.is_contiguous()
    w = torch.randn(lay.param_shape, generator=g).reshape(-1)
    needs = (True, True, True)
    got = cpu._backward(op, grad, x, w, None, mean, invstd, lay, batch_stats, needs)
    assert got is not None, "the CPU kernel declined the case"
    want = normalize_backward(grad, x, w, mean.contiguous(), invstd.contiguous(), lay,
                              batch_stats, needs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.reshape(e.shape), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.9, 1.0])
def test_running_stats_kernel_matches_the_reference(dtype: torch.dtype, momentum: float) -> None:
    import importlib

    reference = importlib.import_module("normlab.functional.batch_norm").update_running_stats
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(1, 7, 1, 1, generator=g, dtype=dtype) * 3
    var = torch.rand(1, 7, 1, 1, generator=g, dtype=dtype) * 2
    start = (torch.randn(7, generator=g, dtype=dtype), torch.rand(7, generator=g, dtype=dtype) + 1)
    got, want = [t.clone() for t in start], [t.clone() for t in start]
    assert kernels.select("running_stats", mean, None).name == "cpu:running_stats"
    assert cpu.running_stats(*got, mean, var, 50, momentum, True) is True
    assert reference(*want, mean, var, 50, momentum, True) is True
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=2 * torch.finfo(dtype).eps, atol=0)
    # a NaN or inf statistic: nothing changes when checked, torch's commit when not
    for bad in (float("nan"), float("inf")):
        broken = var.clone()
        broken[0, 3] = bad
        kept = [t.clone() for t in start]
        assert cpu.running_stats(*kept, mean, broken, 50, momentum, True) is False
        assert all(torch.equal(a, e) for a, e in zip(kept, start))
        assert cpu.running_stats(*kept, mean, broken, 50, momentum, False) is True
        assert not torch.isfinite(kept[1][3]) and torch.isfinite(kept[1][:3]).all()


def test_running_stats_kernel_hands_mixed_dtypes_to_the_reference() -> None:
    from normlab.functional import _ops

    rm, rv = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    # the kernel declines (float16 buffers, float32 statistics); the op runs the reference
    assert cpu.running_stats(rm, rv, torch.ones(1, 3), torch.ones(1, 3), 4, 0.5, True) is None
    assert _ops.commit_flag(rm, rv, torch.ones(1, 3), torch.ones(1, 3), 4, 0.5, True) is True
    torch.testing.assert_close(rm, torch.full((3,), 0.5, dtype=torch.float16))


def test_a_damaged_cached_library_is_rebuilt_not_mapped(tmp_path) -> None:
    # A library cut short (partial copy, full disk, power loss) used to kill every later process
    # with SIGBUS on its first kernel call; run in a subprocess so that a crash fails this test.
    built, _cmd = _build._target(0, False)
    assert _build.intact(built)
    env = {**os.environ, "NORMLAB_CACHE_DIR": str(tmp_path)}
    code = textwrap.dedent("""
        import torch, normlab.functional as F
        from normlab.kernels import _build
        x = torch.randn(64, 1024)
        y = F.layer_norm(x, (1024,))
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (1024,)))
        assert (0, False) in _build._libs and _build.available()
        print("ok")
    """)
    target = tmp_path / "kernels" / built.name
    target.parent.mkdir(parents=True)
    shutil.copy(built, target)
    shutil.copy(_build._stamp(built), _build._stamp(target))
    with open(target, "r+b") as f:  # keep the stamp, cut the library in half
        f.truncate(target.stat().st_size // 2)
    assert not _build.intact(target)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert _build.intact(target)  # rebuilt in place, stamped


def test_intact_rejects_empty_garbage_and_unstamped_libraries(tmp_path) -> None:
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF" + bytes(1000))
    assert not _build.intact(lib)  # no stamp: a build that did not finish
    _build._write_durably(_build._stamp(lib), _build._digest(lib).encode())
    assert _build.intact(lib)
    lib.write_bytes(b"")
    assert not _build.intact(lib)
    lib.write_bytes(b"garbage" * 100)
    assert not _build.intact(lib)


def test_one_failing_variant_leaves_the_others_working(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "_failed", {})
    monkeypatch.setattr(_build, "_warned", set())
    monkeypatch.setattr(_build, "_libs", {k: v for k, v in _build._libs.items() if k != (3, False)})
    real = _build._compile

    def compile_but_float16(dtype_code: int, act: bool):
        if dtype_code == 3:
            raise RuntimeError("compiler failed: float16 is broken here")
        return real(dtype_code, act)

    monkeypatch.setattr(_build, "_compile", compile_but_float16)
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="float16 is broken here"):
        half = F.layer_norm(x.half(), (8,))
    torch.testing.assert_close(half, torch.nn.functional.layer_norm(x.half().float(), (8,)).half(),
                               **TOL[torch.float16])
    assert _build.library(3) is None and _build.library(0) is not None
    assert kernels.select("layer_norm", x, None).name == "cpu:layer_norm"


def test_an_unwritable_cache_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(_build, "_libs", {})
    monkeypatch.setattr(_build, "_failed", {})
    monkeypatch.setattr(_build, "_warned", set())
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a cache "directory" below a file cannot be created, even by root
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="not writable.*NORMLAB_CACHE_DIR"):
        out = F.layer_norm(torch.randn(4, 8), (8,))
    assert out.shape == (4, 8)


def test_large_parameter_stand_ins_are_not_kept() -> None:
    before = cpu._filled_cached.cache_info().currsize
    big = cpu._filled(1 << 20, torch.float32, 1.0, "cpu")
    assert cpu._filled(1 << 20, torch.float32, 1.0, "cpu") is not big
    assert cpu._filled_cached.cache_info().currsize == before
    assert cpu._filled(8, torch.float32, 1.0, "cpu") is cpu._filled(8, torch.float32, 1.0, "cpu")


def test_temporaries_of_killed_builds_are_removed(tmp_path) -> None:
    old, fresh = tmp_path / "tmpabc.so", tmp_path / "tmpdef.so"
    old.write_bytes(b"half a library")
    fresh.write_bytes(b"a build in progress")
    os.utime(old, (0, 0))  # from a build killed long ago
    _build._remove_stale_temporaries(tmp_path)
    assert not old.exists() and fresh.exists()
