"""C13: batch norm's train/inference discrepancy at small or non-i.i.d. batches, and its fixes.

A ReLU MLP with batch norm after each hidden linear layer is trained on digits in two regimes:

* **small**: i.i.d. batches of ``small_batches`` examples (2, 4);
* **non-i.i.d.**: batches of ``noniid_batch`` examples drawn from only ``classes_per_batch``
  classes at a time (as when data arrive sorted by class).

For each trained model we measure, with :func:`normlab.diagnostics.train_eval_gap` (REFERENCE §3),
the accuracy on held-out digits in *train mode* (batch statistics, test batches built like the
training batches) and in *eval mode* (running statistics): the discrepancy is their difference.
Then the fixes, each scored by its eval-mode accuracy minus plain BN's ("recovered accuracy"):

* precise BN (Wu & Johnson 2021, :func:`normlab.calibrate.precise_bn`): running statistics
  recomputed on the final weights over ``precise_batches`` training batches of the training kind;
* batch renorm (Ioffe 2017, :class:`normlab.nn.renorm.BatchRenorm1d`), trained instead of BN;
* ghost BN (Hoffer et al. 2017, :class:`normlab.nn.ghost.GhostBatchNorm1d`; non-i.i.d. regime
  only, where virtual batches are smaller than the batch), trained instead of BN;
* Bessel's correction (small regime): the running variance is stored unbiased, ``n/(n-1)`` times
  the average batch variance (torch's and normlab's convention, n = batch size for an (N, C)
  input); "no Bessel" evaluates with the running variance times ``(n-1)/n``, i.e. exactly what an
  EMA of the biased batch variances would hold (Flax/Keras convention).

In the non-i.i.d. regime, BN trained on i.i.d. batches of the same size gives the accuracy to
recover (``eval_acc/noniid/bn_iid``). The headline is batch renorm's recovered accuracy averaged
over the regimes (the fix the literature reports for both); the summary gives every fix's, and
the discrepancy itself, per regime.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

import normlab.nn as nnl
from normlab.calibrate import precise_bn
from normlab.diagnostics import train_eval_gap
from normlab.lab.common import (
    MLP,
    NormFactory,
    agrees,
    load_digits,
    metric_values,
    new_figure,
    save_figure,
    seeded,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare
from normlab.lab.experiments._shared import class_batches, seeds_label, train_on_batches
from normlab.nn.ghost import GhostBatchNorm1d
from normlab.nn.renorm import BatchRenorm1d

__all__ = ["TrainInferenceGap", "TrainInferenceGapConfig", "class_ordered"]

LABELS = {
    "bn": "BN (running stats)",
    "no_bessel": "BN, running var without Bessel",
    "precise": "BN + precise BN",
    "renorm": "batch renorm",
    "ghost": "ghost BN",
    "bn_iid": "BN trained on i.i.d. batches",
}
SMALL_FIXES = ("no_bessel", "precise", "renorm")
NONIID_FIXES = ("precise", "renorm", "ghost")


@dataclass
class TrainInferenceGapConfig:
    """Config of C13.

    Attributes:
        small_batches: i.i.d. batch sizes of the small-batch regime.
        small_steps: SGD steps of the small-batch regime.
        small_lr: its learning rate (momentum 0.9).
        noniid_batch: batch size of the non-i.i.d. regime.
        classes_per_batch: classes per non-i.i.d. batch.
        noniid_steps: SGD steps of the non-i.i.d. regime.
        noniid_lr: its learning rate (momentum 0.9).
        width: units per hidden layer.
        depth: hidden layers.
        precise_batches: training batches precise BN averages over (Wu & Johnson use ~200;
            100 batches of 2 already pool 200 examples per channel).
        renorm_warmup: batch renorm's steps of plain BN before its limits ramp up.
        renorm_ramp: steps over which r_max ramps 1 -> 3 and d_max 0 -> 5.
        ghost_batch: virtual batch size of ghost BN (non-i.i.d. regime).
        n_test: held-out digits.
        min_effect: smallest accuracy difference (fraction) that counts as an effect.
    """

    small_batches: list[int] = field(default_factory=lambda: [2, 4])
    small_steps: int = 400
    small_lr: float = 0.01
    noniid_batch: int = 32
    classes_per_batch: int = 2
    noniid_steps: int = 200
    noniid_lr: float = 0.02
    width: int = 128
    depth: int = 2
    precise_batches: int = 100
    renorm_warmup: int = 50
    renorm_ramp: int = 100
    ghost_batch: int = 8
    n_test: int = 500
    min_effect: float = 0.02


def class_ordered(
    y: Tensor, batch_size: int, classes_per_batch: int, generator: torch.Generator
) -> Tensor:
    """An order of ``y``'s indices whose consecutive whole batches each hold only
    ``classes_per_batch`` classes (classes grouped at random; leftovers dropped)."""
    classes = torch.unique(y)[torch.randperm(len(torch.unique(y)), generator=generator)]
    order: list[Tensor] = []
    for start in range(0, len(classes), classes_per_batch):
        group = classes[start : start + classes_per_batch]
        members = torch.cat([torch.nonzero(y == c).flatten() for c in group])
        members = members[torch.randperm(len(members), generator=generator)]
        whole = len(members) // batch_size * batch_size
        order.append(members[:whole])
    return torch.cat(order)


def _iid_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        yield torch.randint(n, (batch_size,), generator=generator)


class TrainInferenceGap(Experiment):
    """Train-mode vs eval-mode accuracy of BN at small and non-i.i.d. batches, and the fixes.

    Metrics: (``{r}``: ``small_b{B}`` for each small batch size B, and ``noniid``)
    ``eval_acc/{r}/{v}`` (eval-mode test accuracy; ``{v}`` in bn, precise, renorm, and
    no_bessel for small, ghost and bn_iid for noniid), ``train_mode_acc/{r}/{v}`` (bn, renorm,
    ghost: test batches in train mode), ``gap/{r}/bn`` (train-mode minus eval-mode accuracy),
    ``recovered/{r}/{fix}`` (fix's eval-mode accuracy minus BN's), ``output_gap/{r}/bn``
    (relative output difference between the modes).
    Tables: ``accuracy`` (one row per regime and variant).
    """

    name: ClassVar[str] = "train-inference-gap"
    claim: ClassVar[str] = "C13"
    title: ClassVar[str] = "BN's train/inference discrepancy at small or non-i.i.d. batches"
    literature: ClassVar[str] = (
        "Ioffe 2017 (batch renorm fixes small and non-i.i.d. batches); Wu & Johnson 2021 "
        "(precise BN: recomputed population statistics); Summers & Dinneen 2019. Robust."
    )
    config_class: ClassVar[type] = TrainInferenceGapConfig

    def quick_config(self, config: TrainInferenceGapConfig) -> TrainInferenceGapConfig:
        config.small_batches = [2]
        config.small_steps = 150
        config.noniid_steps = 80
        config.width = 64
        config.precise_batches = 30
        config.n_test = 300
        config.renorm_warmup = 20
        config.renorm_ramp = 40
        return config

    def _norm(self, kind: str, config: TrainInferenceGapConfig) -> NormFactory:
        if kind == "renorm":
            return lambda c: BatchRenorm1d(
                c, warmup_steps=config.renorm_warmup, r_max_ramp_steps=config.renorm_ramp,
                d_max_ramp_steps=config.renorm_ramp,
            )
        if kind == "ghost":
            return lambda c: GhostBatchNorm1d(c, virtual_batch_size=config.ghost_batch)
        return nnl.BatchNorm1d

    def _model(self, kind: str, config: TrainInferenceGapConfig) -> MLP:
        return MLP(64, [config.width] * config.depth, 10, self._norm(kind, config))

    def run(self, config: TrainInferenceGapConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        x_train, y_train, x_test, y_test = data
        result = RunResult()
        rows: list[dict[str, object]] = []

        def record(regime: str, variant: str, model: nn.Module, x: Tensor, y: Tensor,
                   batch: int, train_mode: bool) -> float:
            gap = train_eval_gap(model, x, y, batch_size=batch)
            result.metrics[f"eval_acc/{regime}/{variant}"] = gap.eval_accuracy
            row: dict[str, object] = {"regime": regime, "variant": variant,
                                      "eval_acc": gap.eval_accuracy}
            if train_mode:
                result.metrics[f"train_mode_acc/{regime}/{variant}"] = gap.train_accuracy
                row["train_mode_acc"] = gap.train_accuracy
                if variant == "bn":
                    result.metrics[f"gap/{regime}/bn"] = gap.accuracy_gap
                    result.metrics[f"output_gap/{regime}/bn"] = gap.output_gap
            rows.append(row)
            return gap.eval_accuracy

        def recalibrated(model: nn.Module, batches: Iterator[Tensor]) -> nn.Module:
            net = copy.deepcopy(model)
            precise_bn(net, (x_train[idx] for idx in batches), config.precise_batches)
            return net

        # Small i.i.d. batches.
        for b in config.small_batches:
            regime = f"small_b{b}"
            accs: dict[str, float] = {}
            for kind in ("bn", "renorm"):
                gen = seeded(seed)
                model = self._model(kind, config)
                train_classifier(
                    model, data, steps=config.small_steps, lr=config.small_lr, momentum=0.9,
                    batch_size=b, generator=gen, eval_every=config.small_steps,
                )
                accs[kind] = record(regime, kind, model, x_test, y_test, b, True)
                if kind == "bn":
                    no_bessel = copy.deepcopy(model)
                    for m in no_bessel.modules():
                        if isinstance(m, nnl.BatchNorm1d):
                            m.running_var.mul_((b - 1) / b)
                    accs["no_bessel"] = record(regime, "no_bessel", no_bessel, x_test, y_test,
                                               b, False)
                    calib_gen = torch.Generator().manual_seed(seed + 1)
                    precise = recalibrated(model, _iid_batches(len(x_train), b, calib_gen))
                    accs["precise"] = record(regime, "precise", precise, x_test, y_test, b,
                                             False)
            for fix in SMALL_FIXES:
                result.metrics[f"recovered/{regime}/{fix}"] = accs[fix] - accs["bn"]

        # Non-i.i.d. batches: the test set arranged in batches of the same kind.
        order = class_ordered(
            y_test, config.noniid_batch, config.classes_per_batch,
            torch.Generator().manual_seed(seed + 2),
        )
        x_eval, y_eval = x_test[order], y_test[order]
        accs = {}
        for kind in ("bn", "renorm", "ghost", "bn_iid"):
            gen = seeded(seed)
            model = self._model("bn" if kind == "bn_iid" else kind, config)
            if kind == "bn_iid":
                batches: Iterator[Tensor] = itertools.islice(
                    _iid_batches(len(x_train), config.noniid_batch, gen), config.noniid_steps
                )
            else:
                batches = class_batches(
                    y_train, config.noniid_batch, config.classes_per_batch, config.noniid_steps,
                    gen,
                )
            train_on_batches(model, x_train, y_train, batches, lr=config.noniid_lr,
                             momentum=0.9)
            accs[kind] = record("noniid", kind, model, x_eval, y_eval, config.noniid_batch,
                                kind != "bn_iid")
            if kind == "bn":
                calib_gen = torch.Generator().manual_seed(seed + 1)
                precise = recalibrated(model, class_batches(
                    y_train, config.noniid_batch, config.classes_per_batch,
                    config.precise_batches, calib_gen,
                ))
                accs["precise"] = record("noniid", "precise", precise, x_eval, y_eval,
                                         config.noniid_batch, False)
        for fix in NONIID_FIXES:
            result.metrics[f"recovered/noniid/{fix}"] = accs[fix] - accs["bn"]
        result.tables["accuracy"] = rows
        return result

    def _regimes(self, config: TrainInferenceGapConfig) -> list[str]:
        return [f"small_b{b}" for b in config.small_batches] + ["noniid"]

    def verdict(self, config: TrainInferenceGapConfig, results: Sequence[RunResult]) -> Verdict:
        n = len(results)
        regimes = self._regimes(config)
        # Headline: batch renorm (the fix the literature reports for both regimes): its eval-mode
        # accuracy minus plain BN's, averaged over the regimes.
        fixed = [
            float(np.mean([r.metrics[f"eval_acc/{g}/renorm"] for g in regimes])) for r in results
        ]
        plain = [
            float(np.mean([r.metrics[f"eval_acc/{g}/bn"] for g in regimes])) for r in results
        ]
        status, effect, spread = compare(
            fixed, plain, higher_is_better=True, min_effect=config.min_effect
        )
        parts = []
        for regime in regimes:
            fixes = SMALL_FIXES if regime.startswith("small") else NONIID_FIXES
            gap = metric_values(results, f"gap/{regime}/bn")
            fix_texts = []
            for fix in fixes:
                s, e, sd = compare(
                    metric_values(results, f"eval_acc/{regime}/{fix}"),
                    metric_values(results, f"eval_acc/{regime}/bn"),
                    higher_is_better=True, min_effect=config.min_effect,
                )
                fix_texts.append(f"{fix} {100 * e:+.1f} ±{100 * sd:.1f} ({s})")
            base = np.mean(metric_values(results, f"eval_acc/{regime}/bn"))
            out_gap = np.mean(metric_values(results, f"output_gap/{regime}/bn"))
            parts.append(
                f"{regime}: BN eval-mode accuracy {100 * base:.1f}%, train-mode minus eval-mode "
                f"{100 * np.mean(gap):+.1f} points (relative output gap {out_gap:.2f}); "
                "recovered by: " + ", ".join(fix_texts)
            )
        iid = np.mean(metric_values(results, "eval_acc/noniid/bn_iid"))
        summary = (
            "Batch renorm recovered "
            f"{summarize(100 * effect, 100 * spread, n, 'points', '.1f')} of eval-mode "
            "accuracy over plain BN, mean over regimes. "
            + "; ".join(parts)
            + f" (BN trained on i.i.d. batches: {100 * iid:.1f}%)."
        )
        return Verdict(
            status, 100 * effect, 100 * spread, "accuracy points recovered", summary,
            agrees(status, "supported"),
        )

    def plot(
        self, config: TrainInferenceGapConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        regimes = self._regimes(config)
        fig, axes = new_figure(len(regimes), width=4.2)
        for ax, regime in zip(axes, regimes):
            variants = ["bn", *(SMALL_FIXES if regime.startswith("small") else
                                (*NONIID_FIXES, "bn_iid"))]
            xs = np.arange(len(variants))
            ev = np.array([[r.metrics[f"eval_acc/{regime}/{v}"] for v in variants]
                           for r in results])
            ax.bar(xs - 0.2, ev.mean(0), 0.4, yerr=ev.std(0) if len(results) > 1 else None,
                   label="eval mode (running stats)", capsize=3)
            tm = [v for v in variants if f"train_mode_acc/{regime}/{v}" in results[0].metrics]
            tv = np.array([[r.metrics[f"train_mode_acc/{regime}/{v}"] for v in tm]
                           for r in results])
            ax.bar([variants.index(v) + 0.2 for v in tm], tv.mean(0), 0.4,
                   yerr=tv.std(0) if len(results) > 1 else None,
                   label="train mode (batch stats)", capsize=3)
            ax.set_xticks(xs, [LABELS[v] for v in variants], rotation=30, ha="right",
                          fontsize=7)
            ax.set(ylabel="test accuracy", ylim=(0, 1))
            ax.set_title(f"C13: {regime} ({seeds_label(len(results))})")
            ax.legend(fontsize=7, loc="lower left")
        return [save_figure(fig, out_dir, "c13_train_inference_gap")]
