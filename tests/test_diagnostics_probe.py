"""Probe: what it records, on which architectures, and that it leaves nothing behind."""

from __future__ import annotations

import gc
import sqlite3
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nlnn
from normlab.diagnostics import (
    ActivationStats,
    Probe,
    batch_coupling,
    gradient_change,
    running_stats_gap,
    train_eval_gap,
)
from normlab.diagnostics._util import copy_model

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            assert not getattr(module, attr), (name, attr)
    for name, p in model.named_parameters():
        assert not p._post_accumulate_grad_hooks, name
        assert not p._backward_hooks, name


def _mlp(act: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))


def _data(n: int = 32, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
           on_step: Any = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step(step, out)
        opt.step()


def test_records_match_direct_computations() -> None:
    model = _mlp()
    x, y = _data()
    expected: dict[int, dict[str, Any]] = {}
    captured: dict[str, torch.Tensor] = {}
    model[1].register_forward_hook(lambda m, i, o: captured.__setitem__("sig", o.detach().clone()))
    model[4].register_forward_hook(lambda m, i, o: o.retain_grad() or captured.__setitem__("out", o))

    def on_step(step: int, out: torch.Tensor) -> None:
        expected[step] = {
            "grad_norm_2": float(torch.cat([model[2].weight.grad.reshape(-1),
                                            model[2].bias.grad]).norm()),
            "param_2w": float(model[2].weight.grad.norm()),
            "out_grad": float(captured["out"].grad.norm()),
            "sig": captured["sig"].double().numpy(),
        }

    with Probe(model) as probe:
        _train(model, x, y, 3, on_step)
    for hook_dict in (model[1]._forward_hooks, model[4]._forward_hooks):
        hook_dict.clear()  # the test's own hooks
    for step, exp in expected.items():
        rec = {(r["layer"], r["metric"]): r["value"] for r in probe.select(step=step)}
        assert rec[("2", "grad_norm")] == pytest.approx(exp["grad_norm_2"], rel=1e-5)
        assert rec[("2.weight", "param_grad_norm")] == pytest.approx(exp["param_2w"], rel=1e-5)
        assert rec[("4", "grad_output_norm")] == pytest.approx(exp["out_grad"], rel=1e-5)
        sig = exp["sig"]
        assert rec[("1", "mean")] == pytest.approx(sig.mean(), rel=1e-5)
        assert rec[("1", "std")] == pytest.approx(sig.std(), rel=1e-5)
        for q in (15, 50, 85):
            assert rec[("1", f"p{q}")] == pytest.approx(np.percentile(sig, q), rel=1e-5)
        assert rec[("1", "saturated")] == pytest.approx(float(((sig < 0.01) | (sig > 0.99)).mean()))
        assert ("2", "saturated") not in rec  # only sigmoid/tanh layers
    assert sorted({r["step"] for r in probe.records}) == [0, 1, 2]
    assert set(probe.layer_types) == {"0", "1", "2", "3", "4"}
    assert list(probe.layer_values("grad_norm")) == ["0", "2", "4"]  # forward order
    assert probe.gradient_flow().first == "0" and probe.gradient_flow().last == "4"
    _assert_no_hooks(model)


def test_hooks_are_removed_also_when_the_body_raises() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nlnn.BatchNorm2d(2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(4, 1, 4, 4)
    with pytest.raises(RuntimeError, match="boom"), Probe(model) as probe:
        model(x).sum().backward()
        raise RuntimeError("boom")
    _assert_no_hooks(model)
    assert probe.select(metric="grad_norm")  # what was measured before the error is kept
    with Probe(model) as probe:
        with pytest.raises(RuntimeError, match="already active"), probe:
            pass
        model(x)
    _assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="not active"):
        probe.snapshot(x)


def test_no_activation_or_graph_is_retained() -> None:
    model = _mlp(nn.ReLU)
    x, y = _data()
    refs: list[weakref.ref[torch.Tensor]] = []
    model[2].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with Probe(model) as probe:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        held = _tensors(probe)
        assert held, "the estimators should hold their statistics"
        assert all(not t.requires_grad and t.grad_fn is None for t in held)
        refs.append(weakref.ref(out))
        del out, loss
        gc.collect()
        assert all(r() is None for r in refs)  # the probe keeps no activation, no graph
        probe.snapshot(x)
    model[2]._forward_hooks.clear()
    _assert_no_hooks(model)


def _tensors(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return []  # the model itself
    if isinstance(obj, dict):
        items: Any = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("normlab"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors(item, seen)]


def test_module_used_twice_is_recorded_per_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 5)
            self.shared = nn.Linear(5, 5)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.shared(self.inp(x)))
            return self.shared(h * 3)

    torch.manual_seed(1)
    model = Twice()
    x = torch.randn(10, 4)
    with Probe(model) as probe:
        for _ in range(2):
            model(x).pow(2).mean().backward()
    first = {r["layer"] for r in probe.select(metric="mean", step=0)}
    assert first == {"inp", "shared", "act", "shared#1"}
    with torch.no_grad():
        h = model.act(model.shared(model.inp(x)))
        second_call = model.shared(h * 3)
    assert probe.select(metric="mean", layer="shared#1", step=1)[0]["value"] == pytest.approx(
        float(second_call.mean()), rel=1e-5)
    grads = probe.select(metric="grad_norm", step=0)
    assert [r["layer"] for r in grads] == ["inp", "shared"]  # one norm per parameter set
    assert {r["layer"] for r in probe.select(metric="grad_output_norm", step=0)} == first


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_layers_with_tuple_outputs(rnn: type[nn.Module]) -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn(3, 6, batch_first=True)
            self.norm = nlnn.LayerNorm(6)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(self.norm(out[:, -1]))

    torch.manual_seed(2)
    model = Seq()
    x = torch.randn(8, 5, 3)
    with Probe(model, unit_dim=-1) as probe:
        probe.snapshot(x)
        _train(model, x, torch.randint(0, 2, (8,)), 2)
        probe.snapshot(x)
    with torch.no_grad():
        seq_out, _ = model.rnn(x)  # after training; the step-1 record is before its update
    assert {r["layer"] for r in probe.select(metric="mean")} == {"rnn", "norm", "head"}
    assert {r["layer"] for r in probe.select(metric="grad_norm")} == {"rnn", "norm", "head"}
    assert probe.select(metric="eval_mean", layer="rnn", step=2)[0]["value"] == pytest.approx(
        float(seq_out.mean()), rel=1e-5)
    assert probe.select(metric="shift_w1", layer="rnn", step=2)  # input drift of the recurrent layer
    _assert_no_hooks(model)


def test_packed_sequences_are_measured() -> None:
    lstm = nn.LSTM(3, 4)
    x = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with Probe(lstm) as probe:
        out, _ = lstm(x)
        out.data.sum().backward()
    assert probe.select(metric="mean", layer="model")[0]["value"] == pytest.approx(
        float(out.data.detach().mean()), rel=1e-5)
    assert probe.select(metric="grad_norm", layer="model")


def test_nested_convolutional_model_with_torch_and_normlab_norms() -> None:
    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, norm: type[nn.Module]) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(3)
    model = nn.Sequential(Block(1, 4, nlnn.BatchNorm2d), Block(4, 4, nn.BatchNorm2d),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    with Probe(model) as probe:
        probe.snapshot(x)
        _train(model, x, y, 2)
        dead = probe.snapshot(x)
        probe.log(running_stats_gap(model, x), prefix="rs_")
    layers = set(probe.layer_types)
    assert {"0.body.0", "0.body.1", "0.body.2", "1.body.1", "4"} <= layers
    assert {probe.layer_types["0.body.1"], probe.layer_types["1.body.1"]} == {"BatchNorm2d"}
    assert {r["layer"] for r in dead if r["metric"] == "dead_fraction"} == {"0.body.2", "1.body.2"}
    assert {r["layer"] for r in probe.select(metric="rs_mean_gap")} == {"0.body.1", "1.body.1"}
    assert all(r["step"] == 2 for r in probe.select(metric="rs_mean_gap"))
    _assert_no_hooks(model)


def test_snapshot_is_eval_mode_changes_nothing_and_tracks_drift() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # three units dead for sure
    x, y = _data(64)
    model.train()
    with Probe(model) as probe:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        first = probe.snapshot(x, batch_size=10)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k  # eval mode: running statistics untouched
        assert model.training and model[3].training
        _train(model, x, y, 3)
        second = probe.snapshot(x)
    assert {r["step"] for r in first} == {0} and {r["step"] for r in second} == {3}
    assert not [r for r in first if r["metric"].startswith("shift")]  # no reference yet
    drift = {r["layer"] for r in second if r["metric"] == "shift_w1"}
    assert drift == {"0", "1", "4"}  # the inputs of the layers with parameters
    dead = [r for r in second if r["metric"] == "dead_fraction"]
    assert [r["layer"] for r in dead] == ["2"]
    with torch.no_grad():
        ref = model.eval()(x)  # restore below
        h = torch.relu(model[1](model[0](x)))
    model.train()
    assert dead[0]["value"] == pytest.approx(float((h == 0).all(0).float().mean()))
    assert dead[0]["value"] >= 3 / 8
    assert probe.select(metric="eval_mean", layer="4", step=3)[0]["value"] == pytest.approx(
        float(ref.mean()), rel=1e-5)
    assert not probe.select(metric="eval_mean", step=1)  # snapshots only where taken


def test_every_and_manual_steps() -> None:
    model = _mlp()
    x, y = _data()
    with Probe(model, every=2) as probe:
        _train(model, x, y, 5)
    assert sorted({r["step"] for r in probe.records}) == [0, 2, 4]
    with Probe(model, auto_step=False, gradients=False) as manual:
        for _ in range(3):
            model(x)
            model(x)  # two forward passes, one step
            manual.step()
    assert sorted({r["step"] for r in manual.records}) == [0, 1, 2]
    # A call counter restarts with each forward pass: both passes pool into the same records.
    assert {r["layer"] for r in manual.select(step=0, metric="mean")} == {"0", "1", "2", "3", "4"}
    assert not manual.select(metric="grad_norm")
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Probe(model, every=0)


def test_forwards_without_gradients_are_not_steps() -> None:
    model = _mlp()
    x, y = _data()
    with Probe(model) as probe:
        with torch.no_grad():
            model(x)  # validation
        with torch.inference_mode():
            model(x)
    assert probe.records == []
    model.eval()  # fine-tuning with frozen batch norm: eval mode, but a training step
    with Probe(model) as probe:
        _train(model, x, y, 2)
    assert sorted({r["step"] for r in probe.records}) == [0, 1]
    model.train()


def test_in_place_activations() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    with Probe(model) as probe:
        model(x).pow(2).sum().backward()
    pre = model[0](x)  # what the in-place ReLU overwrote
    pre.retain_grad()
    post = torch.relu(pre)
    post.retain_grad()
    model[2](post).pow(2).sum().backward()
    grads = probe.layer_values("grad_output_norm")
    assert list(grads) == ["0", "1", "2"]
    assert grads["0"] == pytest.approx(float(pre.grad.norm()), rel=1e-6)
    assert grads["1"] == pytest.approx(float(post.grad.norm()), rel=1e-6)
    means = probe.layer_values("mean")
    assert means["0"] == pytest.approx(float(pre.detach().mean()), rel=1e-6)
    assert means["1"] == pytest.approx(float(post.detach().mean()), rel=1e-6)


def test_layer_selection() -> None:
    model = _mlp()
    x, y = _data()
    with Probe(model, layers=["2"]) as by_name:
        _train(model, x, y, 1)
    assert {r["layer"] for r in by_name.records} == {"2", "2.weight", "2.bias"}
    with Probe(model, layers=lambda n, m: isinstance(m, nn.Sigmoid)) as by_kind:
        _train(model, x, y, 1)
    assert {r["layer"] for r in by_kind.records} == {"1", "3"}
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        Probe(model, layers=["nope"])


def test_one_shot_diagnostics_inside_a_probe_record_nothing() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nlnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _data(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Probe(model) as probe:
        _train(model, x, y, 1)
        pending = {k: a._seen for k, a in probe._acts.items()}
        before = (list(probe.records), probe.step_index, probe.completed_steps, pending)
        copied = copy_model(model)
        _assert_no_hooks(copied)
        batch_coupling(model, x[:8], x[8:])
        train_eval_gap(model, x, y, batch_size=4)
        gradient_change(model, opt, nn.functional.cross_entropy, x, y)
        pending = {k: a._seen for k, a in probe._acts.items()}
        # Nothing was measured on the copies, and no step was opened or closed.
        assert (probe.records, probe.step_index, probe.completed_steps, pending) == before


def test_records_store_in_sqlite() -> None:
    model = _mlp()
    x, y = _data()
    with Probe(model) as probe:
        _train(model, x, y, 2)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE records (layer TEXT, step INTEGER, metric TEXT, value REAL)")
    db.executemany("INSERT INTO records VALUES (:layer, :step, :metric, :value)", probe.records)
    (count,) = db.execute("SELECT COUNT(*) FROM records").fetchone()
    assert count == len(probe.records) > 0
    (value,) = db.execute(
        "SELECT value FROM records WHERE layer = '2' AND metric = 'grad_norm' AND step = 1"
    ).fetchone()
    assert value == probe.select(metric="grad_norm", layer="2", step=1)[0]["value"]


def test_layer_values_reductions() -> None:
    model = _mlp()
    x, y = _data()
    with Probe(model) as probe:
        _train(model, x, y, 3)
    series = [r["value"] for r in probe.select(metric="std", layer="1")]
    assert probe.layer_values("std", "median")["1"] == pytest.approx(float(np.median(series)))
    assert probe.layer_values("std", "last")["1"] == series[-1]
    assert probe.layer_values("std", "max")["1"] == max(series)
    with pytest.raises(ValueError, match="reduce must be one of"):
        probe.layer_values("std", "p99")


def test_probe_uses_the_activation_estimator() -> None:
    # The probe's records are ActivationStats' numbers: one definition of each statistic.
    model = _mlp()
    x, _ = _data()
    with Probe(model) as probe:
        model(x)
    with torch.no_grad():
        h = model[1](model[0](x))
    direct = ActivationStats(bounds=(0.01, 0.99))
    direct.update(h)
    rec = {r["metric"]: r["value"] for r in probe.select(layer="1")}
    for metric, value in direct.compute().items():
        assert rec[metric] == pytest.approx(float(value), rel=1e-6)
