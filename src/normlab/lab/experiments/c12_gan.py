"""C12: batch norm can destabilize GAN training (DCGAN-era practice).

A small MLP GAN learns a 2-D mixture of ``n_modes`` Gaussians on a ring. The generator has no
norm; the discriminator gets BN (real and fake batches passed separately, the DCGAN way), none,
LN, or spectral norm on every linear layer (``torch.nn.utils.parametrizations.spectral_norm``).
All variants start from the same generator weights and see the same real samples and noise.

Measured on ``n_samples`` generated points at the end: modes covered (a mode counts when at least
``min_mode_frac`` of the ideal ``n_samples / n_modes`` points lie within ``k_sigma`` standard
deviations of it), the fraction of high-quality samples (within ``k_sigma`` of any mode), and
stability: the standard deviation of the discriminator loss over the second half of training and
whether any loss became non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from normlab.lab.common import (
    agrees,
    metric_values,
    n_seeds,
    new_figure,
    norm_factory,
    save_figure,
    seeded,
    summarize,
)
from normlab.lab.experiment import Experiment, RunResult, Verdict, compare

__all__ = ["GAN", "GANConfig", "mode_stats", "ring_modes", "sample_ring"]

VARIANTS = ("none", "bn", "ln", "sn")
LABELS = {
    "none": "D: no norm",
    "bn": "D: BatchNorm1d",
    "ln": "D: LayerNorm",
    "sn": "D: spectral norm",
}


@dataclass
class GANConfig:
    """Config of C12.

    Attributes:
        n_modes: Gaussians on the ring.
        radius: ring radius.
        sigma: std of each Gaussian.
        steps: training iterations (one D step and one G step each).
        batch_size: real and fake samples per step.
        lr: Adam learning rate of both nets (betas 0.5, 0.999).
        hidden: hidden width of both nets (two hidden layers each).
        z_dim: latent size.
        n_samples: generated points evaluated at the end.
        k_sigma: a sample within this many sigma of a mode is high quality.
        min_mode_frac: fraction of the ideal per-mode count that makes a mode covered.
        log_every: period of the loss curves.
        min_effect: smallest difference in modes covered (none minus BN) that counts.
    """

    n_modes: int = 8
    radius: float = 2.0
    sigma: float = 0.1
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    hidden: int = 32
    z_dim: int = 8
    n_samples: int = 1000
    k_sigma: float = 3.0
    min_mode_frac: float = 0.1
    log_every: int = 20
    min_effect: float = 1.0


def ring_modes(n_modes: int, radius: float) -> Tensor:
    """The mixture's centres ``(n_modes, 2)``, evenly spaced on a circle."""
    angles = torch.arange(n_modes, dtype=torch.float32) * (2 * math.pi / n_modes)
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_ring(n: int, modes: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """``n`` points of the equal-weight Gaussian mixture around ``modes``."""
    idx = torch.randint(len(modes), (n,), generator=generator)
    return modes[idx] + sigma * torch.randn(n, 2, generator=generator)


def mode_stats(
    samples: Tensor, modes: Tensor, sigma: float, k_sigma: float, min_mode_frac: float
) -> tuple[int, float]:
    """``(modes covered, fraction of high-quality samples)`` of generated `samples`."""
    finite = torch.isfinite(samples).all(dim=1)
    dist = torch.cdist(samples[finite], modes)
    if dist.numel() == 0:
        return 0, 0.0
    nearest, which = dist.min(dim=1)
    good = nearest <= k_sigma * sigma
    counts = torch.bincount(which[good], minlength=len(modes))
    needed = min_mode_frac * len(samples) / len(modes)
    return int((counts >= needed).sum()), float(good.sum()) / len(samples)


def _generator_net(config: GANConfig) -> nn.Module:
    h = config.hidden
    return nn.Sequential(
        nn.Linear(config.z_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2)
    )


def _discriminator_net(config: GANConfig, variant: str) -> nn.Module:
    h = config.hidden
    norm = norm_factory("none" if variant == "sn" else variant)
    layers: list[nn.Module] = []
    fan_in = 2
    for _ in range(2):
        layers.append(nn.Linear(fan_in, h))
        if norm is not None:
            layers.append(norm(h))
        layers.append(nn.LeakyReLU(0.2))
        fan_in = h
    layers.append(nn.Linear(fan_in, 1))
    if variant == "sn":
        layers = [spectral_norm(m) if isinstance(m, nn.Linear) else m for m in layers]
    return nn.Sequential(*layers)


class GAN(Experiment):
    """Mode coverage, sample quality and stability of a 2-D GAN by discriminator norm.

    Metrics: ``modes_covered/{variant}``, ``quality/{variant}`` (fraction within ``k_sigma``),
    ``d_loss_std/{variant}`` (second half), ``d_loss_final/{variant}``, ``diverged/{variant}``
    (0/1), for variant in none, bn, ln, sn.
    Curves: ``d_loss/{variant}``, ``g_loss/{variant}`` (mean per ``log_every`` steps),
    ``log_steps``, ``samples_x/{variant}``, ``samples_y/{variant}`` (the first 300 samples).
    """

    name: ClassVar[str] = "gan"
    claim: ClassVar[str] = "C12"
    title: ClassVar[str] = "Batch norm can destabilize GAN training"
    literature: ClassVar[str] = (
        "Practice (DCGAN era): BN in the discriminator, with separate real and fake batches, "
        "can destabilize training; spectral norm (Miyato et al. 2018) became the usual "
        "discriminator normalization. Task-dependent."
    )
    config_class: ClassVar[type] = GANConfig

    def quick_config(self, config: GANConfig) -> GANConfig:
        config.steps = 40
        config.batch_size = 32
        config.hidden = 16
        config.n_samples = 400
        config.log_every = 10
        return config

    def run(self, config: GANConfig, seed: int) -> RunResult:
        modes = ring_modes(config.n_modes, config.radius)
        result = RunResult()
        for variant in VARIANTS:
            gen = seeded(seed)
            g_net = _generator_net(config)
            d_net = _discriminator_net(config, variant)
            opt_g = torch.optim.Adam(g_net.parameters(), lr=config.lr, betas=(0.5, 0.999))
            opt_d = torch.optim.Adam(d_net.parameters(), lr=config.lr, betas=(0.5, 0.999))
            ones = torch.ones(config.batch_size, 1)
            zeros = torch.zeros(config.batch_size, 1)
            d_losses: list[float] = []
            g_losses: list[float] = []
            diverged = False
            for _ in range(config.steps):
                real = sample_ring(config.batch_size, modes, config.sigma, gen)
                z = torch.randn(config.batch_size, config.z_dim, generator=gen)
                fake = g_net(z)
                # Real and fake go through D as separate batches (DCGAN practice).
                d_loss = F.binary_cross_entropy_with_logits(
                    d_net(real), ones
                ) + F.binary_cross_entropy_with_logits(d_net(fake.detach()), zeros)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                g_loss = F.binary_cross_entropy_with_logits(d_net(fake), ones)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                d_losses.append(d_loss.item())
                g_losses.append(g_loss.item())
                if not (math.isfinite(d_losses[-1]) and math.isfinite(g_losses[-1])):
                    diverged = True
                    break
            with torch.no_grad():
                z = torch.randn(config.n_samples, config.z_dim, generator=gen)
                samples = g_net(z)
            covered, quality = mode_stats(
                samples, modes, config.sigma, config.k_sigma, config.min_mode_frac
            )
            second_half = np.asarray(d_losses[len(d_losses) // 2 :], dtype=float)
            second_half = second_half[np.isfinite(second_half)]
            result.metrics[f"modes_covered/{variant}"] = float(covered)
            result.metrics[f"quality/{variant}"] = quality
            result.metrics[f"d_loss_std/{variant}"] = (
                float(second_half.std()) if second_half.size else 0.0
            )
            result.metrics[f"d_loss_final/{variant}"] = (
                float(second_half[-config.log_every :].mean()) if second_half.size else 0.0
            )
            result.metrics[f"diverged/{variant}"] = float(diverged)
            n_logs = config.steps // config.log_every
            for key, losses in (("d_loss", d_losses), ("g_loss", g_losses)):
                padded = np.full(n_logs * config.log_every, np.nan)
                padded[: min(len(losses), padded.size)] = losses[: padded.size]
                result.curves[f"{key}/{variant}"] = (
                    padded.reshape(n_logs, config.log_every).mean(axis=1).tolist()
                )
            shown = samples[:300]
            result.curves[f"samples_x/{variant}"] = shown[:, 0].tolist()
            result.curves[f"samples_y/{variant}"] = shown[:, 1].tolist()
        result.curves["log_steps"] = [
            float((i + 1) * config.log_every) for i in range(config.steps // config.log_every)
        ]
        return result

    def verdict(self, config: GANConfig, results: Sequence[RunResult]) -> Verdict:
        none = metric_values(results, "modes_covered/none")
        bn = metric_values(results, "modes_covered/bn")
        status, effect, spread = compare(
            none, bn, higher_is_better=True, min_effect=config.min_effect
        )
        covered = {
            v: float(np.mean(metric_values(results, f"modes_covered/{v}"))) for v in VARIANTS
        }
        quality = {v: float(np.mean(metric_values(results, f"quality/{v}"))) for v in VARIANTS}
        d_std = {v: float(np.mean(metric_values(results, f"d_loss_std/{v}"))) for v in VARIANTS}
        summary = (
            f"Without BN the discriminator let the generator cover "
            f"{summarize(effect, spread, len(results), 'more modes', '.1f')} of {config.n_modes} "
            f"than with BN; modes / high-quality fraction / D-loss std: "
            + "; ".join(
                f"{v.upper()} {covered[v]:.1f} / {quality[v]:.0%} / {d_std[v]:.2f}"
                for v in VARIANTS
            )
            + "."
        )
        return Verdict(status, effect, spread, "modes", summary, agrees(status, None))

    def plot(self, config: GANConfig, results: Sequence[RunResult], out_dir: Path) -> list[Path]:
        modes = ring_modes(config.n_modes, config.radius)
        fig, axes = new_figure(len(VARIANTS), width=3.2, height=3.4)
        first = results[0]
        limit = config.radius * 1.8
        for ax, variant in zip(axes, VARIANTS, strict=True):
            ax.scatter(
                first.curves[f"samples_x/{variant}"],
                first.curves[f"samples_y/{variant}"],
                s=4,
                alpha=0.5,
                label="generated",
            )
            ax.scatter(modes[:, 0], modes[:, 1], marker="x", color="red", label="modes")
            covered = first.metrics[f"modes_covered/{variant}"]
            ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xlabel="x")
            ax.set_title(f"{LABELS[variant]}: {covered:.0f}/{config.n_modes} modes", fontsize=9)
        axes[0].set_ylabel("y")
        axes[0].legend(fontsize="x-small", loc="lower left")
        fig.suptitle(f"C12: GAN samples after {config.steps} steps (seed 0 of {len(results)})")
        samples_path = save_figure(fig, out_dir, "c12_gan_samples")

        fig, (ax,) = new_figure(1, width=5.5)
        steps = first.curves["log_steps"]
        for variant in VARIANTS:
            runs = np.asarray([r.curves[f"d_loss/{variant}"] for r in results], dtype=float)
            line = ax.plot(steps, np.nanmean(runs, axis=0), label=LABELS[variant])[0]
            if len(results) > 1:
                ax.fill_between(
                    steps,
                    np.nanmin(runs, axis=0),
                    np.nanmax(runs, axis=0),
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set(xlabel="training step", ylabel="discriminator loss (mean per window)")
        ax.set_title(f"C12: discriminator loss, band = seed range ({n_seeds(len(results))})")
        ax.legend(fontsize="small")
        return [samples_path, save_figure(fig, out_dir, "c12_gan_loss")]
