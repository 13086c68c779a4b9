"""C8: batch norm regularizes through the noise of its batch statistics.

Digits is easy, so we use a harder variant (REFERENCE.md §4): a small training set
(``n_train`` examples) whose inputs carry fixed Gaussian noise, where a ReLU MLP memorizes the
training set. The generalization gap (train minus test accuracy, both in eval mode) is compared
with and without BN at *matched train accuracy*: at the first evaluation where the train
accuracy reaches ``match_train_acc`` (the last evaluation if it never does). The final gap and
the test-loss gap at the end of training are reported as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from normlab.lab.common import (
    MLP,
    agrees,
    evaluate,
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

__all__ = ["Regularization", "RegularizationConfig"]

VARIANTS = ("none", "bn")
LABELS = {"none": "no normalization", "bn": "BatchNorm1d"}


@dataclass
class RegularizationConfig:
    """Config of C8.

    Attributes:
        n_train: training examples (a random subset of the training split).
        input_noise: std of the fixed Gaussian noise added to every input (train and test).
        steps: SGD steps per variant.
        lr: SGD learning rate.
        batch_size: examples per step (BN's noise grows as it shrinks).
        widths: hidden widths of the ReLU MLP.
        match_train_acc: train accuracy at which the gaps are compared.
        eval_every: evaluation period in steps.
        n_test: held-out digits.
        min_effect: smallest gap reduction (fraction of accuracy) that counts.
    """

    n_train: int = 300
    input_noise: float = 0.3
    steps: int = 500
    lr: float = 0.1
    batch_size: int = 16
    widths: list[int] = field(default_factory=lambda: [128, 128])
    match_train_acc: float = 0.99
    eval_every: int = 25
    n_test: int = 500
    min_effect: float = 0.01


class Regularization(Experiment):
    """Generalization gap with and without BN at matched train accuracy.

    Metrics: ``gap_matched/{none,bn}`` (train minus test accuracy at the matched point),
    ``train_acc_matched/{variant}``, ``test_acc_matched/{variant}``, ``gap_final/{variant}``,
    ``loss_gap_final/{variant}`` (test minus train loss), ``final_train_acc/{variant}``,
    ``final_test_acc/{variant}``.
    Curves: ``train_acc/{variant}``, ``test_acc/{variant}``, ``steps``.
    """

    name: ClassVar[str] = "regularization"
    claim: ClassVar[str] = "C8"
    title: ClassVar[str] = "Batch norm regularizes (batch noise)"
    literature: ClassVar[str] = (
        "Ioffe & Szegedy 2015: with BN, dropout can be reduced or removed; Wu & He 2018: GN has "
        "lower training error than BN but BN's noise helps generalization. Small effect that "
        "depends on batch noise."
    )
    config_class: ClassVar[type] = RegularizationConfig

    def quick_config(self, config: RegularizationConfig) -> RegularizationConfig:
        config.steps = 100
        config.eval_every = 20
        config.widths = [64, 64]
        return config

    def run(self, config: RegularizationConfig, seed: int) -> RunResult:
        x_train, y_train, x_test, y_test = load_digits(seed, config.n_test)
        noise_gen = torch.Generator().manual_seed(40_000 + seed)
        subset = torch.randperm(len(x_train), generator=noise_gen)[: config.n_train]
        x_train, y_train = x_train[subset], y_train[subset]
        x_train = x_train + config.input_noise * torch.randn(x_train.shape, generator=noise_gen)
        x_test = x_test + config.input_noise * torch.randn(x_test.shape, generator=noise_gen)
        data = (x_train, y_train, x_test, y_test)
        result = RunResult()
        for variant in VARIANTS:
            gen = seeded(seed)
            model = MLP(64, config.widths, 10, norm_factory(variant), act="relu")
            curves = train_classifier(
                model,
                data,
                steps=config.steps,
                lr=config.lr,
                batch_size=config.batch_size,
                generator=gen,
                eval_every=config.eval_every,
                eval_train=True,
            )
            matched = next(
                (i for i, a in enumerate(curves.train_acc) if a >= config.match_train_acc),
                len(curves.train_acc) - 1,
            )
            train_acc, test_acc = curves.train_acc[matched], curves.test_acc[matched]
            final_train_acc, train_loss = evaluate(model, x_train, y_train)
            final_test_acc, test_loss = evaluate(model, x_test, y_test)
            result.metrics[f"gap_matched/{variant}"] = train_acc - test_acc
            result.metrics[f"train_acc_matched/{variant}"] = train_acc
            result.metrics[f"test_acc_matched/{variant}"] = test_acc
            result.metrics[f"gap_final/{variant}"] = final_train_acc - final_test_acc
            result.metrics[f"loss_gap_final/{variant}"] = test_loss - train_loss
            result.metrics[f"final_train_acc/{variant}"] = final_train_acc
            result.metrics[f"final_test_acc/{variant}"] = final_test_acc
            result.curves[f"train_acc/{variant}"] = curves.train_acc
            result.curves[f"test_acc/{variant}"] = curves.test_acc
            result.curves["steps"] = [float(s) for s in curves.steps]
        return result

    def verdict(self, config: RegularizationConfig, results: Sequence[RunResult]) -> Verdict:
        bn = metric_values(results, "gap_matched/bn")
        none = metric_values(results, "gap_matched/none")
        status, effect, spread = compare(
            bn, none, higher_is_better=False, min_effect=config.min_effect
        )
        train = {
            v: float(np.mean(metric_values(results, f"train_acc_matched/{v}"))) for v in VARIANTS
        }
        test = {v: float(np.mean(metric_values(results, f"final_test_acc/{v}"))) for v in VARIANTS}
        summary = (
            f"At matched train accuracy (BN {100 * train['bn']:.1f}%, none "
            f"{100 * train['none']:.1f}%) BN shrank the train-test gap by "
            f"{summarize(100 * effect, 100 * spread, len(results), 'accuracy points', '.1f')} "
            f"({100 * np.mean(bn):.1f} vs {100 * np.mean(none):.1f} points; {config.n_train} "
            f"noisy training digits, batch {config.batch_size}); final test accuracy BN "
            f"{100 * test['bn']:.1f}% vs {100 * test['none']:.1f}%."
        )
        return Verdict(
            status,
            100 * effect,
            100 * spread,
            "accuracy points",
            summary,
            agrees(status, "supported"),
        )

    def plot(
        self, config: RegularizationConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax,) = new_figure(1, width=5.5)
        steps = results[0].curves["steps"]
        for i, variant in enumerate(VARIANTS):
            color = f"C{i}"
            plot_band(
                ax,
                steps,
                [r.curves[f"train_acc/{variant}"] for r in results],
                f"{LABELS[variant]}, train",
                color,
            )
            plot_band(
                ax,
                steps,
                [r.curves[f"test_acc/{variant}"] for r in results],
                f"{LABELS[variant]}, test",
                color,
            )
            ax.lines[-1].set_linestyle("--")
        ax.set(xlabel="SGD step", ylabel="accuracy (eval mode)", ylim=(0, 1.02))
        ax.set_title(
            f"C8: {config.n_train} noisy digits (σ={config.input_noise:g}), {n_seeds(len(results))}"
        )
        ax.legend(fontsize="small")
        return [save_figure(fig, out_dir, "c08_regularization")]
