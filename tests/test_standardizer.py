"""normlab.data.Standardizer against float64 NumPy over the concatenated data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab.data import Standardizer
from normlab.functional.moments import Moments


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-7, atol: float = 0.0
) -> None:
    # NumPy's comparison: torch.testing's first call imports torch.distributed (~4 s here).
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol, atol)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny reductions: a second OpenMP thread only adds synchronization on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_splits(rng: np.random.Generator, n: int) -> list[int]:
    """Cut points for np.split with empty (repeated cut) and size-1 batches guaranteed."""
    cuts = sorted(rng.integers(0, n + 1, size=6).tolist())
    return sorted([0, 0, 1, 2, *cuts, n, n])


def _oracle(x: np.ndarray, axes: tuple[int, ...], ddof: int = 0):
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    std = x64.std(axis=axes, ddof=ddof, keepdims=True)
    return mean, std, (x64 - mean) / std


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matches_numpy_at_large_offset(dtype, seed):
    rng = np.random.default_rng(seed)
    # 1e4 + noise of 0.01: E[x^2] - E[x]^2 in float32 has no correct digit here.
    x = (1e4 + 0.01 * rng.standard_normal((301, 7)) * rng.uniform(0.5, 3, 7)).astype(dtype)
    batches = np.split(x, _random_splits(rng, len(x)))
    assert any(len(b) == 0 for b in batches) and any(len(b) == 1 for b in batches)
    scaler = Standardizer()
    for batch in batches:
        scaler.partial_fit(batch)
    mean, std, expected = _oracle(x, (0,))
    np.testing.assert_allclose(scaler.mean.numpy(), mean[0], rtol=1e-14, atol=0)
    np.testing.assert_allclose(scaler.std.numpy(), std[0], rtol=1e-9)
    assert int(scaler.count) == len(x)
    out = scaler.transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    # Conditioning: |x| / std ~ 1e6, so even the float64 oracle's own mean carries ~1e-9 of
    # output error; float32 output is limited by its own rounding.
    tol = 1e-8 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)


def test_float32_transform_keeps_digits_a_rounded_mean_would_lose():
    rng = np.random.default_rng(3)
    x = (1e4 + 0.01 * rng.standard_normal((1000, 4))).astype(np.float32)
    scaler = Standardizer().fit(x)
    _, _, expected = _oracle(x, (0,))
    naive = (x - scaler.mean.numpy().astype(np.float32)) / scaler.std.numpy().astype(np.float32)
    # The float32-rounded mean is off by up to half an ulp of 1e4 (~5e-4 = 0.05 std) ...
    assert np.abs(naive - expected).max() > 1e-3
    # ... the split mean is not.
    assert np.abs(scaler.transform(x) - expected).max() < 2e-6


def test_fit_equals_partial_fit_and_reads_a_generator_once():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 3)) * [1.0, 5.0, 0.1] + [0.0, -3.0, 7.0]
    batches = np.array_split(x, 9)
    streamed = Standardizer().fit(b for b in batches)
    incremental = Standardizer()
    for b in batches:
        incremental.partial_fit(b)
    for name in ("count", "mean", "m2"):
        _assert_close(getattr(streamed, name), getattr(incremental, name))
    # fit starts over; a single array counts as one batch.
    refit = Standardizer().fit(x[:10]).fit(x)
    _assert_close(refit.mean, streamed.mean)
    assert int(refit.count) == 100


@pytest.mark.parametrize(
    ("dim", "axes"),
    [(1, (0, 2, 3)), ((1, 2), (0, 3)), (-1, (0, 1, 2)), ((1, 2, 3), (0,))],
)
def test_feature_dims_match_numpy_on_images(dim, axes):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 3, 4, 5)) * rng.uniform(0.5, 4, (1, 3, 1, 1)) + 2.0
    scaler = Standardizer(dim=dim)
    for batch in np.array_split(x, [0, 1, 4]):
        scaler.partial_fit(torch.from_numpy(batch))
    mean, std, expected = _oracle(x, axes)
    np.testing.assert_allclose(scaler.mean.numpy(), np.squeeze(mean, axes), rtol=1e-12)
    np.testing.assert_allclose(scaler.std.numpy(), np.squeeze(std, axes), rtol=1e-12)
    out = scaler(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_per_channel_on_float32_images_has_unit_stats():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 3, 8, 8, generator=gen) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    scaler = Standardizer(dim=1).fit(x.split(5))
    y = scaler(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    _assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    _assert_close(y.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("correction", [0, 1])
def test_correction_is_numpys_ddof(correction):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((20, 4))
    scaler = Standardizer(correction=correction).fit(np.array_split(x, 3))
    _, std, expected = _oracle(x, (0,), ddof=correction)
    np.testing.assert_allclose(scaler.std.numpy(), std[0], rtol=1e-12)
    np.testing.assert_allclose(scaler.transform(x), expected, atol=1e-12)


def test_constant_features_map_to_zero_and_back():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((50, 4))
    # 0.1 is not a float64 fixed point of summing and dividing: its mean comes out 1 ulp off and
    # the raw std is rounding noise (~1e-17), not 0.
    x[:, 1] = 0.1
    x[:, 2] = -3e5
    x[:, 3] = 0.0
    scaler = Standardizer().fit(np.array_split(x, 7))
    assert scaler.m2[1] > 0  # the premise: without the rounding bound this column would be O(1)
    y = scaler.transform(x)
    assert np.isfinite(y).all()
    assert (y[:, 1:] == 0).all()
    np.testing.assert_allclose(y[:, 0], _oracle(x[:, :1], (0,))[2][:, 0], atol=1e-12)
    assert (scaler.std[1:] == 0).all()
    np.testing.assert_allclose(scaler.inverse_transform(y), x, rtol=1e-12, atol=1e-12)


def test_single_sample_with_correction_is_constant_not_nan():
    scaler = Standardizer(correction=1).fit(torch.tensor([[1.0, 2.0]]))
    y = scaler(torch.tensor([[3.0, 4.0]]))
    assert torch.equal(y, torch.zeros(1, 2))


def test_inverse_transform_round_trips_and_keeps_kind():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64) * 3 + 100
    scaler = Standardizer().fit(x.split(10))
    _assert_close(scaler.inverse_transform(scaler.transform(x)), x, rtol=1e-12)
    x16 = x.float().numpy().astype(np.float16)
    out = scaler.transform(x16)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16


def test_transform_is_differentiable():
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    scaler = Standardizer().fit(x)
    xr = x.clone().requires_grad_(True)
    scaler(xr).sum().backward()
    expected = (1 / scaler.std).float().expand(3, 2)
    _assert_close(xr.grad, expected, rtol=1e-6)


def test_state_dict_round_trip_through_torch_save():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(40, 3, 4, 4, generator=gen) + 50
    model = torch.nn.Sequential(Standardizer(dim=1).fit(x), torch.nn.Conv2d(3, 2, 1))
    assert set(model.state_dict()) == {"0.count", "0.mean", "0.m2", "1.weight", "1.bias"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = torch.nn.Sequential(Standardizer(dim=1), torch.nn.Conv2d(3, 2, 1))
    fresh.load_state_dict(state)  # strict: keys and (adopted) shapes match
    assert fresh[0].num_features == (3,)
    assert torch.equal(fresh(x), model(x))
    pinned = Standardizer(num_features=3, dim=1)
    pinned.load_state_dict(model[0].state_dict())
    assert torch.equal(pinned(x), model[0](x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        Standardizer(num_features=4, dim=1).load_state_dict(model[0].state_dict())
    with pytest.raises(RuntimeError, match="feature dimension"):
        Standardizer(dim=(1, 2)).load_state_dict(model[0].state_dict())


def test_statistics_stay_float64_through_dtype_casts():
    x = torch.full((4, 2), 1e4) + torch.tensor([[0.0, 0.01], [0.01, 0.0], [0.02, 0.03], [0, 0]])
    model = torch.nn.Sequential(Standardizer().fit(x.double()), torch.nn.Linear(2, 1))
    mean = model[0].mean.clone()
    model.to(torch.bfloat16)
    assert model[1].weight.dtype == torch.bfloat16
    assert model[0].mean.dtype == torch.float64 and torch.equal(model[0].mean, mean)
    model.half()
    assert model[0].count.dtype == torch.float64 and torch.equal(model[0].mean, mean)


def test_empty_batches_before_data_and_repr():
    scaler = Standardizer(dim=1)
    scaler.partial_fit(torch.empty(0, 3, 2))
    assert not scaler.fitted and scaler.num_features == (3,)
    scaler.partial_fit(torch.ones(2, 3, 2))
    assert scaler.fitted
    assert "num_features=[3], dim=1, correction=0, count=4" in repr(scaler)
    scaler.reset_statistics()
    assert not scaler.fitted and scaler.num_features is None


# -- errors ------------------------------------------------------------------------------------


def test_transform_before_fit_raises():
    with pytest.raises(RuntimeError, match="before fit; call fit"):
        Standardizer().transform(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="before fit"):
        Standardizer().inverse_transform(np.zeros((2, 3)))


def test_feature_count_mismatch_raises_and_changes_nothing():
    scaler = Standardizer().fit(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    state = {k: v.clone() for k, v in scaler.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected feature shape \[3\].*got \[4\]"):
        scaler.partial_fit(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected feature shape \[3\]"):
        scaler.transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="feature shape"):
        Standardizer(num_features=2).fit([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="feature shape"):
        Standardizer().fit([torch.zeros(2, 3), torch.zeros(2, 4)])
    for key, value in scaler.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.int64), "floating-point input, got dtype torch.int64"),
        (np.zeros((2, 3), dtype=np.int32), "float16/float32/float64 array, got dtype int32"),
        (torch.zeros(2, 3, dtype=torch.complex64), "complex input"),
        (np.zeros((2, 3), dtype=np.complex128), "complex input.*view_as_real"),
        ([[1.0, 2.0]], "torch.Tensor or numpy.ndarray, got list"),
        ((torch.zeros(2, 3), torch.zeros(2)), r"got tuple.*\(x for x, _ in loader\)"),
    ],
)
def test_non_float_input_raises(data, match):
    with pytest.raises(TypeError, match=match):
        Standardizer().partial_fit(data)
    fitted = Standardizer().fit(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=match):
        fitted.transform(data)


def test_empty_fit_raises_and_leaves_the_module_unfitted():
    for batches in ([], [torch.empty(0, 3)], [np.empty((0, 3)), np.empty((0, 3))]):
        scaler = Standardizer()
        with pytest.raises(ValueError, match="no samples to fit"):
            scaler.fit(batches)
        assert not scaler.fitted and scaler.num_features is None


def test_nan_batch_raises():
    x = torch.ones(4, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        Standardizer().partial_fit(x)


@pytest.mark.parametrize(
    ("kwargs", "data", "error", "match"),
    [
        ({"dim": 2}, torch.zeros(4, 3), ValueError, "dim=2 is out of range"),
        ({"dim": (1, -1)}, torch.zeros(4, 3), ValueError, "same dimension twice"),
        ({"dim": (0, 1)}, torch.zeros(4, 3), ValueError, "no sample dimension"),
        ({}, torch.zeros(3), ValueError, r"no sample dimension.*x\[None\]"),
        ({}, torch.zeros(4, 0), ValueError, "positive size"),
    ],
)
def test_bad_feature_dims_raise(kwargs, data, error, match):
    with pytest.raises(error, match=match):
        Standardizer(**kwargs).partial_fit(data)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="correction=-1"):
        Standardizer(correction=-1)
    with pytest.raises(TypeError, match="dim must be"):
        Standardizer(dim="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one positive size per feature dimension"):
        Standardizer(num_features=(3, 4), dim=1)


# -- property: streaming merge == two-pass -------------------------------------------------------


@given(
    data=st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=64), min_size=3, max_size=3),
        min_size=1,
        max_size=40,
    ),
    offset=st.sampled_from([0.0, 1e4, -1e6]),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_streaming_merge_equals_two_pass(data, offset, cuts):
    # Example count, deadline and derandomization come from the "normlab" profile (conftest.py).
    x = np.asarray(data, dtype=np.float64) + offset
    scaler = Standardizer()
    for batch in np.split(x, sorted(c for c in cuts if c <= len(x))):
        scaler.partial_fit(batch)
    mean = x.mean(0)
    m2 = ((x - mean) ** 2).sum(0)
    scale = np.abs(x).max() + 1.0
    np.testing.assert_allclose(scaler.mean.numpy(), mean, rtol=0, atol=1e-13 * scale)
    # M2 is a sum of len(x) squares of deviations; its rounding scales with the data's spread.
    spread = np.ptp(x, axis=0).max() + 1e-300
    atol = 1e-12 * scale * spread * len(x)
    np.testing.assert_allclose(scaler.m2.numpy(), m2, rtol=1e-9, atol=atol)
    # The same answer as one Moments over the concatenation.
    whole = Moments.of(torch.from_numpy(x), [0])
    _assert_close(scaler.mean, whole.mean, rtol=0, atol=1e-13 * scale)
