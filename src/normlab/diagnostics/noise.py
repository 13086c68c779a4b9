"""Batch-statistic noise: how far per-batch means and variances stray from the population's.

Batch norm normalizes with the statistics of the mini-batch, a noisy estimate of the population
statistics whose noise grows as the batch shrinks: the root of its batch-size dependence (Wu & He
2018, Table 2: ResNet-50 top-1 error 23.6% at 32 images per GPU, 34.7% at 2). For a layer input x
of shape (N, C, *), with population mean mu_c and biased variance var_c per channel (over all N
samples and positions), and a batch B of b samples with its own mean mu_B,c and biased variance
var_B,c (the ones batch norm normalizes with):

    mean_noise(b) = RMS over batches and channels of (mu_B,c - mu_c) / sqrt(var_c)
    var_noise(b)  = RMS over batches and channels of (var_B,c - var_c) / var_c

For i.i.d. Gaussian features without spatial dims these are about 1/sqrt(b) and
sqrt((2b - 1) / b^2): 0.71 and 0.87 at b = 2, 0.18 and 0.25 at b = 32. Channels that are constant
over the data (var_c = 0) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.diagnostics._util import (
    CallKeys,
    eval_pass,
    first_tensor,
    is_batch_norm,
    temporary_forward_hooks,
)
from normlab.functional.moments import moments

__all__ = ["BatchNoise", "batch_stat_noise", "bn_input_noise"]


@dataclass(frozen=True)
class BatchNoise:
    """Spread of batch statistics at one batch size (module docstring).

    Attributes:
        batch_size: b.
        mean_noise: RMS of (batch mean - population mean) / population std.
        var_noise: RMS of (batch variance - population variance) / population variance.
        batches: how many disjoint batches the RMS is over.
    """

    batch_size: int
    mean_noise: float
    var_noise: float
    batches: int


def batch_stat_noise(
    x: Tensor,
    batch_sizes: Sequence[int],
    *,
    shuffle: bool = True,
    seed: int = 0,
    max_batches: int = 512,
) -> dict[int, BatchNoise]:
    """Noise of per-batch statistics of `x` around its population statistics, per batch size.

    Args:
        x: samples of a layer input, (N, C, *) (an (N,) input is one channel).
        batch_sizes: batch sizes to measure; sizes larger than N are skipped.
        shuffle: cut the batches from a seeded random permutation of the samples (else in order).
        seed: the permutation's seed.
        max_batches: at most this many disjoint batches per size.

    Returns:
        batch size -> :class:`BatchNoise`.
    """
    x = x.detach().double()
    if x.dim() == 1:
        x = x.unsqueeze(1)
    n = x.shape[0]
    if shuffle:
        x = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)]
    spatial = list(range(2, x.dim()))
    mean, var = moments(x, [0, *spatial])  # (1, C, 1...)
    varying = var.reshape(-1) > 0
    out: dict[int, BatchNoise] = {}
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"batch_stat_noise: batch sizes must be >= 1, got {b}")
        k = min(n // b, max_batches)
        if k == 0:
            continue
        grouped = x[: k * b].reshape(k, b, *x.shape[1:])
        batch_mean, batch_var = moments(grouped, [1, *(d + 1 for d in spatial)])
        z_mean = ((batch_mean - mean.unsqueeze(0)) / var.unsqueeze(0).sqrt()).reshape(k, -1)
        z_var = ((batch_var - var.unsqueeze(0)) / var.unsqueeze(0)).reshape(k, -1)
        if bool(varying.any()):
            mean_noise = float(z_mean[:, varying].square().mean().sqrt())
            var_noise = float(z_var[:, varying].square().mean().sqrt())
        else:
            mean_noise = var_noise = 0.0
        out[b] = BatchNoise(batch_size=b, mean_noise=mean_noise, var_noise=var_noise, batches=k)
    return out


def bn_input_noise(
    model: nn.Module,
    x: Tensor,
    batch_sizes: Sequence[int],
    *,
    max_samples: int = 2048,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[int, BatchNoise]]:
    """:func:`batch_stat_noise` of the input of every batch-norm layer of `model`.

    The inputs are captured over (at most `max_samples` samples of) `x` with the model in eval mode
    (modes restored afterwards; eval mode changes no buffer), i.e. as the layers see them with the
    current weights.

    Returns:
        layer name -> batch size -> :class:`BatchNoise`, in forward order.
    """
    layers = {n: m for n, m in model.named_modules() if is_batch_norm(m)}
    inputs: dict[str, list[Tensor]] = {}
    keys = CallKeys()

    def on_input(name: str, module: nn.Module, args: tuple[object, ...]) -> None:
        key = keys.next(name)
        inp = first_tensor(args)
        if inp is not None:
            inputs.setdefault(key, []).append(inp.detach().clone())

    with temporary_forward_hooks(layers, on_input=on_input):
        eval_pass(model, x[:max_samples], batch_size, keys)
    return {
        key: batch_stat_noise(torch.cat(chunks), batch_sizes, seed=seed)
        for key, chunks in inputs.items()
    }
