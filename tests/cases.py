"""Seeded random case tables shared by the oracle tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


@dataclass
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # "contiguous" | "channels_last" | "strided"
    affine: bool
    bias: bool
    eps: float
    seed: int

    def make(self, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        base = torch.randn(self.shape, generator=gen, dtype=torch.float64) * scale + offset
        return as_layout(base.to(self.dtype), self.layout)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        # Same values, non-contiguous storage: a strided slice of a bigger buffer.
        big = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def random_cases(n: int, min_dim: int, max_dim: int, seed: int = 0,
                 dtypes=(torch.float32, torch.float64)) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        ndim = rng.randint(min_dim, max_dim)
        shape = [rng.choice([1, 2, 3, 5, 7]) for _ in range(ndim)]
        shape[0] = rng.choice([2, 3, 4, 8])
        if ndim > 1:
            shape[1] = rng.choice([1, 3, 4, 6])
        cases.append(
            Case(
                shape=tuple(shape),
                dtype=rng.choice(dtypes),
                layout=rng.choice(["contiguous", "channels_last", "strided"]),
                affine=rng.random() < 0.7,
                bias=rng.random() < 0.8,
                eps=rng.choice([1e-5, 1e-3, 0.1]),
                seed=1000 * seed + i,
            )
        )
    return cases
