"""C2: proper initialization avoids vanishing and exploding signals (Glorot 2010; He 2015; LSUV).

A plain (no norm, no residual) ReLU MLP ``depth`` layers deep is initialized by each scheme and
probed on one batch of digits: the standard deviation of every hidden layer's activations
(forward signal) and of every weight gradient of the cross-entropy (backward signal). Then each
initialization is trained briefly to see whether the net is trainable at all.

Schemes: ``small`` and ``large`` are naive i.i.d. normal weights of a fixed std (0.01 and 1);
``xavier``, ``kaiming``, ``lecun`` and ``orthogonal`` come from :func:`normlab.init.initialize`
(each layer's gain inferred from the ReLU that follows it; LeCun always uses gain 1); ``lsuv`` is
:func:`normlab.init.lsuv` on a training batch. The headline compares how many decades the
activation std drifts between the first and the last hidden layer for the variance-preserving
schemes against the naive ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from normlab import init as nl_init
from normlab.lab.common import (
    MLP,
    agrees,
    load_digits,
    metric_values,
    n_seeds,
    new_figure,
    save_figure,
    seeded,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare

__all__ = ["Initialization", "InitializationConfig", "initialize_scheme", "signal_stats"]

NAIVE_STD = {"small": 0.01, "large": 1.0}
LABELS = {
    "small": "naive N(0, 0.01²)",
    "large": "naive N(0, 1)",
    "xavier": "Xavier (ReLU gain)",
    "kaiming": "Kaiming/He",
    "lecun": "LeCun (gain 1)",
    "orthogonal": "orthogonal (ReLU gain)",
    "lsuv": "LSUV",
}


@dataclass
class InitializationConfig:
    """Config of C2.

    Attributes:
        schemes: schemes to compare (see the module docstring).
        proper: the variance-preserving schemes for a ReLU net (the treatment).
        naive: the naive schemes (the control).
        depth: hidden layers of the plain MLP.
        width: units per hidden layer.
        probe_batch: training digits in the probe batch (also LSUV's batch).
        train_steps: SGD steps of the trainability check.
        lr: SGD learning rate of the trainability check.
        momentum: SGD momentum.
        batch_size: examples per step.
        n_test: held-out digits.
        min_effect: smallest reduction of the activation-std drift, in decades, that counts.
    """

    schemes: list[str] = field(
        default_factory=lambda: [
            "small",
            "large",
            "xavier",
            "kaiming",
            "lecun",
            "orthogonal",
            "lsuv",
        ]
    )
    proper: list[str] = field(default_factory=lambda: ["xavier", "kaiming", "orthogonal", "lsuv"])
    naive: list[str] = field(default_factory=lambda: ["small", "large"])
    depth: int = 30
    width: int = 64
    probe_batch: int = 256
    train_steps: int = 150
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    n_test: int = 500
    min_effect: float = 1.0


def initialize_scheme(
    model: MLP, scheme: str, batch: torch.Tensor, generator: torch.Generator
) -> None:
    """Initialize `model` in place with `scheme` (naive, a normlab.init scheme, or LSUV)."""
    if scheme in NAIVE_STD:
        with torch.no_grad():
            for layer in model.linears():
                layer.weight.normal_(0.0, NAIVE_STD[scheme], generator=generator)
                layer.bias.zero_()
    elif scheme == "lsuv":
        nl_init.lsuv(model, batch, generator=generator)
    else:
        nl_init.initialize(model, scheme, generator=generator)


def _safe_log10(value: float) -> float:
    # Vanished or overflowed signals stay finite: clamp to the float32 range.
    if not math.isfinite(value):
        return 38.0
    return math.log10(min(max(value, 1e-38), 1e38))


def signal_stats(
    model: MLP, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[float], list[float], list[float]]:
    """Per-layer signal statistics of the cross-entropy on ``(x, y)``.

    Returns:
        ``(act_std, delta_std, grad_std)``: per hidden layer the std of its activations (forward
        signal) and of the loss gradient with respect to them (backward signal), and per linear
        layer the std of its weight gradient. The model (no norm layers, so no buffers) is probed
        in place; its gradients are cleared afterwards.
    """
    acts: list[torch.Tensor] = []
    deltas: dict[int, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        index = len(acts)
        acts.append(out.detach())
        out.register_hook(lambda grad: deltas.__setitem__(index, grad.detach()))

    hooks = [m.register_forward_hook(keep) for m in model if isinstance(m, nn.ReLU)]
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    loss.backward()
    act_std = [a.std().item() for a in acts]
    delta_std = [deltas[i].std().item() for i in range(len(acts))]
    grad_std = [layer.weight.grad.std().item() for layer in model.linears()]
    model.zero_grad(set_to_none=True)
    return act_std, delta_std, grad_std


class Initialization(Experiment):
    """Per-layer activation and gradient std through a deep plain ReLU net, and trainability.

    Metrics: ``log10_act_drift/{scheme}`` (|log10(std last hidden / std first hidden)|),
    ``log10_delta_drift/{scheme}`` (the same for the gradient w.r.t. the activations),
    ``log10_grad_ratio/{scheme}`` (log10(weight-grad std first layer / last layer)),
    ``acc/{scheme}`` (test accuracy after ``train_steps``), ``diverged/{scheme}`` (0/1).
    Curves: ``act_std/{scheme}``, ``delta_std/{scheme}`` per hidden layer, ``grad_std/{scheme}``
    per linear layer.
    Tables: ``layers``: one row per (scheme, layer) with ``act_std``, ``delta_std``, ``grad_std``.
    """

    name: ClassVar[str] = "initialization"
    claim: ClassVar[str] = "C2"
    title: ClassVar[str] = "Proper initialization avoids vanishing/exploding signals"
    literature: ClassVar[str] = (
        "Glorot & Bengio 2010; He et al. 2015 (a 30-layer plain ReLU net trains with their init, "
        "stalls with Xavier's gain-1 scaling); Mishkin & Matas 2016 (LSUV, CIFAR-10 94.2%). "
        "Robust."
    )
    config_class: ClassVar[type] = InitializationConfig

    def quick_config(self, config: InitializationConfig) -> InitializationConfig:
        config.depth = 12
        config.width = 32
        config.train_steps = 25
        config.probe_batch = 64
        return config

    def run(self, config: InitializationConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        x_train, y_train, _, _ = data
        probe_idx = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(50_000 + seed)
        )[: config.probe_batch]
        x_probe, y_probe = x_train[probe_idx], y_train[probe_idx]
        result = RunResult()
        rows: list[dict[str, float | str | int]] = []
        for scheme in config.schemes:
            gen = seeded(seed)
            model = MLP(64, [config.width] * config.depth, 10, None, act="relu")
            initialize_scheme(model, scheme, x_probe, torch.Generator().manual_seed(seed))
            act_std, delta_std, grad_std = signal_stats(model, x_probe, y_probe)
            padded = zip([*act_std, math.nan], [*delta_std, math.nan], grad_std, strict=True)
            for layer, (a, d, g) in enumerate(padded):
                rows.append(
                    {
                        "scheme": scheme,
                        "layer": layer + 1,
                        "act_std": a,
                        "delta_std": d,
                        "grad_std": g,
                    }
                )
            drift = abs(_safe_log10(act_std[-1]) - _safe_log10(act_std[0]))
            result.metrics[f"log10_act_drift/{scheme}"] = drift
            result.metrics[f"log10_delta_drift/{scheme}"] = abs(
                _safe_log10(delta_std[0]) - _safe_log10(delta_std[-1])
            )
            result.metrics[f"log10_grad_ratio/{scheme}"] = _safe_log10(grad_std[0]) - _safe_log10(
                grad_std[-1]
            )
            result.curves[f"act_std/{scheme}"] = act_std
            result.curves[f"delta_std/{scheme}"] = delta_std
            result.curves[f"grad_std/{scheme}"] = grad_std
            curves = train_classifier(
                model,
                data,
                steps=config.train_steps,
                lr=config.lr,
                batch_size=config.batch_size,
                generator=gen,
                eval_every=config.train_steps,
                momentum=config.momentum,
            )
            result.metrics[f"acc/{scheme}"] = curves.final_acc
            result.metrics[f"diverged/{scheme}"] = float(curves.diverged)
        result.tables["layers"] = rows
        return result

    def verdict(self, config: InitializationConfig, results: Sequence[RunResult]) -> Verdict:
        def mean_over(schemes: list[str], key: str) -> list[float]:
            return [float(np.mean([r.metrics[f"{key}/{s}"] for s in schemes])) for r in results]

        proper = mean_over(config.proper, "log10_act_drift")
        naive = mean_over(config.naive, "log10_act_drift")
        status, effect, spread = compare(
            proper, naive, higher_is_better=False, min_effect=config.min_effect
        )
        acc = {s: float(np.mean(metric_values(results, f"acc/{s}"))) for s in config.schemes}
        drift = {
            s: float(np.mean(metric_values(results, f"log10_act_drift/{s}")))
            for s in config.schemes
        }
        summary = (
            f"Through {config.depth} plain ReLU layers the activation std drifted "
            f"{np.mean(proper):.1f} decades with variance-preserving inits "
            f"({', '.join(config.proper)}) vs {np.mean(naive):.1f} with naive ones: "
            f"{summarize(effect, spread, len(results), 'decades less', '.1f')}; test accuracy "
            f"after {config.train_steps} steps: "
            + ", ".join(f"{s} {100 * acc[s]:.0f}% ({drift[s]:.1f} dec)" for s in config.schemes)
            + "."
        )
        return Verdict(status, effect, spread, "decades", summary, agrees(status, "supported"))

    def plot(
        self, config: InitializationConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax_a, ax_g) = new_figure(2)
        for i, scheme in enumerate(config.schemes):
            color = f"C{i}"
            for ax, key in ((ax_a, "act_std"), (ax_g, "delta_std")):
                runs = np.asarray([r.curves[f"{key}/{scheme}"] for r in results], dtype=float)
                runs = np.clip(np.nan_to_num(runs, nan=1e38, posinf=1e38), 1e-38, 1e38)
                layers = np.arange(1, runs.shape[1] + 1)
                # Geometric mean over seeds, band = min..max.
                ax.plot(layers, np.exp(np.log(runs).mean(0)), color=color, label=LABELS[scheme])
                if len(results) > 1:
                    ax.fill_between(layers, runs.min(0), runs.max(0), color=color, alpha=0.2)
        ax_a.set(yscale="log", xlabel="hidden layer", ylabel="activation std (probe batch)")
        ax_a.set_title(f"C2: forward signal, {config.depth}-layer plain ReLU MLP")
        ax_g.set(yscale="log", xlabel="hidden layer", ylabel="std of dLoss/d(activation)")
        ax_g.set_title(f"backward signal ({n_seeds(len(results))}; 0 drawn at 1e-38)")
        ax_a.legend(fontsize="x-small")
        return [save_figure(fig, out_dir, "c02_initialization")]
