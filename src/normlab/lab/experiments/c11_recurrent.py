"""C11: batch norm fits recurrent nets badly; layer norm suits them (Ba et al. 2016).

An Elman RNN (:class:`normlab.lab.common.RowRNN`) reads each 8x8 digit as a sequence of 8 rows
of 8 pixels and classifies it from its last hidden state. The norm sits inside the cell, on the
summed input and recurrent pre-activation: none, BN with separate statistics per time step
(the only way BN fits a recurrence; it ties the model to the training length), or LN shared
over steps. All three start from the same recurrent weights and see the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from normlab.lab.common import (
    RowRNN,
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

__all__ = ["Recurrent", "RecurrentConfig"]

VARIANTS = ("none", "bn", "ln")
LABELS = {"none": "no normalization", "bn": "BN per time step", "ln": "LayerNorm"}


@dataclass
class RecurrentConfig:
    """Config of C11.

    Attributes:
        steps: SGD steps per variant.
        lr: SGD learning rate (the same for all variants).
        momentum: SGD momentum.
        batch_size: sequences per step.
        hidden: hidden units of the RNN cell.
        target: test accuracy that counts as trained.
        eval_every: evaluation period in steps.
        n_test: held-out digits.
        min_effect: smallest saving in steps (LN vs none) that counts.
    """

    steps: int = 250
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    hidden: int = 64
    target: float = 0.9
    eval_every: int = 20
    n_test: int = 500
    min_effect: float = 40.0


class Recurrent(Experiment):
    """Steps to a target accuracy and final accuracy of a row-by-row RNN: none vs BN vs LN.

    Metrics: ``steps_to_target/{none,bn,ln}`` (censored at ``steps``),
    ``final_acc/{none,bn,ln}``, ``diverged/{none,bn,ln}`` (0/1).
    Curves: ``test_acc/{variant}``, ``train_loss/{variant}``, ``steps``.
    """

    name: ClassVar[str] = "recurrent"
    claim: ClassVar[str] = "C11"
    title: ClassVar[str] = "BN fits RNNs badly; LN suits them"
    literature: ClassVar[str] = (
        "Ba et al. 2016: layer norm speeds up recurrent nets (order embeddings: best model in "
        "60% of the baseline's time; DRAW about 2x faster); BN needs per-time-step statistics. "
        "Robust for LN's benefit."
    )
    config_class: ClassVar[type] = RecurrentConfig

    def quick_config(self, config: RecurrentConfig) -> RecurrentConfig:
        config.steps = 50
        config.eval_every = 10
        config.target = 0.5
        config.min_effect = 10.0
        return config

    def run(self, config: RecurrentConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        result = RunResult()
        for variant in VARIANTS:
            gen = seeded(seed)
            model = RowRNN(variant, hidden=config.hidden)
            curves = train_classifier(
                model,
                data,
                steps=config.steps,
                lr=config.lr,
                batch_size=config.batch_size,
                generator=gen,
                eval_every=config.eval_every,
                momentum=config.momentum,
            )
            hit = steps_to_target(curves.steps, curves.test_acc, config.target, config.steps)
            result.metrics[f"steps_to_target/{variant}"] = float(hit)
            result.metrics[f"final_acc/{variant}"] = curves.final_acc
            result.metrics[f"diverged/{variant}"] = float(curves.diverged)
            result.curves[f"test_acc/{variant}"] = curves.test_acc
            result.curves[f"train_loss/{variant}"] = curves.train_loss
            result.curves["steps"] = [float(s) for s in curves.steps]
        return result

    def verdict(self, config: RecurrentConfig, results: Sequence[RunResult]) -> Verdict:
        ln = metric_values(results, "steps_to_target/ln")
        none = metric_values(results, "steps_to_target/none")
        bn = metric_values(results, "steps_to_target/bn")
        status, effect, spread = compare(
            ln, none, higher_is_better=False, min_effect=config.min_effect
        )
        bn_status, bn_effect, _ = compare(
            ln, bn, higher_is_better=False, min_effect=config.min_effect
        )
        final = {v: float(np.mean(metric_values(results, f"final_acc/{v}"))) for v in VARIANTS}
        summary = (
            f"LN reached {config.target:.0%} test accuracy "
            f"{summarize(effect, spread, len(results), 'steps sooner', '.0f')} than the plain "
            f"RNN ({np.mean(ln):.0f} vs {np.mean(none):.0f} steps; budget {config.steps}) and "
            f"{bn_effect:.0f} steps sooner than per-step BN ({np.mean(bn):.0f} steps; "
            f"{bn_status}); final accuracy none {100 * final['none']:.1f}%, BN "
            f"{100 * final['bn']:.1f}%, LN {100 * final['ln']:.1f}%."
        )
        return Verdict(status, effect, spread, "steps", summary, agrees(status, "supported"))

    def plot(
        self, config: RecurrentConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax_acc, ax_loss) = new_figure(2)
        steps = results[0].curves["steps"]
        for variant in VARIANTS:
            plot_band(
                ax_acc, steps, [r.curves[f"test_acc/{variant}"] for r in results], LABELS[variant]
            )
            plot_band(
                ax_loss,
                steps,
                [r.curves[f"train_loss/{variant}"] for r in results],
                LABELS[variant],
            )
        ax_acc.axhline(config.target, color="gray", linestyle=":", label="target")
        ax_acc.set(xlabel="SGD step", ylabel="test accuracy", ylim=(0, 1))
        ax_acc.set_title(f"C11: tanh RNN over 8 digit rows, hidden {config.hidden}")
        ax_loss.set(xlabel="SGD step", ylabel="training loss", yscale="log")
        ax_loss.set_title(f"{n_seeds(len(results))}, lr {config.lr}, momentum {config.momentum}")
        ax_acc.legend(fontsize="small")
        ax_loss.legend(fontsize="small")
        return [save_figure(fig, out_dir, "c11_recurrent")]
