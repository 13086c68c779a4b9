"""A one-minute look at what normalization does: the same sigmoid MLP on scikit-learn's digits,
trained with no normalization, with normlab's BatchNorm1d and with its LayerNorm.

This is the quick-start's smoke test of the whole stack; the lab (`normlab lab`) measures every
claim properly, over seeds, with plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import normlab.nn as nnl


@dataclass
class DemoResult:
    name: str
    accuracy_by_step: dict[int, float]
    seconds: float


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Digits (1797 real 8x8 images) scaled to [0, 1], split 1297 train / 500 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[500:], y[500:], x[:500], y[:500]


def sigmoid_mlp(
    norm: Callable[[int], nn.Module] | None, width: int = 100, depth: int = 3
) -> nn.Module:
    """Ioffe & Szegedy's MNIST network: `depth` sigmoid layers of `width` units, norm before the
    nonlinearity."""
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if norm is not None:
            layers.append(norm(width))
        layers.append(nn.Sigmoid())
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    steps: int,
    seed: int,
    checkpoints: list[int],
    lr: float = 0.5,
    batch_size: int = 60,
) -> dict[int, float]:
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    accuracy: dict[int, float] = {}
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_train), (batch_size,), generator=gen)
        model.train()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checkpoints:
            model.eval()
            with torch.no_grad():
                accuracy[step] = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy


def run_demo(steps: int = 1500, seed: int = 0) -> list[DemoResult]:
    data = load_digits_split(seed)
    checkpoints = sorted({steps // 10, steps // 4, steps // 2, steps})
    variants: list[tuple[str, Callable[[int], nn.Module] | None]] = [
        ("no normalization", None),
        ("BatchNorm1d", nnl.BatchNorm1d),
        ("LayerNorm", nnl.LayerNorm),
    ]
    results = []
    for name, norm in variants:
        torch.manual_seed(seed)
        model = sigmoid_mlp(norm)
        start = time.perf_counter()
        acc = train(model, data, steps, seed, checkpoints)
        results.append(DemoResult(name, acc, time.perf_counter() - start))
    return results


def format_results(results: list[DemoResult]) -> str:
    steps = sorted(results[0].accuracy_by_step)
    header = f"{'model (3x100 sigmoid MLP, digits)':<34}" + "".join(
        f"{'step ' + str(s):>11}" for s in steps
    )
    lines = [header, "-" * len(header)]
    for r in results:
        row = "".join(f"{100 * r.accuracy_by_step[s]:>10.1f}%" for s in steps)
        lines.append(f"{r.name:<34}{row}")
    base = results[0].accuracy_by_step[steps[0]]
    best = max(results[1:], key=lambda r: r.accuracy_by_step[steps[0]])
    lines.append("")
    lines.append(
        f"test accuracy after {steps[0]} steps: {100 * base:.1f}% without normalization, "
        f"{100 * best.accuracy_by_step[steps[0]]:.1f}% with {best.name} "
        f"(single seed; `normlab lab` measures this over seeds)"
    )
    return "\n".join(lines)


def main(steps: int = 1500, seed: int = 0) -> int:
    np.random.seed(seed)
    print(format_results(run_demo(steps, seed)))
    return 0
