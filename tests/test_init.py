"""normlab.init: formulas, torch.nn.init as oracle, and signal propagation through 50 layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from normlab import init as ni
from normlab.nn import BatchNorm1d

DEPTH = 50
WIDTH = 256


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-7, atol: float = 0.0
) -> None:
    # NumPy's comparison: torch.testing's first call imports torch.distributed (~4 s here).
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol, atol)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Hundreds of small matmuls and QRs: on a busy 2-core machine OpenMP synchronization of a
    # second thread costs more than it saves (measured 100x on a 128x128 QR).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- fans and gains ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fans"),
    [
        ((7, 5), (5, 7)),  # Linear(5, 7)
        ((8, 3, 3, 5), (45, 120)),  # Conv2d(3, 8, (3, 5))
        ((6, 2, 3), (6, 18)),  # Conv1d(4, 6, 3, groups=2): dim 1 holds in / groups
        ((4, 2, 2, 3, 1), (12, 24)),  # Conv3d(2, 4, (2, 3, 1))
        ((3, 8, 2, 2), (32, 12)),  # ConvTranspose2d(3, 8, 2): (in, out, k, k), fans swapped
    ],
)
def test_fans(shape, fans):
    assert ni.compute_fans(torch.empty(shape)) == fans


def test_fans_of_real_layers():
    conv = nn.Conv2d(3, 8, (3, 5))
    assert ni.compute_fans(conv.weight) == (3 * 15, 8 * 15)
    assert ni.compute_fans(nn.Linear(5, 7).weight) == (5, 7)


@pytest.mark.parametrize(
    ("nonlinearity", "param", "expected"),
    [
        ("linear", None, 1.0),
        ("conv2d", None, 1.0),
        ("sigmoid", None, 1.0),
        ("tanh", None, 5 / 3),
        ("relu", None, math.sqrt(2)),
        ("leaky_relu", None, math.sqrt(2 / (1 + 0.01**2))),
        ("leaky_relu", 0.2, math.sqrt(2 / 1.04)),
        ("leaky_relu", 1, 1.0),
        ("selu", None, 0.75),
    ],
)
def test_gain_formula_and_torch(nonlinearity, param, expected):
    gain = ni.calculate_gain(nonlinearity, param)
    assert gain == pytest.approx(expected, rel=1e-12)
    assert gain == pytest.approx(nn.init.calculate_gain(nonlinearity, param), rel=1e-12)


# -- per-tensor schemes: torch as oracle, then the formula ----------------------------------------

_ORACLE_CASES = [
    ("xavier_uniform_", {}, {}),
    ("xavier_uniform_", {"gain": 5 / 3}, {"gain": 5 / 3}),
    ("xavier_normal_", {"gain": 2.0}, {"gain": 2.0}),
    ("kaiming_uniform_", {}, {}),
    ("kaiming_uniform_", {"a": 0.2, "mode": "fan_out"}, {"a": 0.2, "mode": "fan_out"}),
    ("kaiming_normal_", {"nonlinearity": "relu"}, {"nonlinearity": "relu"}),
    (
        "kaiming_normal_",
        {"mode": "fan_out", "nonlinearity": "tanh"},
        {"mode": "fan_out", "nonlinearity": "tanh"},
    ),
]


@pytest.mark.parametrize(("name", "ours", "theirs"), _ORACLE_CASES)
@pytest.mark.parametrize("shape", [(30, 20), (16, 8, 3, 3)])
def test_same_draws_as_torch_for_the_same_generator(name, ours, theirs, shape):
    expected = getattr(nn.init, name)(torch.empty(shape), generator=_gen(0), **theirs)
    got = getattr(ni, name)(torch.empty(shape), generator=_gen(0), **ours)
    _assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_lecun_normal_is_kaiming_linear():
    expected = nn.init.kaiming_normal_(
        torch.empty(40, 30), nonlinearity="linear", generator=_gen(1)
    )
    _assert_close(ni.lecun_normal_(torch.empty(40, 30), generator=_gen(1)), expected, 1e-6)


# (function, kwargs, shape, expected std, uniform bound or None); fan_in = 120·9 for the conv.
_FORMULA_CASES = [
    (ni.xavier_uniform_, {}, (300, 500), math.sqrt(2 / 800), math.sqrt(6 / 800)),
    (ni.xavier_normal_, {"gain": 5 / 3}, (300, 500), 5 / 3 * math.sqrt(2 / 800), None),
    (
        ni.kaiming_uniform_,
        {"nonlinearity": "relu"},
        (300, 500),
        math.sqrt(2 / 500),
        math.sqrt(6 / 500),
    ),
    (ni.kaiming_normal_, {"nonlinearity": "relu"}, (96, 120, 3, 3), math.sqrt(2 / 1080), None),
    (
        ni.kaiming_normal_,
        {"mode": "fan_out", "nonlinearity": "relu"},
        (96, 120, 3, 3),
        math.sqrt(2 / 864),
        None,
    ),
    (
        ni.kaiming_normal_,
        {"a": 0.5, "nonlinearity": "leaky_relu"},
        (300, 500),
        math.sqrt(2 / 1.25 / 500),
        None,
    ),
    (ni.lecun_normal_, {}, (96, 120, 3, 3), math.sqrt(1 / 1080), None),
    (ni.lecun_uniform_, {}, (300, 500), math.sqrt(1 / 500), math.sqrt(3 / 500)),
]


@pytest.mark.parametrize(("fn", "kwargs", "shape", "std", "bound"), _FORMULA_CASES)
def test_empirical_std_and_bound_match_formula(fn, kwargs, shape, std, bound):
    w = fn(torch.empty(shape, dtype=torch.float64), generator=_gen(2), **kwargs)
    # >= 100k draws: the sample std is within 1% of the truth by many standard errors.
    assert w.std().item() == pytest.approx(std, rel=0.01)
    assert w.mean().abs().item() < 0.01 * std
    if bound is not None:
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() >= 0.999 * bound


@pytest.mark.parametrize("shape", [(64, 64), (20, 50), (50, 20), (16, 4, 3, 3), (64, 4, 3)])
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2)])
def test_orthogonal_rows_or_columns_are_orthonormal(shape, gain):
    w = ni.orthogonal_(torch.empty(shape, dtype=torch.float64), gain=gain, generator=_gen(3))
    flat = w.reshape(shape[0], -1)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    _assert_close(gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-12)


def test_orthogonal_is_haar_not_sign_biased():
    # Without the sign(diag R) fix, LAPACK's Householder QR makes Q's diagonal skew negative.
    diag = torch.stack(
        [ni.orthogonal_(torch.empty(8, 8), generator=_gen(s)).diagonal() for s in range(300)]
    )
    assert abs(diag.mean().item()) < 0.03
    assert diag.var().item() == pytest.approx(1 / 8, rel=0.15)  # Haar: E[q_ii^2] = 1/n


def test_orthogonal_half_and_parameters():
    w = ni.orthogonal_(torch.empty(32, 16, dtype=torch.float16), generator=_gen(4)).float()
    _assert_close(w.T @ w, torch.eye(16), atol=3e-3, rtol=0)
    p = nn.Parameter(torch.empty(10, 10))
    ni.orthogonal_(p)  # in place on a leaf that requires grad: works under no_grad
    assert p.requires_grad and p.grad_fn is None


@pytest.mark.parametrize(
    "fn",
    [
        ni.xavier_uniform_,
        ni.xavier_normal_,
        ni.kaiming_uniform_,
        ni.kaiming_normal_,
        ni.lecun_normal_,
        ni.lecun_uniform_,
        ni.orthogonal_,
        ni.compute_fans,
    ],
)
def test_one_dim_tensor_raises(fn):
    with pytest.raises(ValueError, match=r"at least 2 dims.*\[5\]"):
        fn(torch.empty(5))


@pytest.mark.parametrize(
    "fn",
    [
        ni.xavier_uniform_,
        ni.xavier_normal_,
        ni.kaiming_uniform_,
        ni.kaiming_normal_,
        ni.lecun_normal_,
        ni.lecun_uniform_,
        ni.orthogonal_,
    ],
)
def test_zero_element_tensor_is_returned_unchanged(fn):
    w = torch.empty(0, 5)
    assert fn(w) is w


def test_unknown_nonlinearity_mode_and_param_raise():
    with pytest.raises(ValueError, match="unknown nonlinearity 'gelu'; choose one of linear"):
        ni.calculate_gain("gelu")
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        ni.kaiming_normal_(torch.empty(3, 3), nonlinearity="swish")
    with pytest.raises(ValueError, match="negative slope must be a number"):
        ni.calculate_gain("leaky_relu", "0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='fan_avg' is not a fan mode"):
        ni.kaiming_uniform_(torch.empty(3, 3), mode="fan_avg")  # type: ignore[arg-type]


# -- initialize: model-wide ------------------------------------------------------------------------


class _FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(200, 300), nn.Linear(300, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_initialize_infers_nonlinearity_in_module_order():
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3),
        nn.BatchNorm2d(64),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 64, 3),  # followed directly by another weight layer
        nn.Conv2d(64, 32, 3),
        nn.Dropout(),
        nn.Tanh(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(32, 400), nn.SELU()),  # nested containers are walked too
        nn.Linear(400, 10),
    )
    used = ni.initialize(model, "kaiming", generator=_gen(5))
    assert used == {"0": "leaky_relu", "3": "linear", "4": "tanh", "8.0": "selu", "9": "linear"}
    expected_std = {
        "0": math.sqrt(2 / 1.04 / 27),
        "3": 1 / math.sqrt(576),
        "4": 5 / 3 / math.sqrt(576),
        "8.0": 0.75 / math.sqrt(32),
        "9": 1 / math.sqrt(400),
    }
    layers = dict(model.named_modules())
    for name, std in expected_std.items():
        assert layers[name].weight.std().item() == pytest.approx(std, rel=0.05), name
        assert torch.count_nonzero(layers[name].bias) == 0


def test_initialize_without_activation_modules_uses_the_schemes_regime():
    assert ni.initialize(_FunctionalMLP(), "kaiming") == {"fc1": "relu", "fc2": "relu"}
    assert ni.initialize(_FunctionalMLP(), "xavier") == {"fc1": "linear", "fc2": "linear"}
    model = _FunctionalMLP()
    assert ni.initialize(model, "xavier", "tanh") == {"fc1": "tanh", "fc2": "tanh"}
    assert model.fc1.weight.std().item() == pytest.approx(5 / 3 * math.sqrt(2 / 500), rel=0.05)


@pytest.mark.parametrize(
    ("scheme", "distribution", "std"),
    [
        ("xavier", None, math.sqrt(2 / 500)),
        ("xavier", "normal", math.sqrt(2 / 500)),
        ("kaiming", None, math.sqrt(1 / 200)),  # nonlinearity="linear": gain 1
        ("kaiming", "uniform", math.sqrt(1 / 200)),
        ("lecun", None, math.sqrt(1 / 200)),
        ("lecun", "uniform", math.sqrt(1 / 200)),
        ("orthogonal", None, math.sqrt(1 / 300)),  # 300x200: orthonormal columns, gain 1
    ],
)
def test_initialize_schemes_set_the_formula_std(scheme, distribution, std):
    model = _FunctionalMLP()
    ni.initialize(model, scheme, "linear", distribution=distribution, generator=_gen(6))
    assert model.fc1.weight.std().item() == pytest.approx(std, rel=0.03)
    is_uniform = (distribution or ("uniform" if scheme == "xavier" else "normal")) == "uniform"
    kurtosis = (model.fc1.weight / model.fc1.weight.std()).pow(4).mean().item()
    if scheme != "orthogonal":
        assert kurtosis == pytest.approx(1.8 if is_uniform else 3.0, abs=0.15)


def test_initialize_zeroes_biases_leaves_norms_and_is_reproducible():
    def make() -> nn.Sequential:
        model = nn.Sequential(
            nn.Linear(8, 16), BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4), nn.LayerNorm(4)
        )
        model[1].running_mean.fill_(0.5)
        return model

    a, b = make(), make()
    ni.initialize(a, "orthogonal", generator=_gen(7))
    ni.initialize(b, "orthogonal", generator=_gen(7))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert torch.count_nonzero(a[0].bias) == 0 and torch.count_nonzero(a[3].bias) == 0
    assert torch.equal(a[1].weight, torch.ones(16)) and torch.equal(a[1].bias, torch.zeros(16))
    assert torch.equal(a[4].weight, torch.ones(4)) and torch.equal(a[4].bias, torch.zeros(4))
    assert torch.equal(a[1].running_mean, torch.full((16,), 0.5))
    w = a[0].weight
    _assert_close(w.T @ w, 2 * torch.eye(8), atol=1e-5, rtol=0)  # relu gain sqrt 2


def test_initialize_errors():
    model = _FunctionalMLP()
    before = model.fc1.weight.clone()
    with pytest.raises(ValueError, match="unknown scheme 'he'; choose one of xavier, kaiming"):
        ni.initialize(model, "he")
    with pytest.raises(ValueError, match="unknown nonlinearity 'swish'"):
        ni.initialize(model, "xavier", "swish")
    with pytest.raises(ValueError, match="distribution='laplace'"):
        ni.initialize(model, "xavier", distribution="laplace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode='fan_avg'"):
        ni.initialize(model, "kaiming", mode="fan_avg")  # type: ignore[arg-type]
    assert torch.equal(model.fc1.weight, before)  # rejected calls change nothing
    with pytest.raises(ValueError, match=r"lazy.*run one forward pass"):
        ni.initialize(nn.Sequential(nn.LazyLinear(4)), "xavier")


# -- signal propagation through a 50-layer stack ---------------------------------------------------


def _stack(act: type[nn.Module] | None, width: int = WIDTH, depth: int = DEPTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Linear(width, width))
        if act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


def _layer_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Variance of every Linear's output (the pre-activations), in forward order."""
    out: list[float] = []
    handles = [
        m.register_forward_hook(lambda m, a, o: out.append(o.double().var().item()))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _naive_(model: nn.Module, std: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std, generator=_gen(99))
            nn.init.zeros_(m.bias)


@pytest.mark.parametrize(
    ("scheme", "act", "band"),
    [
        # Bands on (pre-activation variance of every layer) / (input variance). Failing regimes
        # sit at 2^±50 ~ 1e±15 after 50 layers; a 10% per-layer error compounds to 1.1^50 ~ 117.
        ("xavier", nn.Tanh, (0.25, 4.0)),  # tanh's gain 5/3 settles at a fixed point ~1.2
        ("xavier", None, (0.25, 4.0)),
        # He: pre-activations keep 2x the input variance in expectation; the finite-width
        # random walk of log-variance (grows like depth / width) spans ~[0.1, 6] over seeds.
        ("kaiming", nn.ReLU, (0.01, 100.0)),
        ("lecun", nn.SELU, (0.5, 2.0)),  # self-normalizing: (0, 1) is an attracting fixed point
        ("orthogonal", None, (0.95, 1.05)),  # a product of orthogonal maps keeps every norm
    ],
)
def test_scheme_preserves_variance_through_50_layers_where_naive_fails(scheme, act, band):
    x = torch.randn(128, WIDTH, generator=_gen(10))
    model = _stack(act)
    ni.initialize(model, scheme, generator=_gen(11))
    ratios = [v / x.var().item() for v in _layer_variances(model, x)]
    assert len(ratios) == DEPTH
    assert band[0] < min(ratios) and max(ratios) < band[1], (min(ratios), max(ratios))

    # The same stack with a naive constant std vanishes, or explodes (tanh: saturates).
    _naive_(model, 0.01)
    assert _layer_variances(model, x)[-1] / x.var().item() < 1e-6
    _naive_(model, 1.0)
    assert not _layer_variances(model, x)[-1] / x.var().item() <= band[1]  # inf/NaN count


@pytest.mark.parametrize(
    ("scheme", "nonlinearity", "act", "vanishes"),
    [
        ("xavier", "linear", nn.ReLU, True),  # ReLU halves the variance per layer: 2^-50
        ("kaiming", "relu", None, False),  # ReLU's gain without ReLU doubles it: 2^50
    ],
)
def test_scheme_outside_its_regime_fails(scheme, nonlinearity, act, vanishes):
    x = torch.randn(128, WIDTH, generator=_gen(12))
    model = _stack(act)
    ni.initialize(model, scheme, nonlinearity, generator=_gen(13))
    last = _layer_variances(model, x)[-1] / x.var().item()
    assert (last < 1e-9) if vanishes else (last > 1e9)


# -- LSUV ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw 8x8 digit pixels (0..16, not standardized): a 500-image LSUV batch and the rest."""
    x = torch.tensor(load_digits().data, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=_gen(14))
    return x[perm[:500]], x[perm[500:]]


def test_lsuv_preserves_variance_through_50_relu_layers_on_real_data(digits):
    batch, held_out = digits
    model = _stack(nn.ReLU, width=64)
    report = ni.lsuv(model, batch, generator=_gen(15))
    assert [r.name for r in report] == [str(2 * i) for i in range(DEPTH)]
    assert all(r.converged and abs(r.variance - 1) < 0.1 for r in report)
    assert report[0].iterations >= 1  # raw pixels (variance ~36) needed a rescale
    # On images the batch did not contain, every layer's output variance is still ~1.
    variances = _layer_variances(model, held_out)
    assert min(variances) > 0.5 and max(variances) < 2.0, (min(variances), max(variances))

    # Orthogonal init alone (LSUV's first step) vanishes through ReLUs; so does a naive std.
    ni.initialize(model, "orthogonal", "linear", generator=_gen(15))
    assert _layer_variances(model, held_out)[-1] < 1e-9
    _naive_(model, 0.01)
    assert _layer_variances(model, held_out)[-1] < 1e-9


def test_lsuv_on_a_conv_net(digits):
    batch, _ = digits
    images = batch.view(-1, 1, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    report = ni.lsuv(model, images, tol=0.01, max_iter=20)
    assert [r.name for r in report] == ["0", "3", "6"]
    assert all(r.converged for r in report)
    with torch.no_grad():
        assert model[0](images).var().item() == pytest.approx(1.0, abs=0.01)
        assert model(images).var().item() == pytest.approx(1.0, abs=0.01)


def test_lsuv_report_counts_rescales_and_stops_at_max_iter(digits):
    batch, _ = digits
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    report = ni.lsuv(model, batch, tol=1e-12, max_iter=1)
    assert [r.iterations for r in report] == [1, 1]
    assert [r.converged for r in report] == [False, False]
    assert all(abs(r.variance - 1) < 0.05 for r in report)


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _bn_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(64, 32),
        BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 10),
        nn.Sequential(nn.BatchNorm1d(10)),
    )
    model.train()
    model[5].eval()  # mixed modes (a frozen submodule) must come back as they were
    return model


def test_lsuv_restores_modes_leaves_no_hooks_and_no_running_stat_updates(digits):
    batch, _ = digits
    model = _bn_model()
    modes, hooks = _modes(model), _hook_count(model)
    stats = [b.clone() for b in model.buffers()]
    report = ni.lsuv(model, batch)
    assert len(report) == 2 and all(r.converged for r in report)
    assert _modes(model) == modes and _hook_count(model) == hooks
    for before, after in zip(stats, model.buffers()):
        assert torch.equal(before, after)


def test_lsuv_constant_batch_raises_and_still_restores(digits):
    model = _bn_model()
    modes, hooks = _modes(model), _hook_count(model)
    with pytest.raises(RuntimeError, match=r"layer '0' has output variance 0.0.*not constant"):
        ni.lsuv(model, torch.zeros(16, 64))
    assert _modes(model) == modes and _hook_count(model) == hooks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 0.0}, "tol=0.0 must be"),
        ({"tol": -1}, "tol=-1"),
        ({"max_iter": 0}, "max_iter=0"),
        ({"max_iter": 2.5}, "max_iter=2.5"),
    ],
)
def test_lsuv_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ni.lsuv(nn.Linear(3, 3), torch.randn(4, 3), **kwargs)
