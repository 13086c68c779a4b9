"""Where the time of a normlab op goes on a GPU: host (Python) time per call and each kernel's
device time, side by side with torch.nn (and Liger where installed).

    python benchmarks/gpu_profile.py            # on a machine with a CUDA device
    python benchmarks/gpu_profile.py --cprofile # where the host time of one call goes

For each case it prints: host microseconds per call with no synchronization (what bounds small
shapes: launches are asynchronous, so a call cannot finish faster than its Python), wall time
per call synchronized, and the profiler's device time per kernel. Not a test.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import normlab
from normlab import bench


def _host_and_wall(fn, n: int = 50) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    return host * 1e6, wall * 1e6


def _cprofile(dev: torch.device) -> None:
    # Python functions by own time over 300 host-bound calls (4096x1024 layer norm fwd+bwd and
    # 32x64x56x56 batch norm fwd+bwd): what a faster host path would have to cut.
    for kind, shape in (("layer_norm", (4096, 1024)), ("batch_norm", (32, 64, 56, 56))):
        case = next(c for c in bench._cases(False, [kind], gpu=True)
                    if tuple(c.shape) == shape and not c.channels_last)
        c = shape[-1] if kind in bench._ROW_KINDS else shape[1]
        inputs = bench._make_inputs(case, dev, torch.float32, 0)
        fn = bench._step_fn(case.build("normlab", dev, torch.float32, c), inputs, backward=True)
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        print(f"== {kind} {'x'.join(map(str, shape))} normlab fwd+bwd, 300 calls")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(22)


def main() -> None:
    dev = torch.device("cuda")
    if "--cprofile" in sys.argv:
        _cprofile(dev)
        return
    cases = [
        ("layer_norm", (4096, 1024), False), ("layer_norm", (4096, 16384), False),
        ("rms_norm", (4096, 16384), False), ("add_rms_norm", (4096, 16384), False),
        ("batch_norm", (32, 64, 56, 56), False), ("batch_norm", (128, 256, 56, 56), False),
        ("group_norm", (128, 256, 56, 56), False),
    ]
    print(torch.cuda.get_device_name(), torch.__version__, normlab.__version__)
    for kind, shape, cl in cases:
        case = next(c for c in bench._cases(False, [kind], gpu=True)
                    if tuple(c.shape) == shape and c.channels_last == cl)
        c = shape[-1] if kind in bench._ROW_KINDS else shape[1]
        inputs = bench._make_inputs(case, dev, torch.float32, 0)
        for provider in ("normlab", "torch", "liger"):
            try:
                module = case.build(provider, dev, torch.float32, c)
            except Exception as e:
                print(f"  {provider}: unavailable ({e})")
                continue
            if module is None:
                continue
            fn = bench._step_fn(module, inputs, backward=True)
            host, wall = _host_and_wall(fn)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            kern = sorted(((e.key, e.device_time_total / 5, e.count // 5)
                           for e in prof.key_averages() if e.device_time_total > 0),
                          key=lambda t: -t[1])
            total = sum(k[1] for k in kern)
            print(f"{kind} {'x'.join(map(str, shape))} {provider}: host {host:.0f} us/call, "
                  f"wall {wall:.0f} us/call, device {total:.0f} us/call")
            for name, us, count in kern[:8]:
                print(f"    {us:9.1f} us  x{count}  {name[:110]}")


if __name__ == "__main__":
    main()
