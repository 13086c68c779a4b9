"""Lazy, cached build of the C++ CPU kernels (``csrc/normlab_cpu.cpp``), loaded with ctypes.

Nothing is compiled at ``import normlab``. The first call that needs a kernel variant (one storage
dtype, plain or with a fused activation) compiles it with the system C++ compiler against torch's
own headers (only ``ATen/Parallel.h``, so a variant takes a few seconds) and caches the shared
library on disk, keyed by the source, the flags, the torch version and the CPU; later processes
load it in milliseconds. Builds write to a temporary file and rename it into place, so concurrent
processes (pytest-xdist workers) never load a half-written library.

If the compiler is missing or the build fails, normlab warns once and every op runs on the
plain-torch reference path. Environment:

* ``NORMLAB_CACHE_DIR``: where libraries are cached (default ``$XDG_CACHE_HOME/normlab`` or
  ``~/.cache/normlab``).
* ``CXX``: the compiler (default ``c++``).
* ``NORMLAB_CXXFLAGS``: extra compiler flags, appended (e.g. to try another vector width).
* ``NORMLAB_KERNELS=reference``: never build; always use the reference path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "build_variants", "cache_dir", "library"]

_SOURCE = Path(__file__).parent / "csrc" / "normlab_cpu.cpp"
_ABI_VERSION = 3

_lock = threading.Lock()
_libs: dict[tuple[int, bool], ctypes.CDLL] = {}
_failed: str | None = None  # reason the build failed; set once

_i64, _int, _dbl, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_SIGNATURES: dict[str, list] = {
    "nl_row_forward": [_int, _int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr,
                       _dbl, _int, _ptr, _ptr, _ptr],
    "nl_row_normalize": [_int, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr,
                         _ptr, _dbl, _ptr],
    "nl_row_backward": [_int, _int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr,
                        _ptr, _ptr, _ptr, _int, _int, _ptr, _ptr, _i64],
    "nl_bn_rows_forward": [_int, _int, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _dbl, _ptr,
                           _ptr, _ptr],
    "nl_bn_rows_backward": [_int, _int, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr,
                            _ptr, _ptr, _ptr],
    "nl_col_forward": [_int, _int, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _dbl, _int,
                       _ptr, _ptr, _ptr],
    "nl_running_stats": [_int, _ptr, _ptr, _ptr, _ptr, _i64, _dbl, _dbl, _int],
    "nl_col_backward": [_int, _int, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64,
                        _ptr, _ptr, _ptr, _ptr, _int, _ptr, _ptr],
}


def cache_dir() -> Path:
    base = os.environ.get("NORMLAB_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "normlab"


def _cpu_signature() -> str:
    # -march=native code must not be loaded on another CPU sharing the cache (a network home).
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _flags(dtype_code: int, act: bool) -> list[str]:
    import torch.utils.cpp_extension as ext

    # The fused-activation variants hold three copies of every kernel: outside float32 (the
    # common case), -O2 with the full vectorizer cost model compiles them in half the time of -O3.
    opt = ["-O2", "-fvect-cost-model=dynamic"] if act and dtype_code != 0 else ["-O3"]
    # 512-bit vectors where the CPU has them: GCC's default for AVX-512 CPUs is 256 bits, which
    # measured 1.3x slower on the activation-fused kernels (exp/erf are compute-bound) and no
    # faster elsewhere.
    flags = [*opt, "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-DNL_DTYPE={dtype_code}", f"-DNL_ACT={int(act)}"]
    flags += [f"-I{p}" for p in ext.include_paths()]
    flags += os.environ.get("NORMLAB_CXXFLAGS", "").split()
    return flags


def _link_flags() -> list[str]:
    import torch.utils.cpp_extension as ext

    lib = ext.library_paths()[0]
    return [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _target(dtype_code: int, act: bool) -> tuple[Path, list[str]]:
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, *_flags(dtype_code, act), str(_SOURCE), *_link_flags()]
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), *cmd, torch.__version__, sys.version, _cpu_signature(),
                   str(_ABI_VERSION)]).encode()
    ).hexdigest()[:20]
    name = f"normlab_cpu_d{dtype_code}{'_act' if act else ''}_{key}.so"
    return cache_dir() / "kernels" / name, cmd


def _compile(dtype_code: int, act: bool) -> Path:
    path, cmd = _target(dtype_code, act)
    if path.exists():
        return path
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {cmd[0]!r}; set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiler failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: other processes see no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.nl_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has a different ABI version")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """False once a build has failed (then every op uses the reference path)."""
    return _failed is None


def library(dtype_code: int, act: bool = False) -> ctypes.CDLL | None:
    """The loaded library for one variant, building it on first use; None if unavailable."""
    global _failed
    key = (dtype_code, act)
    lib = _libs.get(key)
    if lib is not None or _failed is not None:
        return lib
    with _lock:
        if key in _libs or _failed is not None:
            return _libs.get(key)
        try:
            _libs[key] = _load(_compile(dtype_code, act))
        except Exception as e:  # no compiler, failed build, unloadable library
            _failed = str(e)
            warnings.warn(
                f"normlab: could not build the C++ CPU kernels ({e}); falling back to the "
                "plain-torch reference path. Install a C++ compiler (g++/clang++) or set "
                "NORMLAB_KERNELS=reference to silence this.",
                UserWarning,
                stacklevel=3,
            )
            return None
    return _libs[key]


def build_variants(variants: list[tuple[int, bool]]) -> None:
    """Compile several variants concurrently (one compiler process each), then load them.

    Used to warm the cache (e.g. once before a test session); a no-op for cached variants.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [v for v in variants if not _target(*v)[0].exists()]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for f in [pool.submit(_compile, *v) for v in todo]:
                with contextlib.suppress(Exception):  # reported (once) by library() below
                    f.result()
    for v in variants:
        library(*v)
