"""Real data for the lab: scikit-learn's bundled digits, and MNIST / CIFAR-10 from local files.

Every loader returns ``(x_train, y_train, x_test, y_test)`` as torch tensors: features flat,
``float32`` in ``[0, 1]`` with shape ``(N, D)``, labels ``int64`` with shape ``(N,)``. Use
:func:`as_images` to get ``(N, C, S, S)`` for convolutional models.

Nothing is downloaded: digits ships with scikit-learn (1797 real 8x8 scans of handwritten digits);
MNIST and CIFAR-10 are read from a folder the user gives, in their official formats.

Note:
    The CIFAR-10 "python version" batches are pickles. Unpickling runs code chosen by the file,
    so :func:`load_cifar10` uses a restricted unpickler that resolves only the few names the
    official format needs (numpy's array reconstructor, ``ndarray``, ``dtype`` and a latin-1
    ``bytes`` constructor); any other global in the file fails with :class:`DatasetError`.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DatasetError",
    "as_images",
    "load_cifar10",
    "load_digits_split",
    "load_mnist",
]

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DatasetError(ValueError):
    """A data set file is missing, truncated or not in the expected format."""


# --------------------------------------------------------------------------------------------
# digits


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    # Pixel values are integers 0..16 in the bundled scans.
    x = (np.asarray(data.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_split(seed: int = 0, n_test: int = 500) -> Split:
    """scikit-learn's digits (1797 real 8x8 images), shuffled by `seed` and split train/test.

    Args:
        seed: seed of the shuffle; the same seed gives the same split on every machine.
        n_test: number of test examples (the first ``n_test`` after the shuffle); the rest is
            the training set. Default 500 (1297 train / 500 test).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``float32`` features in ``[0, 1]`` of shape
        ``(N, 64)`` and ``int64`` labels 0..9.

    Raises:
        ValueError: if ``n_test`` leaves no training or no test example.
    """
    x, y = _digits_arrays()
    if not 0 < n_test < len(x):
        raise ValueError(f"load_digits_split: n_test={n_test} must be in 1..{len(x) - 1}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
    xt = torch.from_numpy(x.copy())[perm]
    yt = torch.from_numpy(y.copy())[perm]
    return xt[n_test:], yt[n_test:], xt[:n_test], yt[:n_test]


def as_images(x: torch.Tensor | np.ndarray, channels: int = 1) -> torch.Tensor:
    """Reshape flat features ``(N, C*S*S)`` (channel-major) into images ``(N, C, S, S)``.

    Args:
        x: flat features, e.g. digits ``(N, 64)``, MNIST ``(N, 784)``, CIFAR-10 ``(N, 3072)``.
        channels: number of channels ``C`` (1 for digits/MNIST, 3 for CIFAR-10).

    Returns:
        A view of ``x`` (a tensor) with shape ``(N, C, S, S)``.

    Raises:
        ValueError: if ``x`` is not 2-D or its width is not ``channels`` times a square.
    """
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"as_images: expected flat features (N, D), got shape {tuple(t.shape)}")
    width = t.shape[1]
    side = math.isqrt(width // channels) if channels > 0 and width % channels == 0 else 0
    if side == 0 or channels * side * side != width:
        raise ValueError(
            f"as_images: width {width} is not channels={channels} times a square image; "
            "pass the right `channels`"
        )
    return t.reshape(t.shape[0], channels, side, side)


# --------------------------------------------------------------------------------------------
# MNIST (IDX files)

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_file(root: Path, name: str) -> Path:
    """`name` or `name.gz` in `root` or its usual subfolders; the dotted variant is accepted too."""
    names = [name, name.replace("-idx", ".idx")]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for candidate in names:
            for suffix in ("", ".gz"):
                path = folder / (candidate + suffix)
                if path.is_file():
                    return path
    raise DatasetError(f"MNIST: {name} (or {name}.gz) not found in {root}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), ndim big-endian int32 sizes, data."""
    raw = _read_bytes(path)
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zero, dtype_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or file_ndim != ndim:
        raise DatasetError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions "
            f"(magic {raw[:4].hex()})"
        )
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + math.prod(dims)
    if min(dims) < 0 or len(raw) != expected:
        raise DatasetError(
            f"{path}: size {len(raw)} bytes does not match dimensions {dims} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_pair(root: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = _read_idx(_find_file(root, _MNIST_FILES[images]), 3)
    y = _read_idx(_find_file(root, _MNIST_FILES[labels]), 1)
    if len(x) != len(y):
        raise DatasetError(f"MNIST: {len(x)} {images} but {len(y)} {labels} in {root}")
    if y.size and int(y.max()) > 9:
        raise DatasetError(f"MNIST: label {int(y.max())} out of range 0..9 in {root}")
    xt = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)
    return xt, torch.from_numpy(y.astype(np.int64))


def load_mnist(path: str | Path) -> Split:
    """MNIST from its four official IDX files (optionally gzipped) in the folder `path`.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each possibly ``.gz``; the
    ``train-images.idx3-ubyte`` spelling too) in `path`, `path/raw` or `path/MNIST/raw`
    (torchvision's layout).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``float32`` in ``[0, 1]`` of shape
        ``(N, rows*cols)`` (784 for MNIST) and ``int64`` labels.

    Raises:
        DatasetError: a file is missing, truncated, or not an IDX file of the right kind.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"MNIST: {root} is not a folder")
    x_train, y_train = _mnist_pair(root, "train_images", "train_labels")
    x_test, y_test = _mnist_pair(root, "test_images", "test_labels")
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles `bytes` at protocol < 3 as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise DatasetError(f"unexpected encoding {encoding!r} in pickle")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals an official CIFAR batch needs; everything else is refused."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load global {module}.{name}: not part of the CIFAR-10 format"
            ) from None


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10: {path.name} not found in {path.parent}")
    raw = _read_bytes(path)
    try:
        # encoding="bytes": the official batches were written by Python 2 (keys are b"data").
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{path}: 'data' is not a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' has {data.shape[1]} columns, expected 3072")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DatasetError(f"{path}: 'labels' is not a list of {len(data)} integers")
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{path}: labels out of range 0..9")
    return data, y


def load_cifar10(path: str | Path) -> Split:
    """CIFAR-10 from its official python batches (``data_batch_1..5``, ``test_batch``).

    Args:
        path: the extracted ``cifar-10-batches-py`` folder, or the folder that contains it.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``float32`` in ``[0, 1]`` of shape ``(N, 3072)``
        (channel-major: ``as_images(x, channels=3)`` gives ``(N, 3, 32, 32)``) and ``int64``
        labels.

    Raises:
        DatasetError: a batch is missing or corrupt, or the file holds anything beyond the
            official format (see the module's note on pickles).
    """
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10: {root} is not a folder")
    train = [_load_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _load_batch(root / "test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])

    def to_float(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32) / 255.0)

    return (
        to_float(x_train),
        torch.from_numpy(y_train),
        to_float(x_test),
        torch.from_numpy(y_test),
    )
