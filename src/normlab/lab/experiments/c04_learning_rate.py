"""C4: batch norm allows higher learning rates (Ioffe & Szegedy 2015).

A ReLU MLP is trained on digits over a log grid of SGD learning rates, with and without BN, from
the same initial weights and batches. A learning rate is *stable* when training neither diverges
(non-finite or exploding loss) nor ends below a minimum test accuracy. The headline is the
largest stable learning rate with BN over the one without, in decades.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from normlab.lab.common import (
    MLP,
    agrees,
    load_digits,
    metric_values,
    n_seeds,
    new_figure,
    norm_factory,
    plot_band,
    save_figure,
    seeded,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare

__all__ = ["LearningRate", "LearningRateConfig"]

VARIANTS = ("none", "bn")


@dataclass
class LearningRateConfig:
    """Config of C4.

    Attributes:
        lrs: the learning-rate grid (about x3 apart).
        steps: SGD steps per (variant, learning rate).
        batch_size: examples per step.
        widths: hidden widths of the ReLU MLP.
        activation: nonlinearity.
        min_acc: final test accuracy a run needs to count as stable.
        n_test: held-out digits.
        min_effect: smallest gain in log10(largest stable lr) that counts (0.45 = one x3 step).
    """

    lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    steps: int = 120
    batch_size: int = 60
    widths: list[int] = field(default_factory=lambda: [100, 100])
    activation: str = "relu"
    min_acc: float = 0.5
    n_test: int = 500
    min_effect: float = 0.45


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


class LearningRate(Experiment):
    """Largest stable learning rate and final accuracy per learning rate, with and without BN.

    Metrics: ``log10_max_stable_lr/{none,bn}`` (one grid step below the grid when nothing is
    stable), ``final_acc/{variant}/lr={lr}``, ``diverged/{variant}/lr={lr}`` (0/1),
    ``n_stable/{variant}``.
    Curves: ``final_acc/{none,bn}`` over ``lrs``.
    """

    name: ClassVar[str] = "learning-rate"
    claim: ClassVar[str] = "C4"
    title: ClassVar[str] = "Batch norm allows higher learning rates"
    literature: ClassVar[str] = (
        "Ioffe & Szegedy 2015: BN-Inception trains at x5 and x30 the base learning rate; the "
        "same x5 without BN diverged. Robust."
    )
    config_class: ClassVar[type] = LearningRateConfig

    def quick_config(self, config: LearningRateConfig) -> LearningRateConfig:
        config.lrs = [0.1, 1.0, 10.0]
        config.steps = 40
        config.min_acc = 0.3
        return config

    def run(self, config: LearningRateConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        result = RunResult()
        lrs = sorted(config.lrs)
        below_grid = math.log10(lrs[0]) - 0.5
        for variant in VARIANTS:
            accs: list[float] = []
            stable_lrs: list[float] = []
            for lr in lrs:
                gen = seeded(seed)
                model = MLP(64, config.widths, 10, norm_factory(variant), act=config.activation)
                curves = train_classifier(
                    model,
                    data,
                    steps=config.steps,
                    lr=lr,
                    batch_size=config.batch_size,
                    generator=gen,
                    eval_every=config.steps,
                )
                acc = curves.final_acc
                accs.append(acc)
                result.metrics[f"final_acc/{variant}/lr={_lr_key(lr)}"] = acc
                result.metrics[f"diverged/{variant}/lr={_lr_key(lr)}"] = float(curves.diverged)
                if not curves.diverged and acc >= config.min_acc:
                    stable_lrs.append(lr)
            result.metrics[f"log10_max_stable_lr/{variant}"] = (
                math.log10(max(stable_lrs)) if stable_lrs else below_grid
            )
            result.metrics[f"n_stable/{variant}"] = float(len(stable_lrs))
            result.curves[f"final_acc/{variant}"] = accs
        result.curves["lrs"] = [float(lr) for lr in lrs]
        return result

    def verdict(self, config: LearningRateConfig, results: Sequence[RunResult]) -> Verdict:
        bn = metric_values(results, "log10_max_stable_lr/bn")
        none = metric_values(results, "log10_max_stable_lr/none")
        status, effect, spread = compare(
            bn, none, higher_is_better=True, min_effect=config.min_effect
        )
        summary = (
            f"The largest stable learning rate grew by "
            f"{summarize(effect, spread, len(results), 'decades')} with BN "
            f"(x{10**effect:.0f}: median {10 ** float(np.median(bn)):g} vs "
            f"{10 ** float(np.median(none)):g} without; stable = no divergence and test "
            f"accuracy >= {config.min_acc:.0%} after {config.steps} steps)."
        )
        return Verdict(
            status, effect, spread, "decades of lr", summary, agrees(status, "supported")
        )

    def plot(
        self, config: LearningRateConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax,) = new_figure(1)
        lrs = results[0].curves["lrs"]
        for variant, label in (("none", "no normalization"), ("bn", "BatchNorm1d")):
            plot_band(ax, lrs, [r.curves[f"final_acc/{variant}"] for r in results], label)
        ax.axhline(config.min_acc, color="gray", linestyle=":", label="stability threshold")
        ax.set(xscale="log", xlabel="SGD learning rate", ylabel="final test accuracy", ylim=(0, 1))
        ax.set_title(
            f"C4: ReLU MLP {config.widths}, {config.steps} steps ({n_seeds(len(results))})"
        )
        ax.legend()
        return [save_figure(fig, out_dir, "c04_learning_rate")]
