"""C5: batch norm reduces internal covariate shift (contested), measured both ways.

Ioffe & Szegedy's MNIST network (three fully connected sigmoid layers of 100 units, batch 60) is
trained on digits with the same SGD learning rate in three variants from the same initial weights
and batches: no normalization, batch norm, and "noisy BN" (batch norm followed by a random
per-unit scale and shift redrawn at every step, Santurkar et al. 2018, Sec. 2). Every
``probe_every`` steps:

* **Percentile drift** (Ioffe 2015, Fig. 1; REFERENCE §3): the {15, 50, 85}th percentiles of each
  last-hidden-layer unit's sigmoid *input* over a fixed probe set of held-out digits, computed in
  train mode (the distribution the layer sees while it learns) on a copy of the model. Drift of a
  unit = the total movement of its three percentiles between measurements after the first
  ``burn_in`` steps, divided by its mean spread (85th - 15th percentile) over the same window,
  averaged over the three percentiles; the run's drift is the median over units.
* **Gradient-change ICS** (Santurkar et al. 2018, Definition 2.1, via
  :func:`normlab.diagnostics.gradient_change`): on a fixed training batch, each linear layer's
  gradient G before and G' after the layers below it take their SGD step; ``||G - G'||_2`` and
  ``cos(G, G')``, averaged over linear layers and measurements.
* The counter-experiment: test accuracy after ``steps`` steps. If noisy BN, whose distributions
  move by construction, trains about as well as BN, BN's benefit does not come from stable
  distributions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normlab.nn as nnl
from normlab.diagnostics import gradient_change
from normlab.lab.common import (
    MLP,
    NormFactory,
    load_digits,
    metric_values,
    new_figure,
    plot_band,
    save_figure,
    seeded,
    summarize,
)
from normlab.lab.experiment import Experiment, RunResult, Status, Verdict, compare
from normlab.lab.experiments._shared import NoisyShift, seeds_label, train_in_chunks

__all__ = ["CovariateShift", "CovariateShiftConfig", "percentile_drift"]

VARIANTS = ("none", "bn", "noisy_bn")
LABELS = {"none": "no normalization", "bn": "BatchNorm1d", "noisy_bn": "noisy BN"}
PERCENTILES = (15.0, 50.0, 85.0)


@dataclass
class CovariateShiftConfig:
    """Config of C5.

    Attributes:
        steps: SGD steps per variant.
        lr: SGD learning rate, the same for all variants (the sigmoid MLP without BN sits on a
            plateau at chance for hundreds of steps at smaller rates with torch's default init).
        batch_size: 60, as in Ioffe & Szegedy's MNIST experiment.
        width: units per hidden layer (paper: 100).
        depth: hidden sigmoid layers (paper: 3).
        probe_every: steps between measurements.
        burn_in: steps before the drift window starts (the first fast adaptation is left out).
        n_probe: held-out digits in the percentile probe set.
        ics_batch: training examples in the fixed batch of the gradient-change measure.
        noise_scale_std: std of the log scale injected per unit and step by noisy BN.
        noise_shift_std: std of the shift injected per unit and step by noisy BN.
        n_test: held-out digits.
        min_drift: smallest drift reduction (in spreads) that counts as an effect.
        min_cos: smallest change of cos(G, G') that counts as an effect.
        min_acc: smallest accuracy difference (fraction) that counts as an effect.
    """

    steps: int = 500
    lr: float = 2.0
    batch_size: int = 60
    width: int = 100
    depth: int = 3
    probe_every: int = 25
    burn_in: int = 100
    n_probe: int = 256
    ics_batch: int = 60
    noise_scale_std: float = 0.5
    noise_shift_std: float = 0.5
    n_test: int = 500
    min_drift: float = 0.2
    min_cos: float = 0.02
    min_acc: float = 0.02


def percentile_drift(pcts: Tensor) -> Tensor:
    """Per-unit drift from percentiles logged over training.

    Args:
        pcts: ``(T, 3, U)``: at T measurements, the 15/50/85th percentiles of U units.

    Returns:
        ``(U,)``: the total movement of the three percentiles over the T measurements divided by
        the unit's mean spread (85th - 15th), averaged over the three percentiles.
    """
    movement = (pcts[1:] - pcts[:-1]).abs().sum(dim=0).mean(dim=0)
    spread = (pcts[:, 2] - pcts[:, 0]).mean(dim=0).clamp_min(1e-12)
    return movement / spread


def _factory(variant: str, config: CovariateShiftConfig) -> NormFactory:
    if variant == "none":
        return None
    if variant == "bn":
        return nnl.BatchNorm1d

    def noisy(num_features: int) -> nn.Module:
        return nn.Sequential(
            nnl.BatchNorm1d(num_features),
            NoisyShift(num_features, config.noise_scale_std, config.noise_shift_std),
        )

    return noisy


class CovariateShift(Experiment):
    """Percentile drift, Santurkar's gradient-change ICS and accuracy for none / BN / noisy BN.

    Metrics: (``{v}`` in none, bn, noisy_bn) ``drift/{v}`` (median over last-hidden-layer units of
    the percentile drift, in spreads), ``ics_l2/{v}`` and ``ics_cos/{v}`` (mean over linear layers
    and measurements), ``final_acc/{v}`` (test accuracy after ``steps``).
    Curves: ``pct15/{v}``, ``pct50/{v}``, ``pct85/{v}`` (unit 0's percentiles),
    ``ics_cos_curve/{v}``, ``ics_l2_curve/{v}`` (per measurement), ``test_acc/{v}``, ``steps``
    (measurement steps), ``eval_steps``.
    """

    name: ClassVar[str] = "covariate-shift"
    claim: ClassVar[str] = "C5"
    title: ClassVar[str] = "Batch norm reduces internal covariate shift"
    literature: ClassVar[str] = (
        "Ioffe & Szegedy 2015, Fig. 1: the 15/50/85th percentiles of a last-layer sigmoid input "
        "drift without BN and stay stable with it. Contested by Santurkar et al. 2018: BN does "
        "not reduce the gradient-change ICS, and BN with injected non-stationary noise ('noisy "
        "BN') trains about as well as BN."
    )
    config_class: ClassVar[type] = CovariateShiftConfig

    def quick_config(self, config: CovariateShiftConfig) -> CovariateShiftConfig:
        config.steps = 120
        config.probe_every = 30
        config.burn_in = 30
        config.n_probe = 128
        return config

    def run(self, config: CovariateShiftConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        x_probe = data[2][: config.n_probe]
        batch_gen = torch.Generator().manual_seed(seed + 7919)
        ics_idx = torch.randint(len(data[0]), (config.ics_batch,), generator=batch_gen)
        x_ics, y_ics = data[0][ics_idx], data[1][ics_idx]
        result = RunResult()
        for variant in VARIANTS:
            gen = seeded(seed)
            model = MLP(
                64, [config.width] * config.depth, 10, _factory(variant, config), act="sigmoid"
            )
            sigmoids = [m for m in model.modules() if isinstance(m, nn.Sigmoid)]
            linears = {
                name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            }
            pcts: list[Tensor] = []
            cos_curve: list[float] = []
            l2_curve: list[float] = []

            def measure(step: int, model: MLP = model, pcts: list = pcts,
                        cos_curve: list = cos_curve, l2_curve: list = l2_curve,
                        linears: set = linears) -> None:
                net = copy.deepcopy(model)
                net.train()
                last = [m for m in net.modules() if isinstance(m, nn.Sigmoid)][-1]
                seen: list[Tensor] = []
                handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
                try:
                    with torch.no_grad(), torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed * 100003 + step)
                        net(x_probe)
                finally:
                    handle.remove()
                q = torch.tensor(PERCENTILES, dtype=torch.float64) / 100
                pcts.append(torch.quantile(seen[0].double(), q, dim=0))
                opt = torch.optim.SGD(model.parameters(), lr=config.lr)
                change = gradient_change(
                    model, opt, F.cross_entropy, x_ics, y_ics, seed=seed * 100003 + step
                )
                mine = [c for name, c in change.items() if name in linears]
                cos_curve.append(float(np.mean([c.cos for c in mine])))
                l2_curve.append(float(np.mean([c.l2 for c in mine])))

            curves, calls = train_in_chunks(
                model, data, steps=config.steps, chunk=config.probe_every, lr=config.lr,
                batch_size=config.batch_size, generator=gen, callback=measure,
            )
            del sigmoids
            stacked = torch.stack(pcts)  # (T, 3, units)
            window = stacked[[i for i, s in enumerate(calls) if s >= config.burn_in]]
            drift = percentile_drift(window) if len(window) > 1 else torch.zeros(1)
            result.metrics[f"drift/{variant}"] = float(drift.median())
            result.metrics[f"ics_l2/{variant}"] = float(np.mean(l2_curve[1:] or l2_curve))
            result.metrics[f"ics_cos/{variant}"] = float(np.mean(cos_curve[1:] or cos_curve))
            result.metrics[f"final_acc/{variant}"] = curves.final_acc
            for i, q in enumerate(("pct15", "pct50", "pct85")):
                result.curves[f"{q}/{variant}"] = stacked[:, i, 0].tolist()
            result.curves[f"ics_cos_curve/{variant}"] = cos_curve
            result.curves[f"ics_l2_curve/{variant}"] = l2_curve
            result.curves[f"test_acc/{variant}"] = curves.test_acc
            result.curves["steps"] = [float(s) for s in calls]
            result.curves["eval_steps"] = [float(s) for s in curves.steps]
        return result

    def verdict(self, config: CovariateShiftConfig, results: Sequence[RunResult]) -> Verdict:
        n = len(results)

        def values(key: str) -> list[float]:
            return metric_values(results, key)

        drift_status, drift_effect, drift_spread = compare(
            values("drift/bn"), values("drift/none"), higher_is_better=False,
            min_effect=config.min_drift,
        )
        cos_status, cos_effect, cos_spread = compare(
            values("ics_cos/bn"), values("ics_cos/none"), higher_is_better=True,
            min_effect=config.min_cos,
        )
        noisy_status, noisy_effect, noisy_spread = compare(
            values("final_acc/noisy_bn"), values("final_acc/none"), higher_is_better=True,
            min_effect=config.min_acc,
        )
        _, gap, gap_spread = compare(
            values("final_acc/noisy_bn"), values("final_acc/bn"), higher_is_better=True,
            min_effect=config.min_acc,
        )
        shift_status: Status
        shift_status, _, _ = compare(
            values("drift/noisy_bn"), values("drift/bn"), higher_is_better=True,
            min_effect=config.min_drift,
        )

        def mean(key: str) -> float:
            return float(np.mean(values(key)))

        summary = (
            f"BN reduces percentile drift: {drift_status} "
            f"({summarize(drift_effect, drift_spread, n, 'spreads less', '.2f')}; drift "
            f"{mean('drift/bn'):.2f} with BN vs {mean('drift/none'):.2f} without). "
            f"BN reduces gradient-change ICS: {cos_status} (cos(G, G') "
            f"{mean('ics_cos/bn'):.3f} with BN vs {mean('ics_cos/none'):.3f} without, "
            f"{cos_effect:+.3f} ±{cos_spread:.3f}; ||G - G'|| {mean('ics_l2/bn'):.3g} vs "
            f"{mean('ics_l2/none'):.3g}). Injected noise adds shift: {shift_status} (noisy-BN "
            f"drift {mean('drift/noisy_bn'):.2f}). BN's benefit survives injected shift: "
            f"{noisy_status} (noisy BN {mean('final_acc/noisy_bn'):.3f} vs "
            f"{mean('final_acc/none'):.3f} without BN, {100 * noisy_effect:+.1f} "
            f"±{100 * noisy_spread:.1f} points; vs BN {mean('final_acc/bn'):.3f}, "
            f"{100 * gap:+.1f} ±{100 * gap_spread:.1f} points)."
        )
        return Verdict(
            drift_status, drift_effect, drift_spread, "percentile spreads of drift", summary, None
        )

    def plot(
        self, config: CovariateShiftConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        steps = results[0].curves["steps"]
        fig, axes = new_figure(3, width=4.4)
        for ax, variant in zip(axes, VARIANTS):
            for q in ("pct15", "pct50", "pct85"):
                plot_band(ax, steps, [r.curves[f"{q}/{variant}"] for r in results],
                          f"{q[3:]}th percentile")
            ax.axvline(config.burn_in, color="gray", linestyle=":", label="drift window starts")
            ax.set(xlabel="SGD step", ylabel="sigmoid input (last hidden layer, unit 0)")
            ax.set_title(f"C5: {LABELS[variant]} ({seeds_label(len(results))})")
            ax.legend(fontsize=8)
        first = save_figure(fig, out_dir, "c05_percentiles")

        fig, (ax_cos, ax_acc) = new_figure(2)
        for variant in VARIANTS:
            plot_band(ax_cos, steps, [r.curves[f"ics_cos_curve/{variant}"] for r in results],
                      LABELS[variant])
            plot_band(ax_acc, results[0].curves["eval_steps"],
                      [r.curves[f"test_acc/{variant}"] for r in results], LABELS[variant])
        ax_cos.set(xlabel="SGD step", ylabel="cos(G, G'), mean over linear layers")
        ax_cos.set_title("Santurkar's gradient-change ICS (1 = no shift)")
        ax_acc.set(xlabel="SGD step", ylabel="test accuracy", ylim=(0, 1))
        ax_acc.set_title(f"training, lr {config.lr}, batch {config.batch_size}")
        ax_cos.legend()
        ax_acc.legend()
        second = save_figure(fig, out_dir, "c05_ics_accuracy")
        return [first, second]
