"""C14: instance norm removes per-instance contrast (Ulyanov et al. 2016).

A small CNN (two unpadded 3x3 convolutions, a norm after each) is trained on clean digits with
instance norm, batch norm, group norm or no norm, then tested on digits whose intensities went
through a random per-image affine map ``a * x + b``: contrast ``a = 4**(s*u)`` and brightness
``b = s*v`` with ``u, v ~ U(-1, 1)`` at severity ``s``.

Without padding the first convolution turns the per-image ``a * x + b`` into a per-channel
``a * z + const`` (a > 0), which instance norm removes exactly (up to its eps), so the IN network
is invariant by construction; GN removes the contrast but not the brightness (the constant
differs between the channels of a group); BN and no norm remove neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from normlab.lab.common import (
    SmallCNN,
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

__all__ = ["InstanceContrast", "InstanceContrastConfig", "intensity_shift"]

VARIANTS = ("none", "bn", "gn", "in")
LABELS = {
    "none": "no normalization",
    "bn": "BatchNorm2d",
    "gn": "GroupNorm (4 groups)",
    "in": "InstanceNorm2d (affine)",
}


@dataclass
class InstanceContrastConfig:
    """Config of C14.

    Attributes:
        severities: shift severities s tested (0 = clean); contrast up to x4**s, brightness
            up to +-s.
        headline_severity: the s of the headline number (must be in ``severities``).
        steps: SGD steps per variant (trained on clean digits only).
        lr: SGD learning rate.
        momentum: SGD momentum.
        batch_size: examples per step.
        channels: output channels of the two convolutions.
        groups: groups of the GN variant.
        n_test: held-out digits.
        min_effect: smallest accuracy gain of IN over BN under shift (fraction) that counts.
    """

    severities: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    headline_severity: float = 1.0
    steps: int = 300
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    channels: list[int] = field(default_factory=lambda: [16, 32])
    groups: int = 4
    n_test: int = 500
    min_effect: float = 0.05


def intensity_shift(x: torch.Tensor, severity: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image random contrast and brightness: ``a * x + b`` with ``a = 4**(s*u)``, ``b = s*v``.

    Args:
        x: flat images ``(N, D)``.
        severity: s >= 0; 0 returns ``x`` unchanged.
        generator: draws ``u, v ~ U(-1, 1)`` per image.
    """
    n = x.shape[0]
    u = torch.rand(n, 1, generator=generator) * 2 - 1
    v = torch.rand(n, 1, generator=generator) * 2 - 1
    return x * 4.0 ** (severity * u) + severity * v


class InstanceContrast(Experiment):
    """Accuracy under per-image contrast/brightness shifts: IN vs BN vs GN vs none.

    Metrics: ``acc/{variant}/s={s}`` for every severity, ``acc/{variant}`` at the headline
    severity, ``clean_acc/{variant}``, ``drop/{variant}`` (clean minus headline accuracy).
    Curves: ``acc/{variant}`` over ``severities``.
    """

    name: ClassVar[str] = "instance-contrast"
    claim: ClassVar[str] = "C14"
    title: ClassVar[str] = "Instance norm removes per-instance contrast"
    literature: ClassVar[str] = (
        "Ulyanov et al. 2016: instance norm discards per-image contrast, which helps "
        "stylization; the invariance holds by construction. Robust."
    )
    config_class: ClassVar[type] = InstanceContrastConfig

    def quick_config(self, config: InstanceContrastConfig) -> InstanceContrastConfig:
        config.severities = [0.0, 1.0]
        config.steps = 80
        config.lr = 0.1
        config.channels = [8, 16]
        return config

    def run(self, config: InstanceContrastConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        _, _, x_test, y_test = data
        shifted = {
            s: intensity_shift(x_test, s, torch.Generator().manual_seed(30_000 + seed))
            for s in config.severities
        }
        result = RunResult()
        for variant in VARIANTS:
            gen = seeded(seed)
            model = SmallCNN(
                norm_factory(variant, images=True, groups=config.groups),
                channels=(config.channels[0], config.channels[1]),
            )
            train_classifier(
                model,
                data,
                steps=config.steps,
                lr=config.lr,
                batch_size=config.batch_size,
                generator=gen,
                eval_every=config.steps,
                momentum=config.momentum,
            )
            accs = []
            for s in config.severities:
                acc = evaluate(model, shifted[s], y_test)[0]
                result.metrics[f"acc/{variant}/s={s:g}"] = acc
                accs.append(acc)
            clean = evaluate(model, x_test, y_test)[0]
            headline = result.metrics[f"acc/{variant}/s={config.headline_severity:g}"]
            result.metrics[f"acc/{variant}"] = headline
            result.metrics[f"clean_acc/{variant}"] = clean
            result.metrics[f"drop/{variant}"] = clean - headline
            result.curves[f"acc/{variant}"] = accs
        result.curves["severities"] = [float(s) for s in config.severities]
        return result

    def verdict(self, config: InstanceContrastConfig, results: Sequence[RunResult]) -> Verdict:
        inst = metric_values(results, "acc/in")
        bn = metric_values(results, "acc/bn")
        status, effect, spread = compare(
            inst, bn, higher_is_better=True, min_effect=config.min_effect
        )
        mean = {v: float(np.mean(metric_values(results, f"acc/{v}"))) for v in VARIANTS}
        clean = {v: float(np.mean(metric_values(results, f"clean_acc/{v}"))) for v in VARIANTS}
        summary = (
            f"Under per-image contrast/brightness shifts (severity "
            f"{config.headline_severity:g}) IN beat BN by "
            f"{summarize(100 * effect, 100 * spread, len(results), 'accuracy points', '.1f')}: "
            + ", ".join(
                f"{v.upper()} {100 * mean[v]:.1f}% (clean {100 * clean[v]:.1f}%)" for v in VARIANTS
            )
            + "."
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
        self, config: InstanceContrastConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax,) = new_figure(1, width=5.5)
        severities = results[0].curves["severities"]
        for variant in VARIANTS:
            plot_band(
                ax, severities, [r.curves[f"acc/{variant}"] for r in results], LABELS[variant]
            )
        ax.set(
            xlabel="shift severity s (contrast up to x4^s, brightness up to ±s)",
            ylabel="test accuracy",
            ylim=(0, 1),
        )
        ax.set_title(f"C14: CNN trained on clean digits ({n_seeds(len(results))})")
        ax.legend(fontsize="small")
        return [save_figure(fig, out_dir, "c14_instance_contrast")]
