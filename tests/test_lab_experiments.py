"""The lab's experiments: registry, quick runs, verdicts computed from numbers, plots, determinism.

Quick runs are shared between tests through a module-scoped cache, so every experiment's quick
config runs once per seed for the whole file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from normlab.lab import common
from normlab.lab.experiment import Experiment, RunResult, Verdict
from normlab.lab.experiments import ALL, get, names
from normlab.lab.experiments.c10_batch_coupling import probe_coupling
from normlab.lab.experiments.c12_gan import mode_stats, ring_modes, sample_ring

# The headline pair each verdict compares: (treatment metric, control metric, higher is better).
HEADLINE: dict[str, tuple[str, str, bool]] = {
    "input-standardization": ("best_steps/standardized", "best_steps/scaled", False),
    "bn-convergence": ("steps_to_target/bn", "steps_to_target/none", False),
    "learning-rate": ("log10_max_stable_lr/bn", "log10_max_stable_lr/none", True),
    "regularization": ("gap_matched/bn", "gap_matched/none", False),
    "batch-coupling": ("coupling/bn_train", "coupling/ln", True),
    "recurrent": ("steps_to_target/ln", "steps_to_target/none", False),
    "gan": ("modes_covered/none", "modes_covered/bn", True),
    "instance-contrast": ("acc/in", "acc/bn", True),
}

MINE = {e.name for e in ALL if e.name in HEADLINE or e.name == "initialization"}

_cache: dict[tuple[str, int], RunResult] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The lab runs every experiment on one thread (the sweep sets it); the models are tiny, and
    # a second intra-op thread only adds synchronization cost on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_result(experiment: Experiment, seed: int = 0) -> RunResult:
    key = (experiment.name, seed)
    if key not in _cache:
        _cache[key] = experiment.run(experiment.default_config(quick=True), seed)
    return _cache[key]


def _mine() -> list[Experiment]:
    return [e for e in ALL if e.name in MINE]


# --------------------------------------------------------------------------------------------
# registry


def test_registry_is_in_claim_order_and_names_are_unique() -> None:
    numbers = [int(e.claim.lstrip("C")) for e in ALL]
    assert numbers == sorted(numbers)
    assert len(set(names())) == len(ALL)
    for claim in ("C1", "C2", "C3", "C4", "C8", "C10", "C11", "C12", "C14"):
        assert claim in {e.claim for e in ALL}


def test_get_finds_by_name_and_lists_known_names_on_error() -> None:
    assert get("bn-convergence").claim == "C3"
    with pytest.raises(KeyError, match=r"known: .*bn-convergence"):
        get("no-such-experiment")


@pytest.mark.parametrize("experiment", _mine(), ids=lambda e: e.name)
def test_experiment_declares_protocol_attributes(experiment: Experiment) -> None:
    for attr in ("name", "claim", "title", "literature"):
        assert isinstance(getattr(experiment, attr), str) and getattr(experiment, attr)
    config = experiment.default_config()
    quick = experiment.default_config(quick=True)
    assert type(config) is experiment.config_class
    assert [f.name for f in fields(config)] == [f.name for f in fields(quick)]
    assert experiment.__doc__ and "Metrics:" in experiment.__doc__


# --------------------------------------------------------------------------------------------
# quick runs


@pytest.mark.parametrize("experiment", _mine(), ids=lambda e: e.name)
def test_quick_run_returns_finite_documented_metrics(experiment: Experiment) -> None:
    result = quick_result(experiment)
    assert result.metrics
    bad = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    doc = experiment.__doc__ or ""
    # Every metric family named in the docstring is produced (e.g. "``final_acc/{none,bn}``").
    for key in result.metrics:
        assert f"``{key.split('/')[0]}" in doc, f"{key} is not documented"
    if experiment.name in HEADLINE:
        treatment, control, _ = HEADLINE[experiment.name]
        assert treatment in result.metrics and control in result.metrics


@pytest.mark.parametrize("experiment", _mine(), ids=lambda e: e.name)
def test_quick_run_verdict_and_plots(experiment: Experiment, tmp_path: Path) -> None:
    config = experiment.default_config(quick=True)
    results = [quick_result(experiment)]
    verdict = experiment.verdict(config, results)
    assert isinstance(verdict, Verdict)
    assert verdict.status in ("supported", "not supported", "inconclusive")
    assert verdict.summary and verdict.unit
    assert "1 seed" in verdict.summary
    paths = experiment.plot(config, results, tmp_path)
    assert paths
    for path in paths:
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["learning-rate", "batch-coupling"], ids=str)
def test_same_seed_gives_same_metrics(name: str) -> None:
    experiment = get(name)
    config = experiment.default_config(quick=True)
    torch.manual_seed(1234)  # global state must not matter
    torch.rand(7)
    again = experiment.run(config, 0)
    assert again.metrics == quick_result(experiment).metrics


def test_different_seeds_differ() -> None:
    experiment = get("learning-rate")
    config = experiment.default_config(quick=True)
    a = quick_result(experiment, 0)
    b = experiment.run(config, 1)
    assert a.curves["final_acc/bn"] != b.curves["final_acc/bn"]


# --------------------------------------------------------------------------------------------
# verdicts come from the numbers


def _synthetic(
    experiment: Experiment, effect: Callable[[int], float]
) -> tuple[object, list[RunResult]]:
    """Three fake seeds whose headline treatment-vs-control gap is ``effect(seed)`` (in the
    direction "treatment better" when positive), built from the quick run's metrics."""
    config = experiment.default_config(quick=True)
    treatment, control, higher = HEADLINE[experiment.name]
    base = quick_result(experiment)
    results = []
    for seed in range(3):
        metrics = dict(base.metrics)
        metrics[control] = 100.0
        gap = effect(seed)
        metrics[treatment] = 100.0 + gap if higher else 100.0 - gap
        results.append(RunResult(metrics=metrics, curves=base.curves, tables=base.tables))
    return config, results


def _big(experiment: Experiment) -> float:
    config = experiment.default_config(quick=True)
    return 20.0 * max(config.min_effect, 1.0)


@pytest.mark.parametrize("experiment", [e for e in ALL if e.name in HEADLINE], ids=lambda e: e.name)
def test_verdict_follows_the_numbers(experiment: Experiment) -> None:
    big = _big(experiment)
    config, results = _synthetic(experiment, lambda s: big * (1 + 0.05 * s))
    assert experiment.verdict(config, results).status == "supported"
    config, results = _synthetic(experiment, lambda s: -big * (1 + 0.05 * s))
    assert experiment.verdict(config, results).status == "not supported"
    noise = [big, -big, 0.5 * big]
    config, results = _synthetic(experiment, lambda s: noise[s])
    assert experiment.verdict(config, results).status == "inconclusive"


def test_initialization_verdict_follows_the_numbers() -> None:
    experiment = get("initialization")
    config = experiment.default_config(quick=True)
    base = quick_result(experiment)

    def fake(proper: float, naive: float) -> list[RunResult]:
        out = []
        for seed in range(3):
            metrics = dict(base.metrics)
            for s in config.proper:
                metrics[f"log10_act_drift/{s}"] = proper + 0.1 * seed
            for s in config.naive:
                metrics[f"log10_act_drift/{s}"] = naive + 0.1 * seed
            out.append(RunResult(metrics=metrics, curves=base.curves, tables=base.tables))
        return out

    assert experiment.verdict(config, fake(0.1, 20.0)).status == "supported"
    assert experiment.verdict(config, fake(20.0, 0.1)).status == "not supported"


# --------------------------------------------------------------------------------------------
# building blocks


def test_steps_to_target_is_censored_at_the_budget() -> None:
    assert common.steps_to_target([10, 20, 30], [0.1, 0.95, 0.99], 0.9, 30) == 20
    assert common.steps_to_target([10, 20, 30], [0.1, 0.2, 0.3], 0.9, 30) == 30


def test_train_classifier_flags_divergence_and_keeps_curve_length() -> None:
    data = common.load_digits(0)
    gen = common.seeded(0)
    model = common.MLP(64, [32], 10, None)
    curves = common.train_classifier(
        model, data, steps=40, lr=1e4, batch_size=16, generator=gen, eval_every=10
    )
    assert curves.diverged
    assert curves.steps == [10, 20, 30, 40]
    assert len(curves.test_acc) == len(curves.test_loss) == 4


def test_layer_and_group_norm_do_not_couple_samples_but_batch_norm_does() -> None:
    torch.manual_seed(0)
    pool = torch.rand(64, 64)
    probes = torch.rand(4, 64)
    for kind, expected_zero in (("ln", True), ("gn", True), ("bn", False)):
        model = common.MLP(64, [16], 10, common.norm_factory(kind))
        change, _ = probe_coupling(model, pool, probes, 8, torch.Generator().manual_seed(0), True)
        assert (change == 0.0) == expected_zero, kind
    bn = common.MLP(64, [16], 10, common.norm_factory("bn"))
    before = bn[1].running_mean.clone()
    probe_coupling(bn, pool, probes, 8, torch.Generator().manual_seed(0), True)
    assert torch.equal(bn[1].running_mean, before)  # probing runs on a copy


def test_mode_stats_counts_modes_and_quality() -> None:
    modes = ring_modes(8, 2.0)
    gen = torch.Generator().manual_seed(0)
    covered, quality = mode_stats(sample_ring(800, modes, 0.1, gen), modes, 0.1, 3.0, 0.1)
    assert covered == 8 and quality > 0.95
    one_mode = modes[:1].repeat(400, 1)
    assert mode_stats(one_mode, modes, 0.1, 3.0, 0.1) == (1, 1.0)
    far = torch.full((100, 2), 50.0)
    assert mode_stats(far, modes, 0.1, 3.0, 0.1) == (0, 0.0)


def test_instance_norm_cnn_is_invariant_to_per_image_intensity_affine() -> None:
    from normlab.lab.experiments.c14_instance_contrast import intensity_shift

    torch.manual_seed(0)
    model = common.SmallCNN(common.norm_factory("in", images=True)).eval()
    x = torch.rand(16, 64)
    shifted = intensity_shift(x, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(shifted), model(x), atol=2e-3, rtol=2e-3)


def test_row_rnn_batch_norm_has_statistics_per_time_step() -> None:
    rnn = common.RowRNN("bn", hidden=8)
    assert len({id(m) for m in rnn.norms}) == rnn.seq_len
    ln = common.RowRNN("ln", hidden=8)
    assert len({id(m) for m in ln.norms}) == 1
    assert rnn(torch.rand(5, 64)).shape == (5, 10)
