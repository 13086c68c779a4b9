"""C9: batch norm depends on the batch size; group norm and layer norm do not.

Wu & He 2018 vary the images per GPU: every GPU normalizes its own images, the gradient is that
of the whole batch. We emulate that axis in one process: a small CNN
(:class:`~normlab.lab.common.SmallCNN`) on 8x8 digit images trains with a fixed batch of
``batch`` examples split into devices of ``device_batch`` examples each, for the same number of
SGD steps at the same learning rate, so every variant sees the same data and the same
optimization and only the normalization statistics change:

* BN per device: :class:`~normlab.lab.experiments._shared.DeviceBatchNorm2d` (equal to ghost BN,
  :class:`normlab.nn.ghost.GhostBatchNorm2d`, with ``virtual_batch_size = device_batch``; that
  equality is tested), evaluated with its running statistics;
* batch renorm per device (Ioffe 2017), the same layer with ``renorm=True``;
* GN and LN (``GroupNorm(1, C)``, REFERENCE §4) normalize each sample on its own, so their
  computation is the same at every device batch: they are trained once and shown flat.

The headline is how much BN's test error grows from ``ref_batch`` to the smallest device batch.

Across real processes (``dist_processes`` gloo ranks via :func:`normlab.distributed.spawn`, each
with ``dist_batch`` examples per step, gradients averaged by one all-reduce per step): BN per
process, :class:`~normlab.nn.sync_batchnorm.SyncBatchNorm` (statistics over all ranks) and GN.
With ``dist_processes = 1`` (the quick config) the same worker runs in this process without a
process group, where SyncBatchNorm is plain BN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import normlab.nn as nnl
from normlab.distributed import all_reduce_sum, spawn
from normlab.lab.common import (
    NormFactory,
    SmallCNN,
    agrees,
    load_digits,
    metric_values,
    new_figure,
    norm_factory,
    plot_band,
    save_figure,
    seeded,
    summarize,
    train_classifier,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare
from normlab.lab.experiments._shared import (
    DeviceBatchNorm2d,
    accuracy,
    seeds_label,
    train_on_batches,
)
from normlab.nn.sync_batchnorm import SyncBatchNorm

__all__ = ["WU_HE_2018", "BatchSize", "BatchSizeConfig"]

DIST_VARIANTS = ("bn_local", "syncbn", "gn")
LABELS = {
    "bn": "BN per device (= ghost BN)",
    "gn": "GroupNorm(4)",
    "ln": "LayerNorm = GroupNorm(1)",
    "renorm": "batch renorm per device",
    "bn_local": "BN per process",
    "syncbn": "SyncBatchNorm",
}

WU_HE_2018: dict[str, dict[int, float]] = {
    "bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}
"""Wu & He 2018, Table 2: ResNet-50 ImageNet top-1 error (%) by images per GPU."""


@dataclass
class BatchSizeConfig:
    """Config of C9.

    Attributes:
        device_batches: examples per device (BN's statistics batch), swept.
        batch: examples per SGD step (all devices together); a multiple of every device batch.
        steps: SGD steps of every run.
        lr: SGD learning rate of every run (momentum 0.9).
        ref_batch: the device batch the headline compares the smallest one with.
        channels: output channels of the CNN's two convolutions.
        groups: groups of GN.
        renorm_warmup: fraction of the steps of plain BN before batch renorm's limits ramp.
        renorm_ramp: fraction of the steps over which r_max -> 3 and d_max -> 5.
        dist_processes: gloo processes of the cross-process comparison (1: in this process).
        dist_batch: examples per process per step there.
        n_test: held-out digits.
        min_effect: smallest growth of BN's error (fraction; 0.02 = 2 points) beyond GN's that
            counts as an effect.
    """

    device_batches: list[int] = field(default_factory=lambda: [2, 4, 8, 32])
    batch: int = 32
    steps: int = 150
    lr: float = 0.04
    ref_batch: int = 32
    channels: list[int] = field(default_factory=lambda: [16, 32])
    groups: int = 4
    renorm_warmup: float = 0.1
    renorm_ramp: float = 0.3
    dist_processes: int = 2
    dist_batch: int = 2
    n_test: int = 500
    min_effect: float = 0.02


def _norm(kind: str, config: BatchSizeConfig, device_batch: int) -> NormFactory:
    if kind in ("bn", "renorm"):
        warmup = int(config.renorm_warmup * config.steps)
        ramp = max(1, int(config.renorm_ramp * config.steps))
        return lambda c: DeviceBatchNorm2d(
            c, device_batch, renorm=kind == "renorm", warmup_steps=warmup, ramp_steps=ramp
        )
    if kind == "syncbn":
        return SyncBatchNorm
    if kind == "bn_local":
        return nnl.BatchNorm2d
    return norm_factory(kind, images=True, groups=config.groups)


def _ref(config: BatchSizeConfig) -> int:
    """The headline's reference device batch: ``ref_batch`` if swept, else the largest."""
    sizes = sorted(config.device_batches)
    return config.ref_batch if config.ref_batch in sizes else max(sizes)


def _average_gradients(model: nn.Module) -> None:
    """Average the gradients over the ranks of the default group (one flat all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum("c09 gradient average", flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def _dist_worker(
    rank: int, world: int, data: tuple[Tensor, ...], config: dict[str, Any], seed: int
) -> dict[str, float]:
    """One rank of the cross-process comparison: the test error of each variant."""
    cfg = BatchSizeConfig(**config)
    x_train, y_train, x_test, y_test = data
    steps, lr = cfg.steps, cfg.lr
    out: dict[str, float] = {}
    for variant in DIST_VARIANTS:
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = SmallCNN(_norm(variant, cfg, cfg.dist_batch), channels=tuple(cfg.channels))
        gen = torch.Generator().manual_seed(seed * 1009 + rank)
        batches = (
            torch.randint(len(x_train), (cfg.dist_batch,), generator=gen) for _ in range(steps)
        )
        train_on_batches(model, x_train, y_train, batches, lr=lr, momentum=0.9,
                         after_backward=_average_gradients)
        out[variant] = 1.0 - accuracy(model, x_test, y_test)
    return out


class BatchSize(Experiment):
    """Test error vs examples per device for BN, batch renorm, GN, LN; BN vs SyncBN vs GN.

    Metrics: ``test_error/{bn,renorm}/b{B}`` (eval mode, B examples per device),
    ``test_error/{gn,ln}`` (independent of B), ``degradation/{norm}`` (error at the smallest
    device batch minus error at ``ref_batch``; 0 for gn and ln by construction),
    ``dist_error/{v}`` (``{v}`` in bn_local, syncbn, gn: test error of the cross-process runs),
    ``dist_processes`` (how many processes those ran in).
    Curves: ``test_error/{norm}`` (by device batch), ``device_batches``.
    """

    name: ClassVar[str] = "batch-size"
    claim: ClassVar[str] = "C9"
    title: ClassVar[str] = "BN depends on the batch size; GN and LN do not"
    literature: ClassVar[str] = (
        "Wu & He 2018, Table 2 (ResNet-50, ImageNet top-1 error by images per GPU 32/16/8/4/2): "
        "BN 23.6/23.7/24.8/27.3/34.7, GN 24.1/24.2/24.0/24.2/24.1; batch renorm at 4: 26.3. "
        "Robust."
    )
    config_class: ClassVar[type] = BatchSizeConfig

    def quick_config(self, config: BatchSizeConfig) -> BatchSizeConfig:
        config.device_batches = [2, 16]
        config.batch = 16
        config.ref_batch = 16
        config.steps = 50
        config.channels = [8, 16]
        config.dist_processes = 1
        config.n_test = 300
        return config

    def run(self, config: BatchSizeConfig, seed: int) -> RunResult:
        data = load_digits(seed, config.n_test)
        sizes = sorted(config.device_batches)
        ref = _ref(config)
        result = RunResult()
        result.curves["device_batches"] = [float(b) for b in sizes]

        def train(kind: str, device_batch: int) -> float:
            gen = seeded(seed)
            model = SmallCNN(_norm(kind, config, device_batch), channels=tuple(config.channels))
            curves = train_classifier(
                model, data, steps=config.steps, lr=config.lr, momentum=0.9,
                batch_size=config.batch, generator=gen, eval_every=config.steps,
            )
            return 1.0 - curves.final_acc

        for kind in ("bn", "renorm"):
            errors = []
            for b in sizes:
                errors.append(train(kind, b))
                result.metrics[f"test_error/{kind}/b{b}"] = errors[-1]
            result.curves[f"test_error/{kind}"] = errors
            result.metrics[f"degradation/{kind}"] = errors[0] - errors[sizes.index(ref)]
        for kind in ("gn", "ln"):
            error = train(kind, config.batch)  # per-sample statistics: any device batch
            result.metrics[f"test_error/{kind}"] = error
            result.curves[f"test_error/{kind}"] = [error] * len(sizes)
            result.metrics[f"degradation/{kind}"] = 0.0
        world = max(1, config.dist_processes)
        args = (data, asdict(config), seed)
        if world == 1:
            dist_errors = _dist_worker(0, 1, *args)
        else:
            dist_errors = spawn(_dist_worker, world, *args, timeout=300.0)[0]
        for variant in DIST_VARIANTS:
            result.metrics[f"dist_error/{variant}"] = dist_errors[variant]
        result.metrics["dist_processes"] = float(world)
        return result

    def verdict(self, config: BatchSizeConfig, results: Sequence[RunResult]) -> Verdict:
        n = len(results)
        sizes = sorted(config.device_batches)
        ref = _ref(config)
        small = sizes[0]
        status, effect, spread = compare(
            metric_values(results, "degradation/bn"), metric_values(results, "degradation/gn"),
            higher_is_better=True, min_effect=config.min_effect,
        )

        def err(key: str) -> str:
            return f"{100 * np.mean(metric_values(results, key)):.1f}%"

        per_norm = "; ".join(
            f"{kind} " + ", ".join(f"{err(f'test_error/{kind}/b{b}')} at {b}" for b in sizes)
            for kind in ("bn", "renorm")
        )
        world = int(np.mean(metric_values(results, "dist_processes")))
        summary = (
            f"From {ref} to {small} examples per device, BN's test error grew "
            f"{summarize(100 * effect, 100 * spread, n, 'points', '.1f')}, GN's and LN's not "
            f"at all (per-sample statistics; GN {err('test_error/gn')}, LN "
            f"{err('test_error/ln')}). Test error by device batch: {per_norm} "
            f"(batch {config.batch}, {config.steps} steps). Across {world} process(es) x "
            f"{config.dist_batch} examples: BN per process {err('dist_error/bn_local')}, "
            f"SyncBN {err('dist_error/syncbn')}, GN {err('dist_error/gn')}."
        )
        return Verdict(
            status, 100 * effect, 100 * spread, "points of error growth", summary,
            agrees(status, "supported"),
        )

    def plot(
        self, config: BatchSizeConfig, results: Sequence[RunResult], out_dir: Path
    ) -> list[Path]:
        fig, (ax, ax_lit, ax_dist) = new_figure(3, width=4.4)
        sizes = results[0].curves["device_batches"]
        for kind in ("bn", "renorm", "gn", "ln"):
            plot_band(ax, sizes, [[100 * e for e in r.curves[f"test_error/{kind}"]]
                                  for r in results], LABELS[kind])
        ax.set(xlabel="examples per device (BN statistics batch)", ylabel="test error (%)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(int(b)) for b in sizes])
        ax.minorticks_off()
        ax.set_title(f"C9: CNN on digits, batch {config.batch} ({seeds_label(len(results))})")
        ax.legend(fontsize=8)
        for norm, table in WU_HE_2018.items():
            xs = sorted(table)
            ax_lit.plot(xs, [table[b] for b in xs], marker="o", label=norm.upper())
        ax_lit.plot([4], [26.3], marker="s", linestyle="none", label="batch renorm")
        ax_lit.set(xlabel="images per GPU", ylabel="top-1 error (%)")
        ax_lit.set_xscale("log", base=2)
        ax_lit.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        ax_lit.minorticks_off()
        ax_lit.set_title("literature: Wu & He 2018, ResNet-50 ImageNet")
        ax_lit.legend(fontsize=8)
        values = np.array([[100 * r.metrics[f"dist_error/{v}"] for v in DIST_VARIANTS]
                           for r in results])
        ax_dist.bar(range(len(DIST_VARIANTS)), values.mean(0),
                    yerr=values.std(0) if len(results) > 1 else None, capsize=3)
        ax_dist.set_xticks(range(len(DIST_VARIANTS)), [LABELS[v] for v in DIST_VARIANTS])
        world = int(results[0].metrics.get("dist_processes", 1))
        ax_dist.set(ylabel="test error (%)")
        ax_dist.set_title(
            f"{world} gloo process(es) x {config.dist_batch} examples, {config.steps} steps"
        )
        return [save_figure(fig, out_dir, "c09_batch_size")]
