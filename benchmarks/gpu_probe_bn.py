"""Training batch norm and group norm on a GPU: the non-finite policies side by side (a probe).

``on_nonfinite="error"`` (the default) reads one scalar back per training step; ``"mask"`` keeps
the guarantee on the device. Times both against torch.nn at 128x256x56x56, forward and
forward+backward, with group norm (its looped backward) alongside. Not a test.

    python benchmarks/gpu_probe_bn.py            # CUDA
    python benchmarks/gpu_probe_bn.py --dry-run  # CPU, small shape, one call each (a test)
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch import nn

import normlab
from normlab import bench


def main() -> None:
    dev = torch.device("cuda" if "--dry-run" not in sys.argv else "cpu")
    shape = (128, 256, 56, 56) if dev.type == "cuda" else (2, 8, 5, 5)
    c = shape[1]
    modules = {
        "bn normlab error": normlab.nn.BatchNorm2d(c),
        "bn normlab mask": normlab.nn.BatchNorm2d(c, on_nonfinite="mask"),
        "bn torch": nn.BatchNorm2d(c),
        "gn normlab": normlab.nn.GroupNorm(32 if c % 32 == 0 else 1, c),
        "gn torch": nn.GroupNorm(32 if c % 32 == 0 else 1, c),
    }
    fns = {}
    for cl in (False, True):
        x = torch.randn(shape, device=dev)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, m in modules.items():
            m = m.to(dev)
            for backward in (False, True):
                key = f"{name:18s} {'CL  ' if cl else 'NCHW'} {'fwd+bwd' if backward else 'fwd'}"
                fns[key] = bench._step_fn(m, [x], backward)
                fns[key]()  # compile, warm
    # interleaved rounds, wall time of 20 calls each (as normlab bench does), medians
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(7 if dev.type == "cuda" else 1):
        for key, fn in fns.items():
            times[key].append(bench._time_once(fn, 20 if dev.type == "cuda" else 1, dev))
    for key, ts in times.items():
        print(f"{key}  {statistics.median(ts) * 1e6:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
