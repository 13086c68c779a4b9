"""Lazy, cached build of the C++ CPU kernels (``csrc/normlab_cpu.cpp``), loaded with ctypes.

Nothing is compiled at ``import normlab``. The first call that needs a kernel variant (one storage
dtype, plain or with a fused activation) compiles it with the system C++ compiler against torch's
own headers (only ``ATen/Parallel.h``, so a variant takes a few seconds) and caches the shared
library on disk, keyed by the source, the flags, the torch version and the CPU; later processes
load it in milliseconds. Builds write to a temporary file, flush it to the disk and rename it into
place, then write a stamp (size and SHA-256) the same way; a library is loaded only when it
matches its stamp, and rebuilt otherwise, so neither a concurrent process (pytest-xdist workers)
nor a file damaged later (a partial copy, power loss) is ever mapped. A variant that cannot be
built runs the reference; the other variants are unaffected.

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
# Why a variant is unavailable, per variant: one that fails (say float16 on an old compiler)
# leaves the others working.
_failed: dict[tuple[int, bool], str] = {}
_warned: set[str] = set()  # causes already warned about (once per process each)
_STALE_TMP_SECONDS = 3600  # a temporary library this old was left by a build that was killed

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


class CacheNotWritable(RuntimeError):
    """The kernel cache directory cannot be written (read-only, full, or no permission)."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{h.hexdigest()} {path.stat().st_size}"


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def intact(path: Path) -> bool:
    """Whether a cached library is whole: its size and SHA-256 match the stamp written after it
    reached the disk. A file cut short (a partial copy, a full disk, power loss before the data
    was written) would kill the process that maps it with SIGBUS; garbage would fail to load."""
    try:
        return _stamp(path).read_text().strip() == _digest(path)
    except OSError:
        return False


def _write_durably(path: Path, data: bytes | None = None, source: str | None = None) -> None:
    """Put `data` (or the file `source`) at `path` atomically and on the disk: written to a
    temporary file, flushed with fsync, renamed into place, the directory flushed."""
    if source is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data or b"")
            f.flush()
            os.fsync(f.fileno())
    else:
        tmp = source
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_stale_temporaries(folder: Path) -> None:
    import time

    now = time.time()
    for tmp in folder.glob("tmp*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()


def _compile(dtype_code: int, act: bool) -> Path:
    path, cmd = _target(dtype_code, act)
    if path.exists() and intact(path):
        return path
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {cmd[0]!r}; set CXX)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise CacheNotWritable(
            f"the kernel cache {path.parent} is not writable ({e.strerror or e}); set "
            "NORMLAB_CACHE_DIR to a writable folder"
        ) from e
    _remove_stale_temporaries(path.parent)
    try:
        proc = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiler failed:\n{proc.stderr[-2000:]}")
        # The library, then its stamp, each whole on the disk before it is visible: other
        # processes see no library, an unstamped one (which they rebuild) or a whole one.
        _write_durably(path, source=tmp)
        _write_durably(_stamp(path), _digest(path).encode())
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
    """False once a build has failed (that variant, and only it, runs the reference path)."""
    return not _failed


def library(dtype_code: int, act: bool = False) -> ctypes.CDLL | None:
    """The loaded library for one variant, building it on first use; None if unavailable."""
    key = (dtype_code, act)
    lib = _libs.get(key)
    if lib is not None or key in _failed:
        return lib
    with _lock:
        if key in _libs or key in _failed:
            return _libs.get(key)
        try:
            _libs[key] = _load(_compile(dtype_code, act))
        except Exception as e:  # no compiler, failed build, unloadable library, unwritable cache
            _failed[key] = str(e)
            _warn(e)
            return None
    return _libs[key]


def _warn(error: Exception) -> None:
    if isinstance(error, CacheNotWritable):
        cause, advice = "cache", "Set NORMLAB_CACHE_DIR to a writable folder"
    elif "no C++ compiler" in str(error):
        cause, advice = "compiler", "Install a C++ compiler (g++/clang++)"
    else:
        cause, advice = str(error), "Report the error above"
    if cause in _warned:
        return
    _warned.add(cause)
    warnings.warn(
        f"normlab: could not build the C++ CPU kernels ({error}); falling back to the "
        f"plain-torch reference path. {advice}, or set NORMLAB_KERNELS=reference to silence "
        "this.",
        UserWarning,
        stacklevel=4,
    )


def build_variants(variants: list[tuple[int, bool]]) -> None:
    """Compile several variants concurrently (one compiler process each), then load them.

    Used to warm the cache (e.g. once before a test session); a no-op for cached variants.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = [v for v in variants if not intact(_target(*v)[0])]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for f in [pool.submit(_compile, *v) for v in todo]:
                with contextlib.suppress(Exception):  # reported (once) by library() below
                    f.result()
    for v in variants:
        library(*v)
