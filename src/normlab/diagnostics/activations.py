"""Activation statistics of one layer: mean, std, percentiles, saturated fraction.

What Ioffe & Szegedy (2015, Fig. 1) plot to show internal covariate shift is the {15, 50, 85}th
percentiles of a sigmoid's input over training; Glorot & Bengio (2010) track the saturated
fraction of sigmoid/tanh units. :class:`ActivationStats` measures both, streamed over any number
of :meth:`~ActivationStats.update` calls (one per forward call of the layer, or per probe batch).

Saturation threshold:
    A sigmoid or tanh output is *saturated* when it lies within ``SATURATION_MARGIN`` (1%) of the
    output range from one of its bounds: sigmoid ``y < 0.01`` or ``y > 0.99``, tanh ``|y| > 0.98``.
    There the local slope is below 4% of its peak (sigmoid: ``y(1-y) < 0.0099`` vs 0.25 at 0;
    tanh: ``1 - y^2 < 0.0396`` vs 1), so gradients through the unit are damped at least 25-fold.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab.diagnostics._util import SATURATING
from normlab.functional.moments import Moments, moments

__all__ = [
    "DEFAULT_PERCENTILES",
    "SATURATION_MARGIN",
    "ActivationStats",
    "percentiles",
    "saturation_bounds",
]

#: The percentiles of Ioffe & Szegedy's Figure 1.
DEFAULT_PERCENTILES: tuple[float, ...] = (15.0, 50.0, 85.0)
#: Fraction of the output range next to a bound that counts as saturated (see module docstring).
SATURATION_MARGIN = 0.01


def saturation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The (low, high) thresholds outside which `module`'s outputs count as saturated, or None if
    `module` is not a saturating activation (``nn.Sigmoid``, ``nn.Tanh``)."""
    for kind, (lo, hi) in SATURATING.items():
        if isinstance(module, kind):
            margin = SATURATION_MARGIN * (hi - lo)
            return lo + margin, hi - margin
    return None


def percentiles(x: Tensor, q: Sequence[float]) -> Tensor:
    """Percentiles `q` (in [0, 100]) of all values of `x`, linear interpolation (numpy's default).

    Same values as ``torch.quantile``/``numpy.percentile``, from one sort: at position
    ``p = q / 100 * (n - 1)`` of the sorted values, ``s[floor(p)] + frac(p) * (s[floor(p) + 1] -
    s[floor(p)])`` (``torch.quantile`` costs several sorts' worth on small inputs).

    Returns:
        A float64 tensor of shape ``(len(q),)``.
    """
    flat = x.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("percentiles: x is empty")
    lo, hi, frac = _positions(flat.numel(), tuple(float(v) for v in q))
    ordered = flat.sort().values.double()
    device = flat.device
    return torch.lerp(ordered[lo.to(device)], ordered[hi.to(device)], frac.to(device))


@functools.lru_cache(maxsize=64)
def _positions(n: int, q: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted-order indices around each percentile and the interpolation weight (cached: a layer's
    sample size is the same every step)."""
    if any(not 0 <= v <= 100 for v in q):
        raise ValueError(f"percentiles: q must lie in [0, 100], got {list(q)}")
    pos = torch.tensor(q, dtype=torch.float64) / 100 * (n - 1)
    lo = pos.floor().long()
    return lo, (lo + 1).clamp_max(n - 1), pos - lo


class ActivationStats:
    """Streaming statistics of one layer's output values (all elements pooled).

    Pooling all units gives the layer's spread; to follow one unit as in Ioffe & Szegedy's Fig. 1,
    update with that unit's values only (e.g. ``stats.update(y[:, k])``).

    ``mean`` and ``std`` (biased) are exact over everything seen: per-update two-pass moments
    (:func:`normlab.functional.moments`) merged with Chan's update (:class:`Moments`). Percentiles
    are exact while at most `max_samples` values have been seen, and beyond that are estimated from
    `max_samples` values drawn uniformly (with replacement) by a seeded generator. ``saturated`` is the fraction of saturated
    values (see the module docstring) when `bounds` is given.

    Args:
        percentiles: which percentiles to report (``p15`` ... in :meth:`compute`).
        bounds: ``(low, high)`` saturation thresholds, e.g. from :func:`saturation_bounds`.
        max_samples: the most values kept for the percentiles.
        generator: the CPU generator of the subsampling (seeded 0 when omitted).
    """

    def __init__(
        self,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        bounds: tuple[float, float] | None = None,
        max_samples: int = 1024,
        generator: torch.Generator | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"ActivationStats: max_samples must be >= 1, got {max_samples}")
        self.q = tuple(float(v) for v in percentiles)
        self.bounds = bounds
        self.max_samples = max_samples
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.reset()

    def reset(self) -> None:
        self._parts: list[tuple[int, Tensor, Tensor]] = []  # (count, mean, biased var) per update
        self._seen = 0
        self._samples: Tensor | None = None
        self._saturated: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add the values of `x` (any shape; detached here)."""
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        seen = self._seen
        self._seen += flat.numel()
        mean, var = moments(flat, [0])
        self._parts.append((flat.numel(), mean.reshape(()), var.reshape(())))
        self._samples = self._pool(self._samples, seen, flat)
        if self.bounds is not None:
            lo, hi = self.bounds
            hits = ((flat < lo) | (flat > hi)).sum()
            self._saturated = hits if self._saturated is None else self._saturated + hits

    def _pool(self, kept: Tensor | None, seen: int, flat: Tensor) -> Tensor:
        """Values standing for everything seen: all of them up to `max_samples`, else a uniform
        draw in which each update is represented in proportion to its size."""
        total = seen + flat.numel()
        if total <= self.max_samples:
            # A copy: `flat` views the live activation, which a later in-place op may overwrite.
            return flat.clone() if kept is None else torch.cat([kept, flat])
        k_kept = round(self.max_samples * seen / total)
        parts = [self._draw(flat, self.max_samples - k_kept)]
        if kept is not None and k_kept > 0:
            parts.insert(0, self._draw(kept, k_kept))
        return torch.cat(parts)

    def _draw(self, values: Tensor, k: int) -> Tensor:
        # Drawing with replacement costs O(k), not O(numel) as a permutation would.
        idx = torch.randint(values.numel(), (k,), generator=self.generator)
        return values[idx.to(values.device)]

    def compute(self) -> dict[str, Tensor]:
        """``mean``, ``std``, ``p<q>`` for each percentile, and ``saturated`` if `bounds` was given;
        float64 0-d tensors (empty dict before any update)."""
        if not self._parts or self._samples is None:
            return {}
        mean, var = self._pooled_moments()
        out: dict[str, Tensor] = {"mean": mean, "std": var.sqrt()}
        if self.q:
            for q, value in zip(self.q, percentiles(self._samples, self.q)):
                out[f"p{q:g}"] = value
        if self._saturated is not None:
            out["saturated"] = self._saturated.double() / self._seen
        return out

    def _pooled_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over all updates (Chan's merge when there are several)."""
        if len(self._parts) == 1:  # the common case: one forward call per step
            _, mean, var = self._parts[0]
            return mean.double(), var.double()
        total: Moments | None = None
        for count, mean, var in self._parts:
            n = torch.tensor(float(count), dtype=torch.float64, device=mean.device)
            chunk = Moments(n, mean.double(), var.double() * n)
            total = chunk if total is None else total.merge(chunk)
        assert total is not None
        return total.mean, total.var()
