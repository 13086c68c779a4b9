"""Dead units: ReLU-family units that output exactly 0 for every example of a probe set.

Definition (the usual one): a unit of a ReLU-family activation (``nn.ReLU``, ``nn.ReLU6``) is dead
on a probe set when its output is exactly 0 for every example of the set, with the model in eval
mode (so dropout is off and batch norm uses its running statistics: the answer does not depend on
how the set is batched). A unit is one index along ``unit_dim`` (dim 1: a feature of an (N, F)
output, a channel of an (N, C, H, W) one, which is dead only if 0 at every position). The dead
fraction of a layer is the fraction of its units that are dead. A dead unit passes no gradient to
the weights feeding it, so it stays dead: this is what "BN keeps neurons alive" is about.
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab.diagnostics._util import RELU_FAMILY, CallKeys, eval_pass, temporary_forward_hooks

__all__ = ["DeadUnits", "dead_units"]


class DeadUnits:
    """Which units of one layer have been non-zero at least once since the last :meth:`reset`.

    Args:
        unit_dim: the dimension that indexes units (1: features of (N, F), channels of (N, C, *)).
    """

    def __init__(self, unit_dim: int = 1) -> None:
        self.unit_dim = unit_dim
        self.reset()

    def reset(self) -> None:
        self._alive: Tensor | None = None

    def update(self, y: Tensor) -> None:
        """Add a batch of the layer's outputs (at least 2-D; 1-D is one unit per element)."""
        y = y.detach()
        if y.dim() < 2:
            y = y.unsqueeze(0)
        nonzero = (y != 0).movedim(self.unit_dim, 0).reshape(y.shape[self.unit_dim], -1)
        alive = nonzero.any(dim=1)
        if self._alive is None:
            self._alive = alive
        elif self._alive.shape != alive.shape:
            raise ValueError(
                f"DeadUnits: got {alive.numel()} units along dim {self.unit_dim}, expected "
                f"{self._alive.numel()}; reset() before measuring a layer of another width"
            )
        else:
            self._alive = self._alive | alive

    def compute(self) -> dict[str, Tensor]:
        """``dead_fraction`` and ``dead_units`` (count) as 0-d tensors (empty before an update)."""
        if self._alive is None:
            return {}
        dead = (~self._alive).sum().double()
        return {"dead_fraction": dead / self._alive.numel(), "dead_units": dead}


def dead_units(
    model: nn.Module, x: Tensor, *, batch_size: int = 256, unit_dim: int = 1
) -> dict[str, float]:
    """Dead fraction of every ReLU-family layer of `model` on the probe set `x`, in eval mode.

    The model's modes are restored afterwards; eval mode changes no buffer, so the model is
    otherwise untouched.

    Args:
        model: any module; only ``nn.ReLU``/``nn.ReLU6`` submodules are measured.
        x: the probe set, batch first.
        batch_size: probe batch size (does not change the result in eval mode).
        unit_dim: see :class:`DeadUnits`.

    Returns:
        layer key -> dead fraction, in forward order (a module called twice per forward pass gets
        ``name#1`` for its second call, see :func:`normlab.diagnostics.layer_key`).
    """
    relus = {n: m for n, m in model.named_modules() if isinstance(m, RELU_FAMILY)}
    estimators: dict[str, DeadUnits] = {}
    keys = CallKeys()

    def on_output(name: str, module: nn.Module, args: object, output: Tensor) -> None:
        estimators.setdefault(keys.next(name), DeadUnits(unit_dim)).update(output)

    with temporary_forward_hooks(relus, on_output=on_output):
        eval_pass(model, x, batch_size, keys)
    return {k: float(e.compute()["dead_fraction"]) for k, e in estimators.items()}
