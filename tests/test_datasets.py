"""Data loaders: digits split, image reshaping, MNIST IDX and CIFAR-10 batches in their real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.lab.datasets import (
    DatasetError,
    as_images,
    load_cifar10,
    load_digits_split,
    load_mnist,
)


def test_digits_split_shapes_types_and_range() -> None:
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    assert x_train.shape == (1297, 64) and x_test.shape == (500, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert set(y_test.tolist()) == set(range(10))
    # The split is a partition of the 1797 images.
    assert len(y_train) + len(y_test) == 1797


def test_digits_split_deterministic_by_seed() -> None:
    a = load_digits_split(seed=3, n_test=100)
    b = load_digits_split(seed=3, n_test=100)
    c = load_digits_split(seed=4, n_test=100)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2])
    assert a[2].shape == (100, 64)


@pytest.mark.parametrize("n_test", [0, 1797, -1])
def test_digits_split_rejects_bad_n_test(n_test: int) -> None:
    with pytest.raises(ValueError, match="n_test"):
        load_digits_split(n_test=n_test)


def test_as_images() -> None:
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    img = as_images(x)
    assert img.shape == (2, 1, 8, 8)
    assert img[1, 0, 0, 1] == x[1, 1]
    assert as_images(np.zeros((3, 3 * 4 * 4)), channels=3).shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="square"):
        as_images(torch.zeros(2, 65))
    with pytest.raises(ValueError, match="flat"):
        as_images(torch.zeros(2, 1, 8, 8))


# ---------------------------------------------------------------------------- MNIST


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path, gz)
    x_train, y_train, x_test, y_test = load_mnist(tmp_path)
    assert x_train.shape == (5, 784) and x_test.shape == (3, 784)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    expected = arrays["train-images-idx3-ubyte"].reshape(5, -1) / 255.0
    np.testing.assert_allclose(x_train.numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert as_images(x_train).shape == (5, 1, 28, 28)


def test_load_mnist_missing_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_mnist(tmp_path / "nope")


def test_load_mnist_truncated_and_wrong_magic(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="does not match"):
        load_mnist(tmp_path)
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(DatasetError, match="magic"):
        load_mnist(tmp_path)


def test_load_mnist_corrupt_gzip_and_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(4))))
    with pytest.raises(DatasetError, match="5 train_images but 4 train_labels"):
        load_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The official layout: pickled dicts with bytes keys, uint8 data (N, 3072), list labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    written = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        batch[b"filenames"] = [f"img{i}.png".encode() for i in range(n)]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    return written


def test_load_cifar10_reads_batches(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        x_train, y_train, x_test, y_test = load_cifar10(root)
        assert x_train.shape == (20, 3072) and x_test.shape == (4, 3072)
        assert y_train.dtype == torch.int64
        np.testing.assert_allclose(
            x_train[4:8].numpy(), written["data_batch_2"][0] / 255.0, rtol=1e-6
        )
        assert y_test.tolist() == written["test_batch"][1]
    img = as_images(x_test, channels=3)
    # Channel-major rows: the first 1024 values are the red plane.
    assert img.shape == (4, 3, 32, 32)
    assert img[0, 1, 0, 0] == x_test[0, 1024]


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("owned",))


def test_load_cifar10_refuses_foreign_globals(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(
        DatasetError, match=r"refusing to load global (__builtin__|builtins)\.print"
    ):
        load_cifar10(tmp_path)


def test_load_cifar10_missing_and_corrupt(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}, 2))
    with pytest.raises(DatasetError, match="3072"):
        load_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch not found"):
        load_cifar10(tmp_path)
