"""Batch coupling: how much one sample's output depends on the other samples of its batch.

With batch statistics, each output is a function of the whole batch (Ioffe & Szegedy 2015 note it:
"the network no longer produces deterministic values for a given training example"). Measured
directly: run a batch B, then the batch B' that keeps sample i at position i and replaces every
other sample, and compare sample i's outputs:

    coupling = ||f(B)_i - f(B')_i||_2,   relative = coupling / ||f(B)_i||_2

It is exactly 0 for per-sample normalizations (LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and
for batch norm in eval mode, and > 0 for batch norm in train mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.diagnostics._util import copy_model, output_tensor

__all__ = ["Coupling", "batch_coupling"]


@dataclass(frozen=True)
class Coupling:
    """Change of one sample's output when the rest of its batch is replaced.

    Attributes:
        absolute: ``||f(B)_i - f(B')_i||_2``.
        relative: ``absolute / ||f(B)_i||_2`` (0 when both are 0).
    """

    absolute: float
    relative: float


@torch.no_grad()
def batch_coupling(
    model: nn.Module,
    x: Tensor,
    others: Tensor,
    *,
    index: int = 0,
    train: bool = True,
    seed: int = 0,
) -> Coupling:
    """Coupling of sample `index` of batch `x` to the rest of its batch (module docstring).

    Runs on a deep copy, so the model's running statistics are untouched; both forward passes use
    the same RNG seed, so dropout (which masks by position) adds nothing.

    Args:
        model: the model; its output's dim 0 must be the batch.
        x: the batch B, at least 2 samples.
        others: replacements: rows ``0 .. len(x) - 2`` take the places of all samples but `index`.
        index: the sample followed.
        train: measure with the copy in train mode (True: where coupling arises) or eval mode.
        seed: RNG seed of both forward passes.

    Raises:
        ValueError: when `x` has fewer than 2 samples, `others` too few, or `index` is out of range.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"batch_coupling: needs a batch of at least 2 samples, got {n}")
    if not -n <= index < n:
        raise ValueError(f"batch_coupling: index {index} is out of range for a batch of {n}")
    if others.shape[0] < n - 1:
        raise ValueError(
            f"batch_coupling: needs {n - 1} replacement samples in `others`, got {others.shape[0]}"
        )
    index %= n
    replaced = others[: n - 1].to(device=x.device, dtype=x.dtype)
    x_new = torch.cat([replaced[:index], x[index : index + 1], replaced[index:]])
    net = copy_model(model).train(train)
    outputs = []
    for batch in (x, x_new):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = output_tensor(net(batch), "batch_coupling")
        outputs.append(out[index].double())
    absolute = float((outputs[0] - outputs[1]).norm())
    norm = float(outputs[0].norm())
    relative = absolute / norm if norm > 0 else (0.0 if absolute == 0 else float("inf"))
    return Coupling(absolute=absolute, relative=relative)
