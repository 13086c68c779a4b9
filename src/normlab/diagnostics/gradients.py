"""Gradient flow: gradient norms per parameter and per layer, and a vanishing/exploding verdict.

The measure of Glorot & Bengio (2010) and He et al. (2015): how the size of the gradient changes
from the last layer to the first. A layer's gradient norm is the L2 norm of the gradients of all its
own parameters taken together, ``sqrt(sum_p ||dL/dp||^2)``; the flow ratio is

    ratio = ||grad(first layer)|| / ||grad(last layer)||

with layers ordered by their first call in the forward pass.

Thresholds of the verdict:
    * ``"vanishing"`` when ``ratio < VANISHING_RATIO`` (1e-3: the first layer's gradient is more than
      three orders of magnitude smaller than the last layer's), or when both norms are 0;
    * ``"exploding"`` when ``ratio > EXPLODING_RATIO`` (1e3) or any norm is not finite;
    * ``"healthy"`` otherwise.
    Three orders of magnitude is beyond what widths and fan-ins alone produce in a well-initialized
    network, yet well within what 6-10 saturated sigmoid layers produce (each divides the gradient
    by 4 or more: the sigmoid's slope is at most 1/4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EXPLODING_RATIO",
    "VANISHING_RATIO",
    "GradientFlow",
    "GradientNorm",
    "gradient_flow",
]

#: First-to-last gradient norm ratio below which gradients are called vanishing.
VANISHING_RATIO = 1e-3
#: First-to-last gradient norm ratio above which gradients are called exploding.
EXPLODING_RATIO = 1e3


class GradientNorm:
    """L2 norm of the gradients given to :meth:`update` since the last :meth:`reset`.

    Several updates add up as one concatenated vector (``sqrt`` of the summed squares), so one
    estimator serves a parameter, a whole layer, or the gradient flowing into a layer's output.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sq: Tensor | None = None

    def update(self, grad: Tensor) -> None:
        """Add `grad` (detached, accumulated in float32 or float64)."""
        g = grad.detach()
        sq = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32).square().sum()
        self._sq = sq if self._sq is None else self._sq + sq

    def compute(self) -> dict[str, Tensor]:
        """``{"norm": ...}`` as a 0-d tensor (empty dict before any update)."""
        return {} if self._sq is None else {"norm": self._sq.sqrt()}


@dataclass(frozen=True)
class GradientFlow:
    """How gradient norms change from the last layer to the first.

    Attributes:
        first, last: names of the first and last layer (forward order).
        first_norm, last_norm: their gradient norms.
        ratio: ``first_norm / last_norm`` (0 when both are 0).
        verdict: ``"vanishing"``, ``"exploding"`` or ``"healthy"`` (thresholds: module docstring).
    """

    first: str
    last: str
    first_norm: float
    last_norm: float
    ratio: float
    verdict: str

    @property
    def orders_of_magnitude(self) -> float:
        """``log10(ratio)``: -4 means gradients shrink 10^4 from last to first layer."""
        if self.ratio == 0:
            return -math.inf
        return math.log10(self.ratio) if math.isfinite(self.ratio) else math.inf


def gradient_flow(norms: Mapping[str, float]) -> GradientFlow:
    """The flow verdict from per-layer gradient norms given in forward order.

    Args:
        norms: layer name -> gradient norm, first layer first (e.g. :meth:`Probe.layer_values` of
            ``"grad_norm"``).

    Raises:
        ValueError: when fewer than two layers are given.
    """
    if len(norms) < 2:
        raise ValueError(
            f"gradient_flow: needs the gradient norms of at least 2 layers, got {len(norms)}; "
            "run a backward pass inside the Probe, on a model with 2 or more parameterized layers"
        )
    names = list(norms)
    first, last = names[0], names[-1]
    first_norm, last_norm = float(norms[first]), float(norms[last])
    if last_norm == 0:
        ratio = 0.0 if first_norm == 0 else math.inf
    else:
        ratio = first_norm / last_norm
    if not all(math.isfinite(float(v)) for v in norms.values()) or ratio > EXPLODING_RATIO:
        verdict = "exploding"
    elif ratio < VANISHING_RATIO:
        verdict = "vanishing"
    else:
        verdict = "healthy"
    return GradientFlow(first, last, first_norm, last_norm, ratio, verdict)
