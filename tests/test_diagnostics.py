"""Estimators and one-shot diagnostics of normlab.diagnostics against direct computations."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.diagnostics import (
    SATURATION_MARGIN,
    ActivationStats,
    DeadUnits,
    GradientNorm,
    InputDrift,
    batch_coupling,
    batch_stat_noise,
    bn_input_noise,
    dead_units,
    first_tensor,
    gradient_change,
    gradient_flow,
    percentiles,
    running_stats_gap,
    saturation_bounds,
    to_records,
    train_eval_gap,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add waiting on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- activation statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentiles_match_numpy(n: int) -> None:
    x = torch.randn(n, generator=_gen(n), dtype=torch.float64)
    q = [0, 15, 50, 85, 100, 33.3]
    np.testing.assert_allclose(percentiles(x, q).numpy(), np.percentile(x.numpy(), q), rtol=1e-12)


def test_percentiles_reject_bad_levels() -> None:
    with pytest.raises(ValueError, match=r"q must lie in \[0, 100\]"):
        percentiles(torch.randn(5), [150])
    with pytest.raises(ValueError, match="x is empty"):
        percentiles(torch.empty(0), [50])


def test_activation_stats_over_several_updates_match_numpy() -> None:
    g = _gen(1)
    chunks = [torch.randn(3, 40, generator=g) * 2 + 5, torch.randn(7, 40, generator=g)]
    stats = ActivationStats(max_samples=10_000)
    for c in chunks:
        stats.update(c)
    out = stats.compute()
    every = torch.cat([c.reshape(-1) for c in chunks]).double().numpy()
    assert float(out["mean"]) == pytest.approx(every.mean(), rel=1e-6)
    assert float(out["std"]) == pytest.approx(every.std(), rel=1e-6)
    for q in (15, 50, 85):
        assert float(out[f"p{q}"]) == pytest.approx(np.percentile(every, q), rel=1e-6)
    assert "saturated" not in out


def test_activation_stats_subsample_estimates_percentiles() -> None:
    x = torch.randn(200_000, generator=_gen(2))
    stats = ActivationStats(max_samples=2048)
    stats.update(x[:50_000])
    stats.update(x[50_000:])
    out = stats.compute()
    assert float(out["mean"]) == pytest.approx(float(x.double().mean()), abs=1e-6)  # exact
    for q, z in ((15, -1.0364), (50, 0.0), (85, 1.0364)):
        assert float(out[f"p{q}"]) == pytest.approx(z, abs=0.1)  # a 2048-value estimate


def test_saturation_threshold_is_one_percent_of_the_range() -> None:
    assert SATURATION_MARGIN == 0.01
    assert saturation_bounds(nn.Sigmoid()) == pytest.approx((0.01, 0.99))
    assert saturation_bounds(nn.Tanh()) == pytest.approx((-0.98, 0.98))
    assert saturation_bounds(nn.ReLU()) is None
    stats = ActivationStats(bounds=saturation_bounds(nn.Sigmoid()))
    stats.update(torch.tensor([0.005, 0.01, 0.5, 0.985, 0.995, 0.999]))
    assert float(stats.compute()["saturated"]) == pytest.approx(3 / 6)
    tanh = ActivationStats(bounds=saturation_bounds(nn.Tanh()))
    tanh.update(torch.tanh(torch.tensor([-5.0, -1.0, 0.0, 2.0, 2.5])))  # tanh(2.5) = 0.9866
    assert float(tanh.compute()["saturated"]) == pytest.approx(2 / 5)


def test_activation_stats_keep_a_copy_not_the_live_activation() -> None:
    x = torch.ones(10)
    stats = ActivationStats()
    stats.update(x)
    x.zero_()  # an in-place op after the hook must not change what was recorded
    assert float(stats.compute()["p50"]) == 1.0


# -- gradients ------------------------------------------------------------------------------------


def test_gradient_norm_is_the_norm_of_the_concatenation() -> None:
    a, b = torch.randn(3, 4, generator=_gen(3)), torch.randn(5, generator=_gen(4))
    norm = GradientNorm()
    assert norm.compute() == {}
    norm.update(a)
    norm.update(b)
    assert float(norm.compute()["norm"]) == pytest.approx(float(torch.cat([a.reshape(-1), b]).norm()))


@pytest.mark.parametrize(
    ("norms", "verdict"),
    [
        ({"a": 1e-4, "b": 0.5, "c": 1.0}, "vanishing"),
        ({"a": 2e-3, "c": 1.0}, "healthy"),
        ({"a": 0.3, "c": 1.0}, "healthy"),
        ({"a": 999.0, "c": 1.0}, "healthy"),
        ({"a": 1.1e3, "c": 1.0}, "exploding"),
        ({"a": 1.0, "b": math.nan, "c": 1.0}, "exploding"),
        ({"a": 0.0, "c": 0.0}, "vanishing"),
        ({"a": 1.0, "c": 0.0}, "exploding"),
    ],
)
def test_gradient_flow_verdict_thresholds(norms: dict[str, float], verdict: str) -> None:
    flow = gradient_flow(norms)
    assert flow.verdict == verdict
    assert (flow.first, flow.last) == ("a", "c")


def test_gradient_flow_needs_two_layers() -> None:
    with pytest.raises(ValueError, match="at least 2 layers"):
        gradient_flow({"a": 1.0})


def test_gradient_flow_orders_of_magnitude() -> None:
    assert gradient_flow({"a": 1e-4, "b": 1.0}).orders_of_magnitude == pytest.approx(-4)


# -- dead units -----------------------------------------------------------------------------------


def test_dead_units_on_a_hand_built_layer() -> None:
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1, 0] = 1.0  # unit 1 follows x0: alive when some x0 > 0
        lin.bias.copy_(torch.tensor([-1.0, 0.0, -2.0, 0.0]))  # unit 3 is exactly 0: dead too
    model = nn.Sequential(lin, nn.ReLU(), nn.Dropout(0.5))
    model.train()
    x = torch.randn(50, 3, generator=_gen(5))
    assert dead_units(model, x, batch_size=7) == {"1": pytest.approx(0.75)}
    assert model.training and model[2].training  # modes restored


def test_dead_units_per_channel_for_conv_outputs() -> None:
    y = torch.zeros(2, 3, 4, 4)
    y[1, 0, 3, 3] = 0.1  # channel 0 fires once: alive; channels 1 and 2 never
    y[0, 2] = -0.0
    dead = DeadUnits()
    dead.update(y)
    out = dead.compute()
    assert float(out["dead_fraction"]) == pytest.approx(2 / 3)
    assert float(out["dead_units"]) == 2


def test_dead_units_rejects_a_change_of_width() -> None:
    dead = DeadUnits()
    dead.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="got 4 units along dim 1, expected 3"):
        dead.update(torch.ones(2, 4))


# -- internal covariate shift: distribution drift -------------------------------------------------


def test_input_drift_of_a_pure_shift() -> None:
    x = torch.randn(500, 3, generator=_gen(6), dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    drift = InputDrift(max_samples=10_000)
    drift.update(x[:200])
    drift.update(x[200:])
    assert drift.compute() == {}  # the first measurement is only the reference
    shift = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    drift.update(x + shift)
    out = drift.compute()
    expected = float((shift / x.std(0, unbiased=False)).mean())
    assert float(out["shift_mean"]) == pytest.approx(expected, rel=1e-9)
    assert float(out["shift_w1"]) == pytest.approx(expected, rel=1e-9)  # quantiles move by shift


def test_input_drift_w1_of_a_rescaling_against_numpy() -> None:
    x = torch.randn(400, 2, generator=_gen(7), dtype=torch.float64)
    drift = InputDrift(levels=16, max_samples=10_000)
    drift.update(x)
    drift.compute()
    drift.update(2 * x)
    out = drift.compute()
    levels = (np.arange(16) + 0.5) / 16 * 100
    q0 = np.percentile(x.numpy(), levels, axis=0)
    w1 = np.abs(2 * q0 - q0).mean(axis=0) / x.numpy().std(axis=0)
    assert float(out["shift_w1"]) == pytest.approx(w1.mean(), rel=1e-9)
    assert float(out["shift_mean"]) == pytest.approx(
        float((x.mean(0).abs() / x.std(0, unbiased=False)).mean()), rel=1e-9)


def test_input_drift_skips_constant_units_and_checks_width() -> None:
    x = torch.randn(100, 2, generator=_gen(8))
    x[:, 1] = 0.0  # a unit fed by a dead ReLU
    drift = InputDrift()
    drift.update(x)
    drift.compute()
    drift.update(x + 1)
    assert float(drift.compute()["shift_mean"]) == pytest.approx(float(1 / x[:, 0].std(unbiased=False)))
    drift.update(torch.randn(10, 3))
    with pytest.raises(ValueError, match="has 3 units, the reference 2"):
        drift.compute()


# -- internal covariate shift: Santurkar's gradient change ----------------------------------------


def _tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
                         ).double()


def _manual_gradient_change(model: nn.Sequential, lr: float, momentum: float,
                            buffers: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                            ) -> dict[str, tuple[float, float]]:
    """Definition 2.1 by hand: SGD with momentum written out, layers as explicit tensors."""
    params = [p.detach().clone() for p in model.parameters()]  # w0, b0, w2, b2, w4, b4

    def grads(ps: list[torch.Tensor]) -> list[torch.Tensor]:
        ps = [p.clone().requires_grad_(True) for p in ps]
        h = torch.tanh(x @ ps[0].T + ps[1])
        h = torch.tanh(h @ ps[2].T + ps[3])
        loss = ((h @ ps[4].T + ps[5] - y) ** 2).mean()
        return list(torch.autograd.grad(loss, ps))

    g = grads(params)
    out = {}
    for i, name in ((1, "2"), (2, "4")):
        stepped = list(params)
        for j in range(2 * i):  # the parameters of layers 1 .. i-1
            buf = momentum * buffers[j] + g[j]
            stepped[j] = params[j] - lr * buf
        g_new = grads(stepped)
        before = torch.cat([g[2 * i].reshape(-1), g[2 * i + 1]])
        after = torch.cat([g_new[2 * i].reshape(-1), g_new[2 * i + 1]])
        cos = float(torch.dot(before, after) / (before.norm() * after.norm()))
        out[name] = (float((before - after).norm()), cos)
    return out


def test_gradient_change_equals_a_manual_two_step_computation() -> None:
    model = _tanh_mlp()
    g = _gen(9)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g,
                                                                             dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    nn.functional.mse_loss(model(x * 2), y).backward()  # one earlier step: momentum buffers != 0
    opt.step()
    opt.zero_grad()
    buffers = {j: opt.state[p]["momentum_buffer"].clone() for j, p in enumerate(model.parameters())}
    expected = _manual_gradient_change(model, 0.5, 0.9, buffers, x, y)
    got = gradient_change(model, opt, nn.functional.mse_loss, x, y)
    assert list(got) == ["2", "4"]  # the first layer has no predecessors
    for name, (l2, cos) in expected.items():
        assert got[name].l2 == pytest.approx(l2, rel=1e-9)
        assert got[name].cos == pytest.approx(cos, rel=1e-9)
        assert got[name].l2 > 0


def test_gradient_change_leaves_model_and_optimizer_untouched() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4, generator=_gen(10)), torch.randint(0, 2, (32,), generator=_gen(11))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    out = gradient_change(model, opt, nn.functional.cross_entropy, x, y)
    assert list(out) == ["1", "4", "5", "7"]
    assert all(c.l2 > 0 and -1 <= c.cos <= 1 for c in out.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, saved in zip(opt.state.values(), opt_state["state"].values()):
        assert all(torch.equal(p[k], saved[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.get_rng_state(), rng)
    again = gradient_change(model, opt, nn.functional.cross_entropy, x, y)
    assert again == out  # same seed for every forward: dropout masks do not add noise


# -- batch coupling -------------------------------------------------------------------------------


def _conv(norm: str) -> nn.Sequential:
    layers = {
        "bn": lambda c: nlnn.BatchNorm2d(c),
        "torch_bn": lambda c: nn.BatchNorm2d(c),
        "gn": lambda c: nlnn.GroupNorm(2, c),
        "torch_gn": lambda c: nn.GroupNorm(2, c),
        "in": lambda c: nlnn.InstanceNorm2d(c, affine=True),
    }
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3), layers[norm](4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         layers[norm](4), nn.Flatten(), nn.Linear(64, 3))


def _mlp(norm: str) -> nn.Sequential:
    layers = {"ln": lambda c: nlnn.LayerNorm(c), "torch_ln": lambda c: nn.LayerNorm(c),
              "rms": lambda c: nlnn.RMSNorm(c), "bn": lambda c: nlnn.BatchNorm1d(c)}
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), layers[norm](8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("make", [lambda: _conv("gn"), lambda: _conv("torch_gn"),
                                  lambda: _conv("in"), lambda: _mlp("ln"), lambda: _mlp("torch_ln"),
                                  lambda: _mlp("rms")])
def test_coupling_is_exactly_zero_for_per_sample_norms(make: object) -> None:
    model = make()  # type: ignore[operator]
    x_shape = (8, 1, 8, 8) if isinstance(model[0], nn.Conv2d) else (8, 6)
    x, others = torch.randn(x_shape, generator=_gen(12)), torch.randn(x_shape, generator=_gen(13))
    for index in (0, 5):
        c = batch_coupling(model, x, others, index=index)
        assert c.absolute == 0.0 and c.relative == 0.0


@pytest.mark.parametrize("norm", ["bn", "torch_bn"])
def test_coupling_of_batch_norm_in_train_mode_only(norm: str) -> None:
    model = _conv(norm)
    x, others = torch.randn(8, 1, 8, 8, generator=_gen(14)), torch.randn(8, 1, 8, 8,
                                                                          generator=_gen(15))
    state = copy.deepcopy(model.state_dict())
    train = batch_coupling(model, x, others, index=3)
    assert train.relative > 0.01
    assert batch_coupling(model, x, others, index=3, train=False).absolute == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics untouched


def test_coupling_errors() -> None:
    model = _mlp("bn")
    with pytest.raises(ValueError, match="at least 2 samples"):
        batch_coupling(model, torch.randn(1, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="needs 3 replacement samples"):
        batch_coupling(model, torch.randn(4, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="index 4 is out of range"):
        batch_coupling(model, torch.randn(4, 6), torch.randn(4, 6), index=4)


# -- train/inference discrepancy ------------------------------------------------------------------


def test_train_eval_gap_against_a_direct_computation() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    model.train()
    x, y = torch.randn(40, 6, generator=_gen(16)), torch.randint(0, 3, (40,), generator=_gen(17))
    state = copy.deepcopy(model.state_dict())
    gap = train_eval_gap(model, x, y, batch_size=6)  # 6 whole batches: 36 samples
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.training and model[3].training
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        out_eval = ref(x[:36])
        ref[1].train()  # only the batch-statistics layer; dropout stays off
        out_train = torch.cat([ref(x[i : i + 6]) for i in range(0, 36, 6)])
    assert gap.samples == 36
    assert gap.output_gap == pytest.approx(float((out_train - out_eval).norm() / out_eval.norm()),
                                           rel=1e-6)
    acc_t = float((out_train.argmax(1) == y[:36]).float().mean())
    acc_e = float((out_eval.argmax(1) == y[:36]).float().mean())
    assert (gap.train_accuracy, gap.eval_accuracy) == pytest.approx((acc_t, acc_e))
    assert gap.accuracy_gap == pytest.approx(acc_t - acc_e)
    assert gap.disagreement == pytest.approx(
        float((out_train.argmax(1) != out_eval.argmax(1)).float().mean()))
    assert gap.output_gap > 0


def test_train_eval_gap_is_zero_without_batch_statistics() -> None:
    gap = train_eval_gap(_mlp("ln"), torch.randn(20, 6, generator=_gen(18)), batch_size=4)
    assert gap.output_gap == 0.0 and gap.disagreement == 0.0
    assert math.isnan(gap.train_accuracy) and math.isnan(gap.accuracy_gap)
    with pytest.raises(ValueError, match="at least one whole batch of 32"):
        train_eval_gap(_mlp("ln"), torch.randn(20, 6), batch_size=32)


def test_running_stats_gap_against_a_direct_computation() -> None:
    bn = nlnn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.5]))
    x = torch.randn(300, 3, generator=_gen(19), dtype=torch.float64) * 2 + 0.5
    model = nn.Sequential(bn, nn.ReLU()).double()
    out = running_stats_gap(model, x, batch_size=64)
    mu, var = x.mean(0), x.var(0, unbiased=True)
    rm, rv = bn.running_mean, bn.running_var
    mean_gaps = (rm - mu).abs() / (var + bn.eps).sqrt()
    assert list(out) == ["0"]
    assert out["0"].mean_gap == pytest.approx(float(mean_gaps.mean()), rel=1e-9)
    assert out["0"].max_mean_gap == pytest.approx(float(mean_gaps.max()), rel=1e-9)
    assert out["0"].var_gap == pytest.approx(
        float(((rv + bn.eps) / (var + bn.eps)).log().abs().mean()), rel=1e-9)


# -- batch-statistic noise ------------------------------------------------------------------------


def test_batch_noise_of_gaussian_features_follows_theory() -> None:
    x = torch.randn(16384, 4, generator=_gen(20), dtype=torch.float64)
    noise = batch_stat_noise(x, [2, 8, 32, 100_000], max_batches=4096)
    assert set(noise) == {2, 8, 32}  # larger than the data: skipped
    for b, n in noise.items():
        assert n.mean_noise == pytest.approx(1 / math.sqrt(b), rel=0.1)
        assert n.var_noise == pytest.approx(math.sqrt(2 * b - 1) / b, rel=0.1)
        assert n.batches == min(16384 // b, 4096)


def test_batch_noise_against_a_direct_computation_with_spatial_dims() -> None:
    x = torch.randn(12, 3, 5, generator=_gen(21), dtype=torch.float64) * torch.tensor(
        [1.0, 3.0, 0.1], dtype=torch.float64).view(3, 1) + 2
    noise = batch_stat_noise(x, [4], shuffle=False)[4]
    a = x.numpy()
    mu, var = a.mean(axis=(0, 2)), a.var(axis=(0, 2))
    zm, zv = [], []
    for k in range(3):
        batch = a[4 * k : 4 * k + 4]
        zm.append((batch.mean(axis=(0, 2)) - mu) / np.sqrt(var))
        zv.append((batch.var(axis=(0, 2)) - var) / var)
    assert noise.mean_noise == pytest.approx(np.sqrt(np.mean(np.square(zm))), rel=1e-9)
    assert noise.var_noise == pytest.approx(np.sqrt(np.mean(np.square(zv))), rel=1e-9)
    assert noise.batches == 3


def test_bn_input_noise_finds_torch_and_normlab_batch_norms() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nlnn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                          nn.BatchNorm1d(6), nlnn.LayerNorm(6))
    x = torch.randn(256, 5, generator=_gen(22))
    noise = bn_input_noise(model, x, [2, 64])
    assert list(noise) == ["1", "4"]
    assert noise["1"][2].mean_noise > noise["1"][64].mean_noise
    with torch.no_grad():
        inp = model[0](x)
    assert noise["1"][2] == batch_stat_noise(inp, [2])[2]


# -- plumbing -------------------------------------------------------------------------------------


def test_first_tensor_of_recurrent_outputs() -> None:
    lstm = nn.LSTM(3, 4, batch_first=True)
    out = lstm(torch.randn(2, 5, 3))
    assert first_tensor(out) is out[0]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    assert first_tensor(packed) is packed.data  # the integer batch_sizes are skipped
    assert first_tensor({"a": 1, "b": (torch.arange(3), torch.ones(1))}) is not None
    assert first_tensor((1, "x", torch.arange(2))) is None


def test_to_records_flattens_dataclasses_and_mappings() -> None:
    gap = train_eval_gap(_mlp("ln"), torch.randn(8, 6, generator=_gen(23)), batch_size=4)
    rows = to_records(gap, step=3, prefix="te_")
    assert {r["metric"] for r in rows} == {"te_output_gap", "te_train_accuracy", "te_eval_accuracy",
                                           "te_accuracy_gap", "te_disagreement", "te_samples"}
    assert all(r["layer"] == "model" and r["step"] == 3 for r in rows)
    nested = to_records({"a": {"x": 1.0}, "b": {"x": 2}})
    assert nested == [{"layer": "a", "step": 0, "metric": "x", "value": 1.0},
                      {"layer": "b", "step": 0, "metric": "x", "value": 2.0}]
