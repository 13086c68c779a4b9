"""C6: normalization improves gradient flow and makes deeper plain networks trainable.

Plain (non-residual) ReLU MLPs of increasing depth, with torch's default initialization, are
trained on digits with SGD from the same seed, without normalization and with batch norm, layer
norm and group norm after every hidden linear layer. Two measurements:

* gradient flow: the norm of each linear layer's weight gradient on a fixed training batch, at
  initialization and after training, for the deepest net (REFERENCE §3: per-layer gradient norm
  and the ratio of first to last layer; measured on a copy, so running statistics are untouched);
* trainability: the test accuracy after ``steps`` steps at each depth; the deepest trainable depth
  is the largest depth ``d`` such that every tested depth up to ``d`` reaches ``threshold``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

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
    steps_to_target,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare
from normlab.lab.experiments._shared import seeds_label

__all__ = ["GradientFlowDepth", "GradientFlowDepthConfig", "layer_gradient_norms"]

NORMS = ("none", "bn", "ln", "gn")
LABELS = {"none": "no normalization", "bn": "BatchNorm1d", "ln": "LayerNorm", "gn": "GroupNorm(4)"}


@dataclass
class GradientFlowDepthConfig:
    """Config of C6.

    Attributes:
        depths: numbers of hidden layers tried (plain MLP, no residual connections).
        width: units per hidden layer.
        steps: SGD steps per (norm, depth).
        lr: SGD learning rate (momentum 0.9).
        batch_size: examples per step.
        threshold: test accuracy that counts as "trainable" within ``steps``.
        eval_every: evaluation period in steps.
        grad_batch: training examples in the fixed batch of the gradient-norm measurement.
        n_test: held-out digits.
        min_effect: smallest gain in log2(deepest trainable depth) that counts as an effect
            (1 = twice as deep).
    """

    depths: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    width: int = 32
    steps: int = 60
    lr: float = 0.05
    batch_size: int = 64
    threshold: float = 0.5
    eval_every: int = 30
    grad_batch: int = 128
    n_test: int = 500
    min_effect: float = 0.5


def layer_gradient_norms(model: MLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The norm of every linear layer's weight gradient (input to output) on ``(x, y)``.

    Runs on a deep copy in train mode, so the model's gradients and running statistics are
    untouched.
    """
    net = copy.deepcopy(model)
    net.train()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    return [float(layer.weight.grad.norm()) for layer in net.linears()]


def _log2_depth(depth: int, depths: Sequence[int]) -> float:
    """log2 of the deepest trainable depth; one halving below the shallowest when none trains."""
    return math.log2(depth) if depth > 0 else math.log2(min(depths)) - 1.0


class GradientFlowDepth(Experiment):
    """Per-layer gradient norms and the deepest trainable depth of plain MLPs, per norm.

    Metrics: (``{norm}`` in none, bn, ln, gn) ``acc/{norm}/d{depth}`` (test accuracy after
    ``steps``), ``steps_to_threshold/{norm}/d{depth}`` (censored at ``steps``),
    ``max_trainable_depth/{norm}`` (0 when even the shallowest fails),
    ``log2_max_depth/{norm}`` (one below log2 of the shallowest depth when none trains),
    ``grad_ratio_init/{norm}`` and ``grad_ratio_trained/{norm}``: log10 of first-layer over
    last-layer gradient norm of the deepest net (0 = even flow, negative = vanishing towards the
    input).
    Curves: ``grad_init/{norm}``, ``grad_trained/{norm}`` (gradient norm per linear layer of the
    deepest net), ``acc_by_depth/{norm}``, ``depths``.
    """

    name: ClassVar[str] = "gradient-flow-depth"
    claim: ClassVar[str] = "C6"
    title: ClassVar[str] = "Normalization improves gradient flow and enables deeper networks"
    literature: ClassVar[str] = (
        "Ioffe & Szegedy 2015; Santurkar et al. 2018 (smoother landscape); De & Smith 2020. "
        "Robust in direction (normalized deep plain nets train where unnormalized ones do not); "
        "the mechanism is debated."
    )
    config_class: ClassVar[type] = GradientFlowDepthConfig

    def quick_config(self, config: GradientFlowDepthConfig) -> GradientFlowDepthConfig:
        config.depths = [2, 10]
        config.steps = 40
        config.eval_every = 20
        config.width = 32
        config.lr = 0.05
        config.grad_batch = 64
        return config

    def run(self, config: GradientFlowDepthConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        x_grad, y_grad = data[0][: config.grad_batch], data[1][: config.grad_batch]
        deepest = max(config.depths)
        result = RunResult()
        result.curves["depths"] = [float(d) for d in config.depths]
        for norm in NORMS:
            accs: list[float] = []
            for depth in sorted(config.depths):
                gen = seeded(seed)
                model = MLP(64, [config.width] * depth, 10, norm_factory(norm))
                if depth == deepest:
                    result.curves[f"grad_init/{norm}"] = layer_gradient_norms(
                        model, x_grad, y_grad
                    )
                curves = train_classifier(
                    model, data, steps=config.steps, lr=config.lr, momentum=0.9,
                    batch_size=config.batch_size, generator=gen, eval_every=config.eval_every,
                )
                if depth == deepest:
                    result.curves[f"grad_trained/{norm}"] = layer_gradient_norms(
                        model, x_grad, y_grad
                    )
                acc = curves.final_acc
                accs.append(acc)
                result.metrics[f"acc/{norm}/d{depth}"] = acc
                result.metrics[f"steps_to_threshold/{norm}/d{depth}"] = float(
                    steps_to_target(curves.steps, curves.test_acc, config.threshold, config.steps)
                )
            best = 0
            for depth, acc in zip(sorted(config.depths), accs):
                if not acc >= config.threshold:
                    break
                best = depth
            result.metrics[f"max_trainable_depth/{norm}"] = float(best)
            result.metrics[f"log2_max_depth/{norm}"] = _log2_depth(best, config.depths)
            result.curves[f"acc_by_depth/{norm}"] = accs
            for when in ("init", "trained"):
                norms = result.curves[f"grad_{when}/{norm}"]
                ratio = norms[0] / norms[-1] if norms[-1] > 0 else math.inf
                result.metrics[f"grad_ratio_{when}/{norm}"] = (
                    math.log10(ratio) if 0 < ratio < math.inf else (-30.0 if ratio == 0 else 30.0)
                )
        return result

    def verdict(self, config: GradientFlowDepthConfig, results: Sequence[RunResult]) -> Verdict:
        none = metric_values(results, "log2_max_depth/none")
        bn = metric_values(results, "log2_max_depth/bn")
        status, effect, spread = compare(
            bn, none, higher_is_better=True, min_effect=config.min_effect
        )
        n = len(results)

        def depth_text(norm: str) -> str:
            values = metric_values(results, f"max_trainable_depth/{norm}")
            return f"{LABELS[norm]} {np.median(values):.0f}"

        others = []
        for norm in ("ln", "gn"):
            s, e, _ = compare(
                metric_values(results, f"log2_max_depth/{norm}"), none,
                higher_is_better=True, min_effect=config.min_effect,
            )
            others.append(f"{LABELS[norm]} vs none: {e:+.1f} doublings ({s})")
        flow = ", ".join(
            f"{norm} {np.mean(metric_values(results, f'grad_ratio_init/{norm}')):+.1f}"
            for norm in NORMS
        )
        summary = (
            f"BN made the deepest trainable plain MLP "
            f"{summarize(effect, spread, n, 'doublings deeper', '.1f')} than no normalization "
            f"(median deepest trainable depth of {sorted(config.depths)}, accuracy >= "
            f"{config.threshold:.0%} after {config.steps} steps: "
            + ", ".join(depth_text(norm) for norm in NORMS)
            + "); "
            + "; ".join(others)
            + f". log10(first/last layer gradient norm) at init, depth {max(config.depths)}: "
            + flow
            + "."
        )
        return Verdict(
            status, effect, spread, "doublings of depth", summary, agrees(status, "supported")
        )

    def plot(
        self, config: GradientFlowDepthConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax_init, ax_trained, ax_depth) = new_figure(3, width=4.6)
        deepest = max(config.depths)
        for norm in NORMS:
            for ax, when in ((ax_init, "init"), (ax_trained, "trained")):
                runs = [np.log10(np.maximum(r.curves[f"grad_{when}/{norm}"], 1e-30))
                        for r in results]
                plot_band(ax, list(range(1, len(runs[0]) + 1)), runs, LABELS[norm])
            plot_band(
                ax_depth, results[0].curves["depths"],
                [r.curves[f"acc_by_depth/{norm}"] for r in results], LABELS[norm],
            )
        ax_init.set(xlabel="linear layer (input -> output)", ylabel="log10 ||dL/dW||")
        ax_init.set_title(f"C6: gradient norms at init, depth {deepest}")
        ax_trained.set(xlabel="linear layer (input -> output)", ylabel="log10 ||dL/dW||")
        ax_trained.set_title(f"after {config.steps} SGD steps")
        ax_depth.axhline(config.threshold, color="gray", linestyle=":", label="threshold")
        ax_depth.set(xlabel="hidden layers", ylabel="test accuracy", ylim=(0, 1))
        ax_depth.set_xscale("log", base=2)
        ax_depth.set_xticks(config.depths, [str(d) for d in config.depths])
        ax_depth.minorticks_off()
        ax_depth.set_title(f"trainability ({seeds_label(len(results))})")
        for ax in (ax_init, ax_trained, ax_depth):
            ax.legend(fontsize=8)
        return [save_figure(fig, out_dir, "c06_gradient_flow_depth")]
