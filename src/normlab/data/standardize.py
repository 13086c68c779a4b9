r"""Streaming input standardization: zero mean and unit variance per feature, fitted in one pass.

For each feature :math:`j` over all :math:`n` samples seen,

.. math::
    \mu_j = \tfrac1n \sum_i x_{ij}, \qquad
    \sigma_j^2 = \tfrac{1}{n - c} \sum_i (x_{ij} - \mu_j)^2, \qquad
    y_{ij} = (x_{ij} - \mu_j) / \sigma_j,

with ``correction`` :math:`c = 0` by default (NumPy's ``std(ddof=0)`` and scikit-learn's
``StandardScaler``). LeCun et al. 1998 ("Efficient BackProp", Sec. 4.3) give the reason to do it:
inputs that are centred and of similar scale keep the error surface well conditioned.

Numerics:
    * Each batch is reduced to ``(count, mean, M2)`` in float64 by :class:`~normlab.functional.
      moments.Moments` and merged with Chan, Golub & LeVeque's (1979) pairwise update. The merge is
      exact in real arithmetic for any split, empty batches included, and never forms
      :math:`E[x^2] - E[x]^2`, which loses every digit at an offset of 1e4 with noise of 0.01.
    * ``transform`` works in the input's compute dtype (float32 for float16/bfloat16/float32), so
      it runs at full speed on an accelerator. To keep a large mean from eating the result, the
      float64 mean is split as ``mean_hi + mean_lo`` (both in the compute dtype) and subtracted in
      two steps: ``x - mean_hi`` is exact for ``x`` near the mean (Sterbenz's lemma), so the output
      is as accurate as a float64 subtraction rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from normlab.functional.moments import Moments, compute_dtype

__all__ = ["Standardizer"]

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_EPS64 = torch.finfo(torch.float64).eps


class Standardizer(nn.Module):
    r"""Per-feature zero-mean, unit-variance scaling, fitted by streaming over batches.

    Fit once with :meth:`fit` (an iterable of batches, read in a single pass) or incrementally with
    :meth:`partial_fit`, then :meth:`transform` / :meth:`inverse_transform`. As an ``nn.Module``,
    ``forward`` is ``transform``, so it can sit at the front of a model, and its statistics are
    buffers that travel with the model's ``state_dict``, ``.to(device)`` and
    ``torch.save``/``torch.load(weights_only=True)``. See the module docstring for the formula.

    Args:
        num_features: the feature shape (``int`` for one feature dim). Optional: when None it is
            taken from the first batch, and :meth:`load_state_dict` accepts any shape.
        dim: the dimension(s) that index features; each feature keeps its own statistics and every
            other dimension is averaged over. The default ``-1`` is per column for ``(N, F)`` data
            and per feature for ``(N, T, F)``; ``dim=1`` is per channel for ``(N, C, H, W)``
            images; ``dim=(1, 2, 3)`` is per pixel and channel.
        correction: Bessel-style correction of the variance (0: biased, NumPy's ``ddof=0`` and
            scikit-learn's choice; 1: unbiased, ``torch.std``'s default).

    Shape:
        Input: any shape with at least one dimension besides ``dim``; the sizes along ``dim`` must
        equal ``num_features``. Output: the same shape, dtype and kind (a NumPy array in, a NumPy
        array out).

    Note:
        A constant feature has no scale to divide by: it maps to 0, and ``inverse_transform``
        maps it back to its constant. "Constant" means a standard deviation of at most
        ``count * eps64 * |mean|``, the worst-case rounding error of a float64 mean of ``count``
        values (0.1 averaged over ten copies is not exactly 0.1 in float64); dividing by that
        rounding noise would turn it into values of order 1. A feature with fewer than
        ``correction + 1`` samples also counts as constant.

    Note:
        The statistics are float64 buffers and stay float64 through ``model.half()``,
        ``model.float()`` or ``model.to(dtype)`` (only device moves apply to them): rounding a mean
        of 1e4 to bfloat16 would shift every output by up to 16 standard deviations of a feature
        with std 1.

    Example:
        >>> scaler = Standardizer().fit(batches)         # one pass over an iterable
        >>> model = torch.nn.Sequential(scaler, torch.nn.Linear(64, 10))
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        dim: int | Sequence[int] = -1,
        correction: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self._dims_spec = _as_dims(dim)
        if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
            raise ValueError(
                f"Standardizer: correction={correction!r} must be a non-negative int "
                "(0 for the biased std, NumPy's ddof=0; 1 for the unbiased one)"
            )
        self.correction = correction
        self._pinned = num_features is not None
        shape = _as_feature_shape(num_features, len(self._dims_spec))
        self.num_features: tuple[int, ...] | None = shape
        # Placeholders of shape (0,) until the feature shape is known (first batch or a load).
        stat_shape = shape if shape is not None else (0,)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(stat_shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(stat_shape, dtype=torch.float64))

    # ------------------------------------------------------------------------------------------
    # fitting

    def reset_statistics(self) -> None:
        """Forget every sample seen; an inferred feature shape is forgotten too."""
        if not self._pinned:
            self.num_features = None
            device = self.mean.device
            self.mean = torch.zeros((0,), dtype=torch.float64, device=device)
            self.m2 = torch.zeros((0,), dtype=torch.float64, device=device)
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor | np.ndarray] | Tensor | np.ndarray) -> Standardizer:
        """Fit from scratch in one pass over ``batches``; returns ``self``.

        Args:
            batches: an iterable of tensors or arrays (a ``DataLoader``'s inputs, a generator,
                a list), read once; a single tensor or array counts as one batch. Empty batches
                are allowed.

        Raises:
            ValueError: if no batch holds a sample, if batches disagree on the feature shape, or
                if a batch holds NaN or inf. The module is unchanged when ``fit`` raises.
            TypeError: for a batch that is not a real floating-point tensor or array.
        """
        if isinstance(batches, (Tensor, np.ndarray)):
            batches = [batches]
        shape = self.num_features if self._pinned else None
        total: Moments | None = None
        for batch in batches:
            batch_moments, shape = self._batch_moments("fit", batch, shape)
            total = batch_moments if total is None else total.merge(batch_moments)
        if total is None or float(total.count) == 0:
            raise ValueError(
                "Standardizer.fit: no samples to fit (no batches, or only empty ones); "
                "pass an iterable with at least one non-empty batch"
            )
        self._commit(shape, total)
        return self

    @torch.no_grad()
    def partial_fit(self, batch: Tensor | np.ndarray) -> Standardizer:
        """Add one batch to the statistics (exact Chan merge); returns ``self``.

        Raises:
            ValueError: on a feature-shape mismatch with earlier data, or NaN/inf in the batch.
            TypeError: for input that is not a real floating-point tensor or array.
        """
        batch_moments, shape = self._batch_moments("partial_fit", batch, self.num_features)
        current = Moments(self.count, self.mean, self.m2) if self.num_features else None
        merged = batch_moments if current is None else current.merge(batch_moments)
        self._commit(shape, merged)
        return self

    def _batch_moments(
        self, op: str, batch: Any, shape: tuple[int, ...] | None
    ) -> tuple[Moments, tuple[int, ...]]:
        x, _ = _to_tensor(op, batch)
        dims = self._feature_dims(op, x)
        shape = self._check_features(op, x, dims, shape)
        sample_dims = [d for d in range(x.dim()) if d not in dims]
        batch_moments = Moments.of(x.detach(), sample_dims)
        # Reduce where the data lives, merge where the buffers live: only the small per-feature
        # summaries cross devices.
        device = self.count.device
        batch_moments = Moments(
            batch_moments.count.to(device),
            batch_moments.mean.to(device),
            batch_moments.m2.to(device),
        )
        # Checked on the per-batch statistics, not the data: one bad batch would otherwise turn
        # every statistic NaN for the rest of the stream, silently.
        if not (
            torch.isfinite(batch_moments.mean).all() and torch.isfinite(batch_moments.m2).all()
        ):
            raise ValueError(
                f"Standardizer.{op}: the batch holds NaN or inf values; drop or impute them before "
                "fitting (one such value makes its feature's statistics NaN for good)"
            )
        return batch_moments, shape

    def _commit(self, shape: tuple[int, ...], stats: Moments) -> None:
        device = self.count.device
        self.num_features = shape
        self.count = stats.count.to(device=device, dtype=torch.float64).reshape(())
        self.mean = stats.mean.to(device=device, dtype=torch.float64).reshape(shape)
        self.m2 = stats.m2.to(device=device, dtype=torch.float64).reshape(shape)

    # ------------------------------------------------------------------------------------------
    # statistics

    @property
    def fitted(self) -> bool:
        """True once at least one sample has been seen (or a fitted state loaded)."""
        return self.num_features is not None and float(self.count) > 0

    @property
    def var(self) -> Tensor:
        """Per-feature variance (float64) with this module's ``correction``."""
        return Moments(self.count, self.mean, self.m2).var(self.correction)

    @property
    def std(self) -> Tensor:
        """Per-feature standard deviation (float64); 0 for constant features."""
        return torch.where(self._constant(), torch.zeros_like(self.mean), self.var.sqrt())

    def _constant(self) -> Tensor:
        bound = self.count * _EPS64 * self.mean.abs()
        biased_var = self.m2 / self.count.clamp_min(1)
        return (biased_var <= bound.square()) | (self.count <= self.correction)

    # ------------------------------------------------------------------------------------------
    # transforms

    def transform(self, x: ArrayT) -> ArrayT:
        """Standardize ``x``: ``(x - mean) / std`` per feature, 0 for constant features.

        Differentiable with respect to a tensor input. Returns the input's kind and dtype.

        Raises:
            RuntimeError: before any sample was fitted.
            ValueError: if the sizes along ``dim`` differ from the fitted feature shape.
            TypeError: for input that is not a real floating-point tensor or array.
        """
        return self._apply_affine("transform", x, inverse=False)

    def inverse_transform(self, y: ArrayT) -> ArrayT:
        """Undo :meth:`transform`: ``y * std + mean`` (constant features map back to their mean).

        Raises:
            As :meth:`transform`.
        """
        return self._apply_affine("inverse_transform", y, inverse=True)

    def forward(self, x: ArrayT) -> ArrayT:
        """Same as :meth:`transform`, so the module can open a model."""
        return self.transform(x)

    def _apply_affine(self, op: str, data: ArrayT, inverse: bool) -> ArrayT:
        x, from_numpy = _to_tensor(op, data)
        if not self.fitted:
            raise RuntimeError(
                f"Standardizer.{op}: called before fit; call fit(batches) or partial_fit(batch) "
                "first, or load_state_dict() a fitted state"
            )
        dims = self._feature_dims(op, x)
        self._check_features(op, x, dims, self.num_features)
        view = [x.shape[d] if d in dims else 1 for d in range(x.dim())]
        cdtype = compute_dtype(x.dtype)
        mean = self.mean.to(x.device)
        mean_hi = mean.to(cdtype)
        mean_lo = (mean - mean_hi.to(torch.float64)).to(cdtype)
        mean_hi, mean_lo = mean_hi.reshape(view), mean_lo.reshape(view)
        std = self.std.to(x.device)
        xc = x.to(cdtype)
        if inverse:
            out = (xc * std.to(cdtype).reshape(view) + mean_lo) + mean_hi
        else:
            invstd = torch.where(std > 0, std.reciprocal(), torch.zeros_like(std))
            out = ((xc - mean_hi) - mean_lo) * invstd.to(cdtype).reshape(view)
        out = out.to(x.dtype)
        return out.numpy() if from_numpy else out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------
    # shapes

    def _feature_dims(self, op: str, x: Tensor) -> list[int]:
        ndim = x.dim()
        for d in self._dims_spec:
            if not -ndim <= d < ndim:
                raise ValueError(
                    f"Standardizer.{op}: dim={self.dim!r} is out of range for a {ndim}-D input of "
                    f"shape {list(x.shape)}; pass dim= naming existing feature dimensions"
                )
        dims = sorted(d % ndim for d in self._dims_spec)
        if len(set(dims)) != len(dims):
            raise ValueError(
                f"Standardizer.{op}: dim={self.dim!r} names the same dimension twice for a "
                f"{ndim}-D input; list each feature dimension once"
            )
        if len(dims) == ndim:
            raise ValueError(
                f"Standardizer.{op}: input of shape {list(x.shape)} has no sample dimension "
                f"besides the feature dims {dims}; add one, e.g. x[None] for a single sample"
            )
        return dims

    def _check_features(
        self, op: str, x: Tensor, dims: list[int], shape: tuple[int, ...] | None
    ) -> tuple[int, ...]:
        got = tuple(x.shape[d] for d in dims)
        if shape is None:
            if 0 in got:
                raise ValueError(
                    f"Standardizer.{op}: input of shape {list(x.shape)} has no features along "
                    f"dim {dims}; features must have a positive size"
                )
            return got
        if got != shape:
            raise ValueError(
                f"Standardizer.{op}: expected feature shape {list(shape)} along dim {dims}, got "
                f"{list(got)} (input shape {list(x.shape)}); pass data with the features it was "
                "fitted on, or fit a new Standardizer (or set dim= to the feature dimensions)"
            )
        return shape

    # ------------------------------------------------------------------------------------------
    # nn.Module plumbing

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Standardizer:
        # Let device moves through but keep the float64 statistics float64 (see the class Note).
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in saved.items():
            moved = self._buffers[name]
            assert moved is not None
            if moved.dtype != buf.dtype:
                self._buffers[name] = buf.to(device=moved.device)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # An unpinned Standardizer adopts the saved feature shape, so Standardizer(dim=...) can
        # load any fitted state; a pinned one lets torch report the size mismatch.
        key = prefix + "mean"
        if not self._pinned and isinstance(state_dict.get(key), Tensor):
            shape = tuple(state_dict[key].shape)
            if len(shape) != len(self._dims_spec) and shape != (0,):
                error_msgs.append(
                    f"Standardizer: the saved statistics have feature shape {list(shape)} but "
                    f"dim={self.dim!r} names {len(self._dims_spec)} feature dimension(s); "
                    "construct the Standardizer with the dim it was saved with"
                )
                return
            device = self.mean.device
            self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
            self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)
            self.num_features = None if shape == (0,) else shape
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        features = None if self.num_features is None else list(self.num_features)
        return (
            f"num_features={features}, dim={self.dim!r}, correction={self.correction}, "
            f"count={int(self.count)}"
        )


def _as_dims(dim: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(dim, int) and not isinstance(dim, bool):
        return (dim,)
    try:
        dims = tuple(dim)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"Standardizer: dim must be an int or a sequence of ints, got {dim!r}"
        ) from None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(
            f"Standardizer: dim must be an int or a non-empty sequence of ints, got {dim!r}"
        )
    return dims


def _as_feature_shape(
    num_features: int | Sequence[int] | None, num_dims: int
) -> tuple[int, ...] | None:
    if num_features is None:
        return None
    if isinstance(num_features, int) and not isinstance(num_features, bool):
        shape: tuple[int, ...] = (num_features,)
    else:
        shape = tuple(num_features)
    if len(shape) != num_dims or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(
            f"Standardizer: num_features={num_features!r} must give one positive size per "
            f"feature dimension ({num_dims} named by dim)"
        )
    return shape


def _to_tensor(op: str, data: Any) -> tuple[Tensor, bool]:
    """A floating tensor view of ``data`` and whether it came from NumPy."""
    if isinstance(data, np.ndarray):
        if data.dtype.type not in _NUMPY_FLOATS:
            if np.iscomplexobj(data):
                raise TypeError(_complex_message(op, data.dtype))
            raise TypeError(
                f"Standardizer.{op}: expected a float16/float32/float64 array, got dtype "
                f"{data.dtype}; convert it first, e.g. x.astype(np.float32)"
            )
        # torch.from_numpy shares memory but refuses negative strides and warns on read-only
        # arrays; copying only in those cases keeps the common path free.
        arr = np.ascontiguousarray(data)
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr), True
    if not isinstance(data, Tensor):
        hint = (
            " (for a DataLoader of (input, target) pairs, pass (x for x, _ in loader))"
            if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor)
            else ""
        )
        raise TypeError(
            f"Standardizer.{op}: expected a torch.Tensor or numpy.ndarray, got "
            f"{type(data).__name__}; convert it first, e.g. torch.as_tensor(x){hint}"
        )
    if data.is_complex():
        raise TypeError(_complex_message(op, data.dtype))
    if not data.is_floating_point():
        raise TypeError(
            f"Standardizer.{op}: expected a floating-point input, got dtype {data.dtype}; "
            "convert it first, e.g. x.float()"
        )
    return data, False


def _complex_message(op: str, dtype: Any) -> str:
    return (
        f"Standardizer.{op}: complex input (dtype {dtype}) is not supported: a complex feature "
        "has no single real mean and std; standardize the real and imaginary parts as separate "
        "features, e.g. torch.view_as_real(x) with dim=(-2, -1)"
    )
