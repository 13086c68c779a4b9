"""C1: input normalization speeds and stabilizes training (LeCun et al. 1998, "Efficient BackProp").

Three versions of the same digits features feed the same ReLU MLP over a few SGD learning rates:

- ``raw``: pixels in [0, 1] (all non-negative, means far from 0);
- ``scaled``: each feature multiplied by a scale drawn log-uniformly over ``scale_decades``
  orders of magnitude (a fixed draw per seed), the badly conditioned case;
- ``standardized``: the scaled features through :class:`normlab.data.Standardizer` fitted once
  on the training set (zero mean, unit variance per feature; constant pixels map to 0).

Per (features, learning rate) we record the steps to a target test accuracy (censored at the
budget) and whether training diverged. The headline compares the best learning rate of each:
steps saved by standardizing the badly scaled features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from normlab.data import Standardizer
from normlab.lab.common import (
    MLP,
    agrees,
    load_digits,
    metric_values,
    n_seeds,
    new_figure,
    plot_band,
    save_figure,
    seeded,
    steps_to_target,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare

__all__ = ["InputStandardization", "InputStandardizationConfig"]

FEATURES = ("raw", "scaled", "standardized")


@dataclass
class InputStandardizationConfig:
    """Config of C1.

    Attributes:
        lrs: SGD learning rates tried for every version of the features.
        steps: SGD steps per (features, learning rate).
        batch_size: examples per step.
        widths: hidden widths of the ReLU MLP.
        scale_decades: per-feature scales are 10**U(-d/2, d/2): d orders of magnitude.
        target: test accuracy that counts as trained.
        eval_every: evaluation period in steps.
        n_test: held-out digits.
        min_effect: smallest saving in steps (at the best learning rate) that counts.
    """

    lrs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    steps: int = 300
    batch_size: int = 32
    widths: list[int] = field(default_factory=lambda: [64])
    scale_decades: float = 4.0
    target: float = 0.85
    eval_every: int = 20
    n_test: int = 500
    min_effect: float = 30.0


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def feature_versions(
    data: tuple[torch.Tensor, ...], decades: float, seed: int
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The three versions of the digits split: raw, badly scaled, standardized."""
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(10_000 + seed)
    exponents = (torch.rand(x_train.shape[1], generator=gen) - 0.5) * decades
    scales = 10.0**exponents
    scaled = (x_train * scales, y_train, x_test * scales, y_test)
    standardizer = Standardizer().fit(scaled[0])
    standardized = (
        standardizer.transform(scaled[0]).float(),
        y_train,
        standardizer.transform(scaled[2]).float(),
        y_test,
    )
    return {"raw": data, "scaled": scaled, "standardized": standardized}


class InputStandardization(Experiment):
    """Steps to a target accuracy and divergence: raw vs badly scaled vs standardized inputs.

    Metrics: ``steps_to_target/{features}/lr={lr}``, ``diverged/{features}/lr={lr}`` (0/1),
    ``best_steps/{features}`` (fewest steps over the learning rates, censored at ``steps``),
    ``divergence_rate/{features}`` (fraction of learning rates that diverged).
    Curves: ``test_acc/{features}`` at the best learning rate, ``steps``.
    """

    name: ClassVar[str] = "input-standardization"
    claim: ClassVar[str] = "C1"
    title: ClassVar[str] = "Input normalization speeds and stabilizes training"
    literature: ClassVar[str] = (
        "LeCun et al. 1998 (Efficient BackProp): zero-mean, equal-variance inputs condition the "
        "Hessian; badly scaled inputs force small learning rates and slow convergence. Robust."
    )
    config_class: ClassVar[type] = InputStandardizationConfig

    def quick_config(self, config: InputStandardizationConfig) -> InputStandardizationConfig:
        config.lrs = [0.1, 1.0]
        config.steps = 80
        config.eval_every = 10
        config.target = 0.75
        config.min_effect = 10.0
        return config

    def run(self, config: InputStandardizationConfig, seed: int) -> RunResult:
        versions = feature_versions(load_digits(seed, config.n_test), config.scale_decades, seed)
        result = RunResult()
        for features, data in versions.items():
            best_steps = config.steps + 1
            best_curve: list[float] = []
            diverged = 0
            for lr in config.lrs:
                gen = seeded(seed)
                model = MLP(64, config.widths, 10, None, act="relu")
                curves = train_classifier(
                    model,
                    data,
                    steps=config.steps,
                    lr=lr,
                    batch_size=config.batch_size,
                    generator=gen,
                    eval_every=config.eval_every,
                )
                hit = steps_to_target(curves.steps, curves.test_acc, config.target, config.steps)
                result.metrics[f"steps_to_target/{features}/lr={_lr_key(lr)}"] = float(hit)
                result.metrics[f"diverged/{features}/lr={_lr_key(lr)}"] = float(curves.diverged)
                diverged += curves.diverged
                # Ties (e.g. all censored) go to the run with the higher final accuracy.
                better = hit < best_steps or (
                    hit == best_steps and curves.final_acc > (best_curve or [0.0])[-1]
                )
                if better:
                    best_steps, best_curve = hit, curves.test_acc
                result.curves["steps"] = [float(s) for s in curves.steps]
            result.metrics[f"best_steps/{features}"] = float(best_steps)
            result.metrics[f"divergence_rate/{features}"] = diverged / len(config.lrs)
            result.curves[f"test_acc/{features}"] = best_curve
        return result

    def verdict(self, config: InputStandardizationConfig, results: Sequence[RunResult]) -> Verdict:
        std = metric_values(results, "best_steps/standardized")
        bad = metric_values(results, "best_steps/scaled")
        raw = metric_values(results, "best_steps/raw")
        status, effect, spread = compare(
            std, bad, higher_is_better=False, min_effect=config.min_effect
        )
        div = {f: float(np.mean(metric_values(results, f"divergence_rate/{f}"))) for f in FEATURES}
        summary = (
            f"Standardizing badly scaled inputs reached {config.target:.0%} test accuracy "
            f"{summarize(effect, spread, len(results), 'steps sooner', '.0f')} at each "
            f"version's best learning rate ({np.mean(std):.0f} vs {np.mean(bad):.0f} steps, "
            f"raw pixels {np.mean(raw):.0f}; budget {config.steps}); divergence rate over "
            f"learning rates {div['scaled']:.0%} scaled vs {div['standardized']:.0%} "
            f"standardized vs {div['raw']:.0%} raw."
        )
        return Verdict(status, effect, spread, "steps", summary, agrees(status, "supported"))

    def plot(
        self, config: InputStandardizationConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax_curve, ax_bar) = new_figure(2)
        steps = results[0].curves["steps"]
        labels = {
            "raw": "raw pixels [0, 1]",
            "scaled": f"badly scaled ({config.scale_decades:g} decades)",
            "standardized": "standardized (Standardizer)",
        }
        for features in FEATURES:
            runs = [r.curves[f"test_acc/{features}"] for r in results]
            plot_band(ax_curve, steps, runs, labels[features])
        ax_curve.axhline(config.target, color="gray", linestyle=":", label="target")
        ax_curve.set(xlabel="SGD step", ylabel="test accuracy", ylim=(0, 1))
        ax_curve.set_title(f"C1: best learning rate per input version ({n_seeds(len(results))})")
        ax_curve.legend()
        width = 0.8 / len(FEATURES)
        positions = np.arange(len(config.lrs))
        for i, features in enumerate(FEATURES):
            values = [
                np.mean(metric_values(results, f"steps_to_target/{features}/lr={_lr_key(lr)}"))
                for lr in config.lrs
            ]
            ax_bar.bar(positions + (i - 1) * width, values, width, label=labels[features])
        ax_bar.set_xticks(positions, [f"lr {lr:g}" for lr in config.lrs])
        ax_bar.axhline(config.steps, color="gray", linestyle=":", label="budget (never reached)")
        ax_bar.set(ylabel=f"steps to {config.target:.0%} (mean over seeds)")
        ax_bar.set_title("steps to target per learning rate")
        ax_bar.legend(fontsize="small")
        return [save_figure(fig, out_dir, "c01_input_standardization")]
