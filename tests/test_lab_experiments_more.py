"""Experiments C5, C6, C7, C9, C13: quick runs, verdicts from numbers, plots, determinism.

Quick runs are cached per module, so each experiment's quick config runs once per seed here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from normlab.lab.experiment import Experiment, RunResult, Verdict
from normlab.lab.experiments._shared import DeviceBatchNorm2d, NoisyShift, class_batches
from normlab.lab.experiments.c05_covariate_shift import CovariateShift, percentile_drift
from normlab.lab.experiments.c06_gradient_flow_depth import GradientFlowDepth
from normlab.lab.experiments.c07_dead_units import DeadReLUs
from normlab.lab.experiments.c09_batch_size import BatchSize, BatchSizeConfig, _dist_worker
from normlab.lab.experiments.c13_train_inference_gap import TrainInferenceGap, class_ordered

EXPERIMENTS: list[Experiment] = [
    CovariateShift(),
    GradientFlowDepth(),
    DeadReLUs(),
    BatchSize(),
    TrainInferenceGap(),
]
IDS = [e.name for e in EXPERIMENTS]

_cache: dict[tuple[str, int], RunResult] = {}


def quick_result(experiment: Experiment, seed: int = 0) -> RunResult:
    key = (experiment.name, seed)
    if key not in _cache:
        _cache[key] = experiment.run(experiment.default_config(quick=True), seed)
    return _cache[key]


# --------------------------------------------------------------------------------------------
# protocol and quick runs


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=IDS)
def test_experiment_declares_protocol_attributes(experiment: Experiment) -> None:
    for attr in ("name", "claim", "title", "literature"):
        assert isinstance(getattr(experiment, attr), str) and getattr(experiment, attr)
    config = experiment.default_config()
    quick = experiment.default_config(quick=True)
    assert type(config) is experiment.config_class
    assert [f.name for f in fields(config)] == [f.name for f in fields(quick)]
    assert asdict(config) != asdict(quick)
    assert experiment.__doc__ and "Metrics:" in experiment.__doc__


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=IDS)
def test_quick_run_returns_finite_documented_metrics(experiment: Experiment) -> None:
    result = quick_result(experiment)
    assert result.metrics
    bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    doc = experiment.__doc__ or ""
    for key in result.metrics:
        assert f"``{key.split('/')[0]}" in doc, f"{key} is not documented"
    for key in [*result.curves, *result.tables]:
        assert f"``{key.split('/')[0]}" in doc, f"{key} is not documented"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=IDS)
def test_quick_run_verdict_and_plots(experiment: Experiment, tmp_path: Path) -> None:
    config = experiment.default_config(quick=True)
    results = [quick_result(experiment)]
    verdict = experiment.verdict(config, results)
    assert isinstance(verdict, Verdict)
    assert verdict.status in ("supported", "not supported", "inconclusive")
    assert verdict.summary and verdict.unit and "1 seed" in verdict.summary
    if experiment.claim == "C5":
        assert verdict.agrees_with_literature is None  # contested
    paths = experiment.plot(config, results, tmp_path)
    assert paths
    for path in paths:
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("experiment", [DeadReLUs(), CovariateShift()], ids=["C7", "C5"])
def test_same_seed_gives_same_metrics(experiment: Experiment) -> None:
    torch.manual_seed(1234)  # global state must not matter
    torch.rand(7)
    again = experiment.run(experiment.default_config(quick=True), 0)
    assert again.metrics == quick_result(experiment).metrics


def test_different_seeds_differ() -> None:
    experiment = DeadReLUs()
    a = quick_result(experiment, 0)
    b = experiment.run(experiment.default_config(quick=True), 1)
    assert a.curves["dead/none/high"] != b.curves["dead/none/high"]


# --------------------------------------------------------------------------------------------
# verdicts follow the numbers


def _set_c05(r: RunResult, e: float) -> None:
    r.metrics["drift/none"] = 1.0 + e
    r.metrics["drift/bn"] = 1.0


def _set_c06(r: RunResult, e: float) -> None:
    r.metrics["log2_max_depth/none"] = 2.0
    r.metrics["log2_max_depth/bn"] = 2.0 + e


def _set_c07(r: RunResult, e: float) -> None:
    r.metrics["dead_fraction/bn/high"] = 0.3
    r.metrics["dead_fraction/none/high"] = 0.3 + e


def _set_c09(r: RunResult, e: float) -> None:
    r.metrics["degradation/gn"] = 0.05
    r.metrics["degradation/bn"] = 0.05 + e


def _set_c13(r: RunResult, e: float) -> None:
    for key in list(r.metrics):
        if key.startswith("eval_acc/") and key.endswith("/bn"):
            r.metrics[key] = 0.5
            r.metrics[key[: -len("bn")] + "renorm"] = 0.5 + e


SETTERS: dict[str, tuple[Callable[[RunResult, float], None], float]] = {
    "covariate-shift": (_set_c05, 2.0),
    "gradient-flow-depth": (_set_c06, 2.0),
    "dead-units": (_set_c07, 0.5),
    "batch-size": (_set_c09, 0.3),
    "train-inference-gap": (_set_c13, 0.3),
}


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=IDS)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["effect", "reversed"])
def test_verdict_follows_the_numbers(experiment: Experiment, sign: float) -> None:
    setter, size = SETTERS[experiment.name]
    config = experiment.default_config(quick=True)
    results = []
    for jitter in (0.9, 1.0, 1.1):
        r = copy.deepcopy(quick_result(experiment))
        setter(r, sign * size * jitter)
        results.append(r)
    verdict = experiment.verdict(config, results)
    assert "3 seeds" in verdict.summary
    if sign > 0:
        assert verdict.status == "supported"
        assert verdict.effect > 0
    else:
        assert verdict.status == "not supported"
        assert verdict.effect < 0
    if experiment.claim != "C5":
        assert verdict.agrees_with_literature is (sign > 0)


# --------------------------------------------------------------------------------------------
# building blocks


def test_percentile_drift_is_movement_over_spread() -> None:
    steady = torch.tensor([[-1.0, 0.0, 1.0]]).T.expand(3, 1).T  # (1, 3) -> one measurement
    pcts = torch.stack([steady.T, steady.T, steady.T])  # (T=3, 3, U=1), no movement
    assert float(percentile_drift(pcts)[0]) == 0.0
    moving = torch.stack([steady.T + t for t in (0.0, 1.0, 2.0)])  # each percentile moves 2
    assert math.isclose(float(percentile_drift(moving)[0]), 2.0 / 2.0)


def test_noisy_shift_is_random_in_training_and_identity_in_eval() -> None:
    layer = NoisyShift(5)
    x = torch.randn(4, 5)
    torch.manual_seed(0)
    a = layer(x)
    b = layer(x)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(layer(x), a)
    layer.eval()
    assert torch.equal(layer(x), x)


def test_class_batches_and_class_ordered_hold_few_classes() -> None:
    y = torch.arange(10).repeat(20)
    gen = torch.Generator().manual_seed(0)
    for idx in class_batches(y, 8, 2, 5, gen):
        assert len(idx) == 8 and len(torch.unique(y[idx])) == 2
    order = class_ordered(y, 8, 2, gen)
    assert len(order) % 8 == 0
    for start in range(0, len(order), 8):
        assert len(torch.unique(y[order[start : start + 8]])) <= 2
    with pytest.raises(ValueError, match="multiple"):
        next(class_batches(y, 7, 2, 1, gen))


@pytest.mark.parametrize("device_batch", [2, 4, 8])
def test_device_batch_norm_equals_ghost_batch_norm(device_batch: int) -> None:
    from normlab.nn.ghost import GhostBatchNorm2d

    torch.manual_seed(0)
    x = (torch.randn(16, 3, 5, 5) * 2 + 1).requires_grad_()
    ours, ghost = DeviceBatchNorm2d(3, device_batch), GhostBatchNorm2d(3, device_batch)
    y, y_ghost = ours(x), ghost(x)
    torch.testing.assert_close(y, y_ghost, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ghost.running_mean)
    torch.testing.assert_close(ours.running_var, ghost.running_var)
    (grad,) = torch.autograd.grad((y**2).sum(), x)
    (grad_ghost,) = torch.autograd.grad((y_ghost**2).sum(), x)
    torch.testing.assert_close(grad, grad_ghost, rtol=1e-4, atol=1e-4)
    ours.eval()
    ghost.eval()
    torch.testing.assert_close(ours(x), ghost(x))
    with pytest.raises(ValueError, match="multiple of device_batch"):
        DeviceBatchNorm2d(3, 3)(x)


def test_device_batch_renorm_corrects_towards_running_stats() -> None:
    """With the limits open, renorm's training output is the eval output (Ioffe 2017)."""
    torch.manual_seed(0)
    layer = DeviceBatchNorm2d(2, 4, renorm=True, warmup_steps=0, ramp_steps=1)
    x = torch.randn(8, 2, 3, 3) * 3 + 2
    with torch.no_grad():
        layer.running_mean.fill_(2.0)
        layer.running_var.fill_(9.0)
        layer.num_batches_tracked.fill_(10)
        before = (layer.running_mean.clone(), layer.running_var.clone())
        expected = (x - before[0].view(1, 2, 1, 1)) / (before[1].view(1, 2, 1, 1) + 1e-5).sqrt()
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_sync_batchnorm_runs_across_two_gloo_processes() -> None:
    """The cross-process path of C9 (2 ranks x 2 examples), a few steps only."""
    from normlab.distributed import spawn
    from normlab.lab.common import load_digits

    config = asdict(BatchSizeConfig(steps=3))
    errors = spawn(_dist_worker, 2, load_digits(0, 100), config, 0, timeout=120.0)
    assert len(errors) == 2
    for rank_errors in errors:
        assert set(rank_errors) == {"bn_local", "syncbn", "gn"}
        assert all(0.0 <= v <= 1.0 for v in rank_errors.values())
    # SyncBN keeps the ranks' replicas identical (same init, averaged gradients, global stats).
    assert errors[0]["syncbn"] == errors[1]["syncbn"]
