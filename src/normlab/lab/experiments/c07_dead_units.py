"""C7: batch norm keeps ReLU units alive at high learning rates.

A ReLU MLP is trained on digits with plain SGD at a moderate and at a high learning rate, with and
without batch norm (same initial weights and batches). Every ``probe_every`` steps we measure the
dead fraction of each ReLU layer with :func:`normlab.diagnostics.dead_units` (REFERENCE §3: a unit
is dead when its output is exactly 0 for every example of the probe set; probe set = the fixed
held-out digits, model in eval mode). Without BN, large steps can push a unit's pre-activation
below 0 for every input, after which it gets no gradient and stays dead; with BN the
pre-activation is re-centred on every batch, so a unit cannot drift to "always negative".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from normlab.diagnostics import dead_units
from normlab.lab.common import (
    MLP,
    agrees,
    load_digits,
    metric_values,
    new_figure,
    norm_factory,
    plot_band,
    save_figure,
    seeded,
    summarize,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare
from normlab.lab.experiments._shared import seeds_label, train_in_chunks

__all__ = ["DeadReLUs", "DeadReLUsConfig"]

NORMS = ("none", "bn")
LRS = ("base", "high")


@dataclass
class DeadReLUsConfig:
    """Config of C7.

    Attributes:
        steps: SGD steps per run.
        lr_base: a moderate learning rate (the control: few dead units either way).
        lr_high: the high learning rate of the claim.
        batch_size: examples per step.
        width: units per hidden layer.
        depth: hidden ReLU layers.
        probe_every: steps between dead-unit measurements.
        n_test: held-out digits (also the probe set of the dead-unit measure).
        min_effect: smallest difference in dead fraction (fraction of units, 0.05 = 5 points)
            that counts as an effect.
    """

    steps: int = 400
    lr_base: float = 0.05
    lr_high: float = 1.0
    batch_size: int = 32
    width: int = 100
    depth: int = 4
    probe_every: int = 50
    n_test: int = 500
    min_effect: float = 0.05


class DeadReLUs(Experiment):
    """Dead-ReLU fraction over training at a moderate and a high learning rate, with/without BN.

    Metrics: (``{norm}`` in none, bn; ``{lr}`` in base, high) ``dead_fraction/{norm}/{lr}`` (final,
    mean over ReLU layers), ``max_layer_dead/{norm}/{lr}`` (final, worst layer),
    ``final_acc/{norm}/{lr}``, ``diverged/{norm}/{lr}`` (0/1).
    Curves: ``dead/{norm}/{lr}`` (mean dead fraction per probe), ``steps`` (probe steps).
    Tables: ``layers/{norm}/{lr}`` (final dead fraction per ReLU layer).
    """

    name: ClassVar[str] = "dead-units"
    claim: ClassVar[str] = "C7"
    title: ClassVar[str] = "Batch norm keeps neurons alive (fewer dead ReLUs)"
    literature: ClassVar[str] = (
        "Practice: at high learning rates plain ReLU nets lose units that output 0 for every "
        "input; BN re-centres pre-activations each batch and keeps them alive. Robust at high LR."
    )
    config_class: ClassVar[type] = DeadReLUsConfig

    def quick_config(self, config: DeadReLUsConfig) -> DeadReLUsConfig:
        config.steps = 80
        config.probe_every = 40
        config.depth = 3
        config.width = 64
        return config

    def run(self, config: DeadReLUsConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        probe = data[2]
        result = RunResult()
        for norm in NORMS:
            for lr_name in LRS:
                lr = config.lr_base if lr_name == "base" else config.lr_high
                gen = seeded(seed)
                model = MLP(64, [config.width] * config.depth, 10, norm_factory(norm))
                trace: list[dict[str, float]] = []

                def measure(step: int, model: MLP = model, trace: list = trace) -> None:
                    trace.append(dead_units(model, probe))

                curves, _ = train_in_chunks(
                    model, data, steps=config.steps, chunk=config.probe_every, lr=lr,
                    batch_size=config.batch_size, generator=gen, callback=measure,
                )
                means = [float(np.mean(list(d.values()))) for d in trace]
                # A diverged run keeps its last measurement for the rest of the grid.
                grid = list(range(0, config.steps + 1, config.probe_every))
                if grid[-1] != config.steps:
                    grid.append(config.steps)
                means += [means[-1]] * (len(grid) - len(means))
                key = f"{norm}/{lr_name}"
                final = trace[-1]
                result.metrics[f"dead_fraction/{key}"] = means[-1]
                result.metrics[f"max_layer_dead/{key}"] = float(max(final.values()))
                result.metrics[f"final_acc/{key}"] = curves.final_acc
                result.metrics[f"diverged/{key}"] = float(curves.diverged)
                result.curves[f"dead/{key}"] = means
                result.curves["steps"] = [float(s) for s in grid]
                result.tables[f"layers/{key}"] = [
                    {"layer": layer, "dead_fraction": value} for layer, value in final.items()
                ]
        return result

    def verdict(self, config: DeadReLUsConfig, results: Sequence[RunResult]) -> Verdict:
        none = metric_values(results, "dead_fraction/none/high")
        bn = metric_values(results, "dead_fraction/bn/high")
        status, effect, spread = compare(
            bn, none, higher_is_better=False, min_effect=config.min_effect
        )
        n = len(results)
        base_none = np.mean(metric_values(results, "dead_fraction/none/base"))
        base_bn = np.mean(metric_values(results, "dead_fraction/bn/base"))
        acc_none = np.mean(metric_values(results, "final_acc/none/high"))
        acc_bn = np.mean(metric_values(results, "final_acc/bn/high"))
        summary = (
            f"At lr {config.lr_high:g}, BN had "
            f"{summarize(100 * effect, 100 * spread, n, 'points fewer dead ReLUs', '.1f')}: "
            f"{100 * np.mean(bn):.1f}% vs {100 * np.mean(none):.1f}% dead without BN "
            f"(final test accuracy {acc_bn:.3f} vs {acc_none:.3f}); at lr {config.lr_base:g}: "
            f"{100 * base_bn:.1f}% vs {100 * base_none:.1f}% (probe: {config.n_test} held-out "
            "digits, eval mode)."
        )
        return Verdict(
            status, 100 * effect, 100 * spread, "points of dead units", summary,
            agrees(status, "supported"),
        )

    def plot(
        self, config: DeadReLUsConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, axes = new_figure(2)
        steps = results[0].curves["steps"]
        for ax, lr_name in zip(axes, LRS):
            lr = config.lr_base if lr_name == "base" else config.lr_high
            for norm, label in (("none", "no normalization"), ("bn", "BatchNorm1d")):
                runs = [[100 * v for v in r.curves[f"dead/{norm}/{lr_name}"]] for r in results]
                plot_band(ax, steps, runs, label)
            ax.set(xlabel="SGD step", ylabel="dead ReLUs (% of units, mean over layers)",
                   ylim=(-2, 102))
            ax.set_title(f"C7: lr {lr:g}, {config.depth}x{config.width} ReLU MLP "
                         f"({seeds_label(len(results))})")
            ax.legend()
        return [save_figure(fig, out_dir, "c07_dead_units")]
