"""C10: batch norm couples the samples of a batch (by definition; the size is worth measuring).

An MLP with a norm after each hidden linear layer is trained briefly on digits. Then a probe
example is put into two batches that share only the probe (the other ``B - 1`` examples are two
independent random draws), and we measure how much the probe's output changes between the two:
the relative change ``||f(x|A) - f(x|B)|| / ||f(x|A)||`` and how often its predicted class flips.

BN in training mode normalizes with the batch's own statistics, so the probe's output depends on
its batch-mates (less so as B grows: the statistics' noise shrinks about as 1/sqrt(B)). BN in
eval mode, LN and GN use no batch statistics: their change is exactly 0 (up to matmul rounding).
Probing happens on a copy of each model, so running statistics are never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

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

__all__ = ["BatchCoupling", "BatchCouplingConfig", "probe_coupling"]

VARIANTS = ("bn_train", "bn_eval", "ln", "gn")
LABELS = {
    "bn_train": "BatchNorm1d, train mode",
    "bn_eval": "BatchNorm1d, eval mode",
    "ln": "LayerNorm",
    "gn": "GroupNorm (4 groups)",
}


@dataclass
class BatchCouplingConfig:
    """Config of C10.

    Attributes:
        batch_sizes: batch sizes B at which coupling is probed.
        headline_batch: the B of the headline number.
        n_probes: probe examples per batch size (each in two batches).
        train_steps: SGD steps of the brief training before probing.
        lr: SGD learning rate of the brief training.
        train_batch: batch size of the brief training.
        widths: hidden widths of the ReLU MLP.
        n_test: held-out digits (the probes come from them).
        min_effect: smallest relative output change (BN train minus LN) that counts.
    """

    batch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128])
    headline_batch: int = 32
    n_probes: int = 20
    train_steps: int = 150
    lr: float = 0.1
    train_batch: int = 32
    widths: list[int] = field(default_factory=lambda: [64, 64])
    n_test: int = 500
    min_effect: float = 0.01


@torch.no_grad()
def probe_coupling(
    model: nn.Module,
    pool: torch.Tensor,
    probes: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    train_mode: bool,
) -> tuple[float, float]:
    """Mean relative output change and class-flip rate of each probe across two batches.

    Args:
        model: the network; a deep copy is probed, so its buffers stay untouched.
        pool: examples to draw batch-mates from.
        probes: the probe examples, one row each.
        batch_size: B, the probe included.
        generator: draws the batch-mates.
        train_mode: probe in training mode (batch statistics) or eval mode.

    Returns:
        ``(relative change, flip rate)`` averaged over the probes.
    """
    probe_model = copy.deepcopy(model).train(train_mode)
    changes, flips = [], []
    for x in probes:
        outs = []
        for _ in range(2):
            mates = pool[torch.randint(len(pool), (batch_size - 1,), generator=generator)]
            outs.append(probe_model(torch.cat([x[None], mates]))[0])
        a, b = outs
        changes.append(((a - b).norm() / a.norm().clamp_min(1e-12)).item())
        flips.append(float(a.argmax() != b.argmax()))
    return float(np.mean(changes)), float(np.mean(flips))


class BatchCoupling(Experiment):
    """Change of one sample's output when the rest of its batch is replaced, by batch size.

    Metrics: ``coupling/{variant}/B={B}`` (relative output change) and
    ``flip_rate/{variant}/B={B}`` for variant in bn_train, bn_eval, ln, gn; ``coupling/{variant}``
    at ``headline_batch``; ``final_acc/{bn,ln,gn}`` of the briefly trained models.
    Curves: ``coupling/{variant}`` and ``flip_rate/{variant}`` over ``batch_sizes``.
    """

    name: ClassVar[str] = "batch-coupling"
    claim: ClassVar[str] = "C10"
    title: ClassVar[str] = "Batch norm couples the samples of a batch"
    literature: ClassVar[str] = (
        "By construction: BN's training-mode output for one example depends on its batch-mates "
        "through the batch mean and variance; LN, GN and BN in eval mode do not."
    )
    config_class: ClassVar[type] = BatchCouplingConfig

    def quick_config(self, config: BatchCouplingConfig) -> BatchCouplingConfig:
        config.batch_sizes = [2, 8, 32]
        config.n_probes = 10
        config.train_steps = 40
        config.headline_batch = 8
        return config

    def run(self, config: BatchCouplingConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        x_train, _, x_test, _ = data
        result = RunResult()
        models: dict[str, nn.Module] = {}
        for kind in ("bn", "ln", "gn"):
            gen = seeded(seed)
            model = MLP(64, config.widths, 10, norm_factory(kind), act="relu")
            curves = train_classifier(
                model,
                data,
                steps=config.train_steps,
                lr=config.lr,
                batch_size=config.train_batch,
                generator=gen,
                eval_every=config.train_steps,
            )
            result.metrics[f"final_acc/{kind}"] = curves.final_acc
            models[kind] = model
        setups = {
            "bn_train": (models["bn"], True),
            "bn_eval": (models["bn"], False),
            "ln": (models["ln"], True),
            "gn": (models["gn"], True),
        }
        for variant, (model, train_mode) in setups.items():
            gen = torch.Generator().manual_seed(20_000 + seed)
            probes = x_test[torch.randperm(len(x_test), generator=gen)[: config.n_probes]]
            coupling, flip = [], []
            for batch in config.batch_sizes:
                change, rate = probe_coupling(model, x_train, probes, batch, gen, train_mode)
                result.metrics[f"coupling/{variant}/B={batch}"] = change
                result.metrics[f"flip_rate/{variant}/B={batch}"] = rate
                coupling.append(change)
                flip.append(rate)
            result.curves[f"coupling/{variant}"] = coupling
            result.curves[f"flip_rate/{variant}"] = flip
            if config.headline_batch in config.batch_sizes:
                headline = coupling[config.batch_sizes.index(config.headline_batch)]
            else:
                headline = probe_coupling(
                    model, x_train, probes, config.headline_batch, gen, train_mode
                )[0]
            result.metrics[f"coupling/{variant}"] = headline
        result.curves["batch_sizes"] = [float(b) for b in config.batch_sizes]
        return result

    def verdict(self, config: BatchCouplingConfig, results: Sequence[RunResult]) -> Verdict:
        bn = metric_values(results, "coupling/bn_train")
        ln = metric_values(results, "coupling/ln")
        status, effect, spread = compare(
            bn, ln, higher_is_better=True, min_effect=config.min_effect
        )
        smallest = min(config.batch_sizes)
        largest = max(config.batch_sizes)
        at = {
            b: float(np.mean(metric_values(results, f"coupling/bn_train/B={b}")))
            for b in (smallest, largest)
        }
        flips = float(np.mean(metric_values(results, f"flip_rate/bn_train/B={smallest}")))
        exact = max(
            max(metric_values(results, f"coupling/{v}/B={b}"))
            for v in ("bn_eval", "ln", "gn")
            for b in config.batch_sizes
        )
        summary = (
            f"Replacing its batch-mates changed a sample's BN (train mode) output by "
            f"{summarize(100 * effect, 100 * spread, len(results), '%', '.1f')} more than LN's "
            f"at B={config.headline_batch} ({100 * at[smallest]:.1f}% at B={smallest} with "
            f"{flips:.0%} class flips, {100 * at[largest]:.1f}% at B={largest}); BN eval, LN "
            f"and GN changed by at most {exact:.1e}."
        )
        return Verdict(
            status, effect, spread, "relative output change", summary, agrees(status, "supported")
        )

    def plot(
        self, config: BatchCouplingConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax_c, ax_f) = new_figure(2)
        batch_sizes = results[0].curves["batch_sizes"]
        floor = 1e-9  # exact zeros drawn at a visible floor on the log axis
        styles = dict(zip(VARIANTS, ("o-", "s--", "^:", "v-."), strict=True))
        for variant in VARIANTS:
            style = {"linestyle": styles[variant][1:], "marker": styles[variant][0]}
            runs = [np.maximum(r.curves[f"coupling/{variant}"], floor) for r in results]
            plot_band(ax_c, batch_sizes, runs, LABELS[variant], **style)
            flips = [r.curves[f"flip_rate/{variant}"] for r in results]
            plot_band(ax_f, batch_sizes, flips, LABELS[variant], **style)
        # The noise of batch statistics shrinks like 1/sqrt(B): a reference slope.
        first = float(np.mean([r.curves["coupling/bn_train"][0] for r in results]))
        reference = [first * (batch_sizes[0] / b) ** 0.5 for b in batch_sizes]
        ax_c.plot(batch_sizes, reference, color="gray", linestyle=":", label="∝ 1/√B")
        ax_c.set(
            xscale="log",
            yscale="log",
            xlabel="batch size B",
            ylabel="relative output change of one sample",
        )
        ax_c.set_title(f"C10: batch coupling (0 shown at {floor:g}; {n_seeds(len(results))})")
        ax_f.set(xscale="log", xlabel="batch size B", ylabel="fraction of predicted class flips")
        ax_f.set_title("class flips when batch-mates change")
        ax_c.legend(fontsize="small")
        ax_f.legend(fontsize="small")
        return [save_figure(fig, out_dir, "c10_batch_coupling")]
