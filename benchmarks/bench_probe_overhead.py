"""Overhead of :class:`normlab.diagnostics.Probe` on a training step.

One SGD step (forward, cross-entropy, backward, optimizer step) of a small MLP (64 -> 256 -> 256 ->
10, batch norm + ReLU, batch 64) and a small CNN (1 -> 16 -> 32 channels, 3x3 conv + batch norm +
ReLU on 16x16 inputs, batch 32), without a probe and under a probe in three settings: everything
(default), every 10th step recorded, activations off (gradients only). The variants run
interleaved, each repeat timing a block of steps, and the median ms/step over the repeats is
printed with the overhead against no probe.

Run: ``.venv/bin/python benchmarks/bench_probe_overhead.py [--repeats 15] [--steps 20]
[--threads 1] [--norm torch|normlab]``. One thread by default: on a shared machine, intra-op
threads waiting on busy cores make the timings noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import normlab.nn as nnn
from normlab.diagnostics import Probe


def mlp(bn1d: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 256), bn1d(256), nn.ReLU(),
        nn.Linear(256, 256), bn1d(256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn(bn2d: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), bn2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), bn2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


VARIANTS: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager[object]]] = {
    "no probe": lambda m: contextlib.nullcontext(),
    "Probe()": lambda m: Probe(m),
    "Probe(every=10)": lambda m: Probe(m, every=10),
    "Probe(activations=False)": lambda m: Probe(m, activations=False),
}


def time_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, steps: int
                  ) -> dict[str, float]:
    """Median seconds per step of each variant; variants interleaved within every repeat."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(repeats + 1):  # the first repeat warms up
        for name, make in VARIANTS.items():
            with make(model):
                start = time.perf_counter()
                for _ in range(steps):
                    loss = loss_fn(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                elapsed = time.perf_counter() - start
            if rep:
                times[name].append(elapsed / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--norm", choices=("torch", "normlab"), default="torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bn1d, bn2d = (nn.BatchNorm1d, nn.BatchNorm2d) if args.norm == "torch" else (
        nnn.BatchNorm1d, nnn.BatchNorm2d)
    cases = {
        "MLP 64-256-256-10, batch 64": (mlp(bn1d), torch.randn(64, 64)),
        "CNN 1-16-32 on 16x16, batch 32": (cnn(bn2d), torch.randn(32, 1, 16, 16)),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.norm} batch norm, "
          f"median of {args.repeats} x {args.steps} steps")
    print(f"{'model':32} {'variant':26} {'ms/step':>9} {'overhead':>9}")
    for label, (model, x) in cases.items():
        y = torch.randint(0, 10, (x.shape[0],))
        medians = time_variants(model, x, y, args.repeats, args.steps)
        base = medians["no probe"]
        for name, t in medians.items():
            overhead = "" if name == "no probe" else f"{100 * (t / base - 1):+.0f}%"
            print(f"{label:32} {name:26} {1e3 * t:9.3f} {overhead:>9}")


if __name__ == "__main__":
    main()
