"""Small fake experiments for the lab's infrastructure tests (store, sweep, report, CLI).

A module of its own so worker processes (forkserver/spawn, Ray) and CLI subprocesses can import
the classes by reference: run the CLI with ``NORMLAB_LAB_REGISTRY=lab_fakes`` and this folder on
``PYTHONPATH``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from normlab.lab.experiment import Experiment, RunResult, Verdict, compare

__all__ = [
    "ALL",
    "FailingExperiment",
    "FakeConfig",
    "FastExperiment",
    "SlowExperiment",
    "get",
    "small_bn_mlp",
]


@dataclass
class FakeConfig:
    """Config of the fakes.

    Attributes:
        effect: how much better the "treated" metric is than the "control" one.
        steps: length of the fake curve.
        sleep: seconds each run sleeps (the slow fake).
        fail_seed: a seed whose run raises (the failing fake).
        label: a string field (for --set tests).
        flag: a bool field.
        widths: a list field.
    """

    effect: float = 1.0
    steps: int = 5
    sleep: float = 0.0
    fail_seed: int = -1
    label: str = "fake"
    flag: bool = False
    widths: tuple[int, ...] | list[int] = (4, 8)


class FastExperiment(Experiment):
    """Deterministic metrics from the seed; a supported verdict; one figure."""

    name: ClassVar[str] = "fake-fast"
    claim: ClassVar[str] = "C98"
    title: ClassVar[str] = "A fake claim that the treatment helps"
    literature: ClassVar[str] = "Made up for tests (2026): the treatment helps by about 1 point."
    config_class: ClassVar[type] = FakeConfig

    def quick_config(self, config: Any) -> Any:
        config.steps = 3
        return config

    def run(self, config: Any, seed: int) -> RunResult:
        if config.sleep:
            time.sleep(config.sleep)
        if seed == config.fail_seed:
            raise RuntimeError(f"fake failure for seed {seed}")
        noise = ((seed * 7919) % 13) / 100.0
        curve = [1.0 - math.exp(-(i + 1) / (2 + seed)) for i in range(config.steps)]
        return RunResult(
            metrics={
                "treated": 10.0 + config.effect + noise,
                "control": 10.0,
                "nan_metric": math.nan,
                "inf_metric": math.inf,
                "pid": float(os.getpid()),
                "torch_threads": float(torch.get_num_threads()),
            },
            curves={"acc": curve},
            tables={"layers": [{"layer": 0, "std": 1.0}, {"layer": 1, "std": 0.5}]},
        )

    def verdict(self, config: Any, results: Sequence[RunResult]) -> Verdict:
        treated = [r.metrics["treated"] for r in results]
        control = [r.metrics["control"] for r in results]
        status, effect, spread = compare(treated, control, higher_is_better=True, min_effect=0.5)
        return Verdict(
            status=status,
            effect=effect,
            spread=spread,
            unit="points",
            summary=f"The treatment scored {effect:.2f} points higher ({len(results)} seeds).",
            agrees_with_literature=status == "supported",
        )

    def plot(self, config: Any, results: Sequence[RunResult], out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
        for r in results:
            ax.plot(r.curves["acc"])
        ax.set(xlabel="step", ylabel="accuracy", title=f"{self.name}: {len(results)} seeds")
        path = out_dir / "acc.png"
        fig.savefig(path)
        plt.close(fig)
        return [path]


class SlowExperiment(FastExperiment):
    """The fast fake, sleeping ``config.sleep`` seconds per run (default 0.6)."""

    name: ClassVar[str] = "fake-slow"
    claim: ClassVar[str] = "C99"
    title: ClassVar[str] = "A slow fake claim"

    def default_config(self, quick: bool = False) -> Any:
        return FakeConfig(sleep=0.6)


class FailingExperiment(FastExperiment):
    """Seed 1 fails; its verdict and plot work on the other seeds."""

    name: ClassVar[str] = "fake-failing"
    claim: ClassVar[str] = "C97"
    title: ClassVar[str] = "A fake claim whose second seed crashes"

    def default_config(self, quick: bool = False) -> Any:
        config = FakeConfig(fail_seed=1)
        return self.quick_config(config) if quick else config


ALL: list[Experiment] = [FailingExperiment(), FastExperiment(), SlowExperiment()]


def get(name: str) -> Experiment:
    """The fake called `name`."""
    for e in ALL:
        if e.name == name:
            return e
    raise KeyError(name)


def small_bn_mlp() -> torch.nn.Module:
    """64 -> 16 -> BatchNorm1d -> ReLU -> 10: a model for the data-parallel helper's tests."""
    import normlab.nn as nnl

    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), nnl.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
