"""precise_bn: exact pooled statistics against NumPy, restoration of model state, and the
cross-process merge over gloo."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import normlab.nn as nlnn
from normlab.calibrate import PreciseBNSummary, precise_bn
from normlab.distributed import spawn
from normlab.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

TOL = {"rtol": 1e-12, "atol": 1e-12}
SIZES = [7, 2, 13, 3, 2, 9]  # uneven on purpose: equal weights per batch would be wrong


def _batches(sizes: list[int], shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (5.0 + 3.0 * torch.randn(n, *shape, generator=g, dtype=torch.float64))
        * torch.linspace(0.5, 2.0, shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        for n in sizes
    ]


def _pooled_np(inputs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance per channel (dim 1) of every value of every batch."""
    x = np.concatenate([t.numpy() for t in inputs])
    flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return flat.mean(axis=1), flat.var(axis=1, ddof=1)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nlnn.BatchNorm1d(4, dtype=torch.float64), (4,)),
        (torch.nn.BatchNorm1d(4, dtype=torch.float64), (4, 5)),
        (nlnn.BatchNorm2d(3, momentum=None, dtype=torch.float64), (3, 2, 3)),
        (torch.nn.BatchNorm3d(2, dtype=torch.float64), (2, 2, 1, 3)),
        (SyncBatchNorm(3, dtype=torch.float64), (3, 4)),
    ],
    ids=["normlab1d", "torch1d-3D-input", "normlab2d-cma", "torch3d", "sync"],
)
def test_single_layer_equals_numpy_over_all_values(layer, shape):
    batches = _batches(SIZES, shape, seed=1)
    summary = precise_bn(layer, batches)
    mean, var = _pooled_np(batches)
    torch.testing.assert_close(layer.running_mean, torch.from_numpy(mean), **TOL)
    torch.testing.assert_close(layer.running_var, torch.from_numpy(var), **TOL)
    per_channel = sum(b.numel() // b.shape[1] for b in batches)
    assert summary == PreciseBNSummary(num_batches=len(batches), counts={"": per_channel})
    # Not the equal-weight average of per-batch variances (fvcore's estimate).
    naive = torch.stack([b.transpose(0, 1).reshape(b.shape[1], -1).var(1) for b in batches])
    assert not torch.allclose(naive.mean(0), layer.running_var, rtol=1e-3)


def test_num_batches_limits_the_batches_drawn():
    batches = _batches([4, 6, 5, 8], (3,), seed=2)
    drawn: list[int] = []

    def stream() -> Iterator[torch.Tensor]:
        for i, b in enumerate(batches):
            drawn.append(i)
            yield b

    layer = nlnn.BatchNorm1d(3, dtype=torch.float64)
    summary = precise_bn(layer, stream(), num_batches=2)
    assert drawn == [0, 1] and summary.num_batches == 2
    mean, var = _pooled_np(batches[:2])
    torch.testing.assert_close(layer.running_mean, torch.from_numpy(mean), **TOL)
    torch.testing.assert_close(layer.running_var, torch.from_numpy(var), **TOL)


def _two_layer_model() -> torch.nn.Sequential:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 4),
        nlnn.BatchNorm1d(4),
        torch.nn.ReLU(),
        torch.nn.Linear(4, 3),
        torch.nn.BatchNorm1d(3),
    ).double()


def test_two_layer_model_uses_the_inputs_each_layer_sees_in_training():
    model = _two_layer_model()
    batches = _batches(SIZES[:4], (5,), seed=4)
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            h = model[0](x)
            first.append(h)
            # Training mode: the first layer normalizes with this batch's own statistics.
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps)
            h = h * model[1].weight + model[1].bias
            second.append(model[3](torch.relu(h)))
    model.eval()
    summary = precise_bn(model, [(x, torch.zeros(len(x))) for x in batches])
    for layer, inputs in ((model[1], first), (model[4], second)):
        mean, var = _pooled_np(inputs)
        torch.testing.assert_close(layer.running_mean, torch.from_numpy(mean), **TOL)
        torch.testing.assert_close(layer.running_var, torch.from_numpy(var), **TOL)
    assert summary.counts == {"1": sum(SIZES[:4]), "4": sum(SIZES[:4])}
    assert not any(m.training for m in model.modules())


def _mixed_model() -> torch.nn.Sequential:
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Dropout(0.5),
        nlnn.BatchNorm2d(3),
        nlnn.InstanceNorm2d(3, track_running_stats=True),
        torch.nn.BatchNorm2d(3, track_running_stats=False),
    ).double()
    # Distinct, non-default state everywhere, so a lost restore shows.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    model[2].eval()
    model[3].eval()
    loss = model(torch.randn(4, 2, 3, 3, dtype=torch.float64)).square().sum()
    loss.backward()
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, object]:
    return {
        "modes": {name: m.training for name, m in model.named_modules()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def _assert_same(before: dict[str, object], after: dict[str, object], skip: set[str]) -> None:
    assert before["modes"] == after["modes"]
    for kind in ("params", "grads", "buffers"):
        assert before[kind].keys() == after[kind].keys()
        for name, value in before[kind].items():
            if name not in skip:
                assert torch.equal(after[kind][name], value), (kind, name)


def test_leaves_modes_params_grads_and_other_buffers_as_they_were():
    model = _mixed_model()
    before = _snapshot(model)
    batches = _batches([4, 3, 5], (2, 3, 3), seed=6)
    summary = precise_bn(model, [{"input": x, "label": 0} for x in batches])
    assert set(summary.counts) == {"1", "3"}  # layers with running statistics only
    recalibrated = {"1.running_mean", "1.running_var", "3.running_mean", "3.running_var"}
    _assert_same(before, _snapshot(model), skip=recalibrated)
    for name in recalibrated:
        assert not torch.equal(dict(model.named_buffers())[name], before["buffers"][name])
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_exception_midway_restores_everything():
    model = _mixed_model()
    before = _snapshot(model)
    batches = _batches([4, 3, 5], (2, 3, 3), seed=7)

    def failing() -> Iterator[torch.Tensor]:
        yield batches[0]
        yield batches[1]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        precise_bn(model, failing())
    _assert_same(before, _snapshot(model), skip=set())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_forward_fn_and_summary_of_unreached_layer():
    model = torch.nn.ModuleDict({"used": nlnn.BatchNorm1d(2), "unused": nlnn.BatchNorm1d(2)})
    model.double()
    batches = _batches([3, 4], (2,), seed=8)
    unused_before = model["unused"].running_var.clone()
    with pytest.warns(UserWarning, match=r"\['unused'\] saw fewer than 2 values per channel"):
        summary = precise_bn(model, batches, forward_fn=lambda m, b: m["used"](b))
    assert summary.counts == {"used": 7, "unused": 0}
    assert torch.equal(model["unused"].running_var, unused_before)
    mean, _ = _pooled_np(batches)
    torch.testing.assert_close(model["used"].running_mean, torch.from_numpy(mean), **TOL)


def test_argument_and_batch_errors():
    layer = nlnn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="num_batches=0 must be a positive integer"):
        precise_bn(layer, [torch.zeros(2, 2)], num_batches=0)
    with pytest.raises(ValueError, match="under the key 'input'"):
        precise_bn(layer, [{"x": torch.zeros(2, 2)}])
    with pytest.raises(TypeError, match="cannot find the model input in a batch of type int"):
        precise_bn(layer, [3])
    assert precise_bn(torch.nn.Linear(2, 2), [torch.zeros(2, 2)]) == PreciseBNSummary(0, {})


# --------------------------------------------------------------------------------------------
# Two processes: each rank iterates its own data; every rank ends with the statistics of all.

RANK_SIZES = [[5, 2, 8], [3, 11]]  # different batch counts and sizes per rank


def _rank_batches(rank: int) -> list[torch.Tensor]:
    return _batches(RANK_SIZES[rank], (5,), seed=10 + rank)


def _calibrate_worker(rank: int, world: int) -> dict[str, object]:
    model = _two_layer_model()
    summary = precise_bn(model, _rank_batches(rank))
    # SyncBatchNorm layers synchronize their train-mode forwards too: equal batch counts.
    synced = convert_sync_batchnorm(_two_layer_model())
    precise_bn(synced, _rank_batches(rank), num_batches=2)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "counts": summary.counts,
        "num_batches": summary.num_batches,
        "synced": {k: v.clone() for k, v in synced.state_dict().items()},
    }


@pytest.mark.slow
def test_two_processes_agree_and_equal_one_process_over_all_data():
    results = spawn(_calibrate_worker, 2, timeout=90)
    single = _two_layer_model()
    summary = precise_bn(single, _rank_batches(0) + _rank_batches(1))
    assert [r["num_batches"] for r in results] == [3, 2]
    for res in results:
        assert res["counts"] == summary.counts == {"1": 29, "4": 29}
        for key, value in single.state_dict().items():
            torch.testing.assert_close(res["state"][key], value, **TOL)
            assert torch.equal(res["state"][key], results[0]["state"][key]), "ranks disagree"
    # With SyncBatchNorm, step i is one batch made of every rank's i-th batch.
    steps = [torch.cat(parts) for parts in zip(_rank_batches(0)[:2], _rank_batches(1)[:2])]
    single = _two_layer_model()
    precise_bn(single, steps)
    for res in results:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(res["synced"][key], value, **TOL)
