"""Numerically stable first and second moments: the one statistics routine every norm uses.

Numerics:
    * Accumulation runs in float32 for float16/bfloat16/float32 inputs and in float64 for float64
      inputs (`compute_dtype`), so half-precision sums neither overflow nor lose the mean.
    * The variance is a *shifted two-pass* estimate: first the mean, then the mean of squared
      deviations from it. The textbook one-pass E[x^2] - E[x]^2 cancels catastrophically at large
      offsets (1e4 + 0.01 * noise in float32 loses every digit and can even turn negative); the
      two-pass form only pays the rounding error of the mean, squared.
    * Per-chunk statistics are combined with Chan et al.'s pairwise update (`merge_moments`), which
      is exact in real arithmetic for any chunk sizes, including empty ones: this is what streaming
      standardization, SyncBatchNorm and precise BN recalibration build on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Moments", "compute_dtype", "merge_moments", "moments"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def moments(x: Tensor, dims: Sequence[int], center: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of `x` over `dims`, kept as size-1 dims for broadcasting.

    Args:
        x: any floating tensor (any memory layout).
        dims: the dimensions averaged over.
        center: if False, return (zeros, mean(x^2)): the "statistics without the mean" of RMS norm.

    Returns:
        (mean, var) in `compute_dtype(x.dtype)`, each with size 1 along `dims`.
    """
    xc = x.to(compute_dtype(x.dtype))
    dims = list(dims)
    if not center:
        ms = xc.square().mean(dims, keepdim=True)
        return torch.zeros_like(ms), ms
    mean = xc.mean(dims, keepdim=True)
    var = (xc - mean).square_().mean(dims, keepdim=True)
    return mean, var


class Moments:
    """(count, mean, M2) of a stream, merged exactly chunk by chunk (Chan, Golub & LeVeque 1979).

    `M2` is the sum of squared deviations from the mean; the biased variance is M2 / count and the
    unbiased one M2 / (count - 1). Statistics are float64 so a long stream does not drift.
    """

    def __init__(self, count: Tensor, mean: Tensor, m2: Tensor) -> None:
        self.count, self.mean, self.m2 = count, mean, m2

    @classmethod
    def empty(
        cls, shape: Sequence[int] | torch.Size, device: torch.device | str = "cpu"
    ) -> Moments:
        z = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
        return cls(torch.zeros((), dtype=torch.float64, device=device), z, z.clone())

    @classmethod
    def of(cls, x: Tensor, dims: Sequence[int]) -> Moments:
        """Moments of one chunk, reduced over `dims` (removed from the result)."""
        xd = x.to(torch.float64)
        count = 1
        for d in dims:
            count *= x.shape[d]
        if count == 0:
            shape = [s for i, s in enumerate(x.shape) if i not in {d % x.dim() for d in dims}]
            return cls.empty(shape, x.device)
        mean = xd.mean(list(dims), keepdim=True)
        m2 = (xd - mean).square_().sum(list(dims))
        return cls(
            torch.tensor(float(count), dtype=torch.float64, device=x.device),
            mean.squeeze_(list(dims)) if dims else mean,
            m2,
        )

    def merge(self, other: Moments) -> Moments:
        mean, m2, count = merge_moments(
            self.count, self.mean, self.m2, other.count, other.mean, other.m2
        )
        return Moments(count, mean, m2)

    def var(self, correction: int = 0) -> Tensor:
        """Variance with `correction` (0: biased, 1: Bessel); 0 where fewer samples than needed."""
        denom = (self.count - correction).clamp_min(1)
        return torch.where(self.count > correction, self.m2 / denom, torch.zeros_like(self.m2))


def merge_moments(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's pairwise merge of two (count, mean, M2) summaries; exact for empty sides.

    Returns:
        (mean, m2, count) of the union.
    """
    count = count_a + count_b
    safe = count.clamp_min(1)
    delta = mean_b - mean_a
    frac_b = count_b / safe
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta.square() * (count_a * frac_b)
    return mean, m2, count
