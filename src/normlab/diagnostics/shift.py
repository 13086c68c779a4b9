"""Internal covariate shift, measured both ways.

1. **Distribution drift** (the sense of Ioffe & Szegedy 2015, Fig. 1): how far the distribution of
   a layer's *input* on a fixed probe set moves between two measurements. Per unit u (index along
   ``unit_dim``) with reference mean/std ``mu_0, sigma_0`` and current ``mu_1``:

       shift_mean = mean_u |mu_1 - mu_0| / sigma_0
       shift_w1   = mean_u W1(P_1, P_0) / sigma_0,   W1 = integral_0^1 |Q_1(t) - Q_0(t)| dt

   where Q are the quantile functions (W1 is the 1-Wasserstein distance, approximated on ``levels``
   evenly spaced quantiles). Both are in units of the reference std; units that were constant in
   the reference (sigma_0 = 0, e.g. fed by dead ReLUs) are left out.

2. **Gradient change** (Santurkar et al. 2018, "How does batch normalization help optimization?",
   Definition 2.1): for layer i at step t, with G = grad of the loss w.r.t. W_i, and G' the same
   gradient recomputed on the same batch after layers 1..i-1 have taken their optimizer step:

       ||G - G'||_2  and  cos(G, G')

   A large change means the layer's optimization problem moves under it because of the updates of
   the layers before it. Measured on a deep copy of the model and optimizer, so the real model's
   parameters, running statistics and optimizer state are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._util import copy_model, forward_order, output_tensor
from normlab.functional.moments import Moments

__all__ = ["GradientChange", "InputDrift", "gradient_change"]


class InputDrift:
    """Drift of one layer's input distribution between successive measurements on a probe set.

    Feed one measurement (the whole probe set, in any number of batches) through :meth:`update`,
    then call :meth:`compute`: it reports the drift from the previous measurement and makes the
    current one the reference for the next.

    Args:
        unit_dim: the dimension that indexes units (1: features of (N, F), channels of (N, C, *)).
        levels: quantile levels for W1, at (k + 1/2) / levels for k = 0 .. levels - 1.
        max_samples: values per unit kept for the quantiles (beyond: a seeded uniform draw).
        generator: CPU generator of that draw (seeded 0 when omitted).
    """

    def __init__(
        self,
        unit_dim: int = 1,
        levels: int = 64,
        max_samples: int = 1024,
        generator: torch.Generator | None = None,
    ) -> None:
        self.unit_dim = unit_dim
        self.levels = levels
        self.max_samples = max_samples
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._reference: tuple[Tensor, Tensor, Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current measurement (the reference is kept)."""
        self._moments: Moments | None = None
        self._values: list[Tensor] = []

    def update(self, x: Tensor) -> None:
        """Add a batch of the layer's input."""
        x = x.detach()
        if x.dim() < 2:
            x = x.unsqueeze(1)
        units = x.movedim(self.unit_dim, 0).reshape(x.shape[self.unit_dim], -1)
        chunk = Moments.of(units, [1])
        self._moments = chunk if self._moments is None else self._moments.merge(chunk)
        if units.shape[1] > self.max_samples:
            idx = torch.randint(units.shape[1], (self.max_samples,), generator=self.generator)
            units = units[:, idx.to(units.device)]
        else:
            units = units.clone()
        self._values.append(units)

    def compute(self) -> dict[str, Tensor]:
        """``shift_mean`` and ``shift_w1`` against the previous measurement (empty dict for the
        first one); the current measurement becomes the reference."""
        if self._moments is None:
            return {}
        values = torch.cat(self._values, dim=1)
        if values.shape[1] > self.max_samples:
            idx = torch.randint(values.shape[1], (self.max_samples,), generator=self.generator)
            values = values[:, idx.to(values.device)]
        values = values.double()
        levels = (torch.arange(self.levels, dtype=torch.float64) + 0.5) / self.levels
        quantiles = torch.quantile(values, levels.to(values.device), dim=1)  # (levels, units)
        current = (self._moments.mean, self._moments.var().sqrt(), quantiles)
        out: dict[str, Tensor] = {}
        if self._reference is not None:
            mean_0, std_0, q_0 = self._reference
            if mean_0.shape != current[0].shape:
                raise ValueError(
                    f"InputDrift: the layer input has {current[0].numel()} units, the reference "
                    f"{mean_0.numel()}; use one InputDrift per layer"
                )
            varying = std_0 > 0
            if bool(varying.any()):
                scale = std_0[varying]
                out["shift_mean"] = ((current[0] - mean_0)[varying].abs() / scale).mean()
                w1 = (quantiles - q_0).abs().mean(dim=0)
                out["shift_w1"] = (w1[varying] / scale).mean()
            else:
                zero = torch.zeros((), dtype=torch.float64, device=mean_0.device)
                out["shift_mean"], out["shift_w1"] = zero, zero.clone()
        self._reference = current
        self.reset()
        return out


@dataclass(frozen=True)
class GradientChange:
    """Santurkar et al.'s gradient change of one layer (Definition 2.1).

    Attributes:
        l2: ``||G - G'||_2``.
        cos: ``cos(G, G')`` (1 when either is 0 and they are equal, 0 when exactly one is 0).
        relative: ``||G - G'|| / ||G||`` (0 when both are 0).
    """

    l2: float
    cos: float
    relative: float


def gradient_change(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Any,
    y: Any,
    *,
    seed: int = 0,
) -> dict[str, GradientChange]:
    """Santurkar's internal covariate shift: how each layer's gradient changes when the layers
    before it take their optimizer step (module docstring).

    A layer is a module with parameters of its own; its W is all of them, concatenated. Layers are
    ordered by their first call in the forward pass; the first layer has no predecessors and is not
    reported. The optimizer step is the real optimizer's (same type, hyper-parameters and state:
    momentum, Adam moments), applied to a deep copy to layers 1..i-1 only. Each forward pass runs
    with the same RNG seed, so dropout masks do not add spurious change. The model's mode is used
    as is (train mode: batch norm normalizes with batch statistics, as in training).

    Args:
        model: the model at step t (untouched).
        optimizer: its optimizer (untouched).
        loss_fn: ``loss_fn(output, y) -> scalar``; output is the model's first tensor output.
        x, y: the batch of step t.
        seed: RNG seed of every forward pass.

    Returns:
        layer name -> :class:`GradientChange`, in forward order.

    Cost:
        One forward and backward pass per layer, plus a copy of model and optimizer.
    """
    net, opt = copy_model(model, optimizer)
    params = {
        name: [p for p in module.parameters(recurse=False) if p.requires_grad]
        for name, module in net.named_modules()
    }
    params = {name: ps for name, ps in params.items() if ps}

    # The state of step t, taken before any forward pass can move the copy's running statistics.
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    opt_state = _clone_state(opt.state_dict())

    def backward() -> None:
        net.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss_fn(output_tensor(net(x), "gradient_change"), y).backward()

    order = forward_order(net, backward, list(params))
    grads_t = {name: [None if p.grad is None else p.grad.clone() for p in params[name]]
               for name in order}
    out: dict[str, GradientChange] = {}
    for i, name in enumerate(order[1:], start=1):
        net.load_state_dict(model_state)
        opt.load_state_dict(_clone_state(opt_state))
        net.zero_grad(set_to_none=True)
        for layer in order[:i]:
            for p, g in zip(params[layer], grads_t[layer]):
                p.grad = None if g is None else g.clone()
        opt.step()
        backward()
        out[name] = _compare(_flat(grads_t[name], params[name]), _flat_grad(params[name]))
    return out


def _flat(grads: list[Tensor | None], params: list[nn.Parameter]) -> Tensor:
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double()
        for g, p in zip(grads, params)
    ])


def _flat_grad(params: list[nn.Parameter]) -> Tensor:
    return _flat([p.grad for p in params], params)


def _clone_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state


def _compare(g: Tensor, g_new: Tensor) -> GradientChange:
    l2 = float((g - g_new).norm())
    norm, norm_new = float(g.norm()), float(g_new.norm())
    if norm == 0 or norm_new == 0:
        cos = 1.0 if norm == norm_new else 0.0
    else:
        cos = float(torch.dot(g, g_new)) / (norm * norm_new)
    relative = l2 / norm if norm > 0 else (0.0 if l2 == 0 else float("inf"))
    return GradientChange(l2=l2, cos=cos, relative=relative)
