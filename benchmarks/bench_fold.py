"""Inference time of a small CNN before and after :func:`normlab.convert.fold_batchnorm`.

Three conv + batch norm + ReLU blocks (3 -> 32 -> 64 -> 128 channels, 3x3) on a batch of 64
32x32 images, in eval mode under ``torch.inference_mode``. Prints the median over repeats (the
original and the folded model run interleaved) and the speed-up, for torch's and normlab's batch
norm. Run: ``.venv/bin/python benchmarks/bench_fold.py [--repeats 30] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normlab.nn as nnn
from normlab.convert import fold_batchnorm


def small_cnn(norm: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def median_ms(models: list[nn.Module], x: torch.Tensor, repeats: int, warmup: int = 2
              ) -> list[float]:
    """Median wall time per model; the models run interleaved so that load from other
    processes on the machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for model, t in zip(models, times):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 32, 32)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}x3x32x32, "
          f"median of {args.repeats}")
    for name, norm in (("torch.nn.BatchNorm2d", nn.BatchNorm2d),
                       ("normlab.nn.BatchNorm2d", nnn.BatchNorm2d)):
        model = small_cnn(norm)
        model.train()
        with torch.no_grad():  # a few steps so the running statistics are not the identity
            for _ in range(3):
                model(torch.randn_like(x))
        model.eval()
        folded = fold_batchnorm(model)
        with torch.inference_mode():
            err = (folded(x) - model(x)).abs().max().item()
        before, after = median_ms([model, folded], x, args.repeats)
        print(f"{name:24s} before {before:8.2f} ms  folded {after:8.2f} ms  "
              f"speed-up {before / after:5.2f}x  max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
