r"""Precise BN (Wu & Johnson, 2021): recompute batch norm population statistics exactly.

A batch norm layer's running statistics are an exponential moving average of per-batch estimates
taken while the weights were still moving; they lag behind the final model and carry its batch
noise, one source of the train/inference discrepancy. :func:`precise_bn` replaces them with the
statistics of many batches run through the *final* model:

.. math::
    \mu = \tfrac1N \sum_i x_i, \qquad \sigma^2_{\text{run}} = \tfrac1{N-1} \sum_i (x_i - \mu)^2

per channel, over all :math:`N` values the layer saw (samples times spatial positions). Per-batch
summaries :math:`(n_b, \mu_b, M_{2,b})` are merged with Chan's update, so the result is the pooled
mean and unbiased variance of everything seen, exact whatever the batch sizes. (Averaging
per-batch variances with equal weight, as fvcore's ``update_bn_stats`` does, weights a batch of 2
like a batch of 200 and leaves out the spread between batch means.)
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.distributed import all_gather_moments, is_distributed
from normlab.functional import _validate as v
from normlab.functional.moments import Moments
from normlab.nn.batchnorm import _BatchNorm as _NormlabBatchNorm

__all__ = ["PreciseBNSummary", "precise_bn"]

_OP = "precise_bn"


@dataclass(frozen=True)
class PreciseBNSummary:
    """What :func:`precise_bn` did.

    Attributes:
        num_batches: batches this process ran through the model.
        counts: per batch norm layer (qualified module name), the values per channel its new
            statistics come from, summed over ranks when synchronized; 0 means the layer saw no
            input and kept its old statistics.
    """

    num_batches: int
    counts: dict[str, int]


def _forward_input(model: Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise ValueError(
                f"{_OP}: a dict batch must hold the model input under the key 'input' (got keys "
                f"{sorted(map(str, batch))}); or pass forward_fn=lambda model, batch: ..."
            )
        return model(batch["input"])
    raise TypeError(
        f"{_OP}: cannot find the model input in a batch of type {type(batch).__name__}; batches "
        "must be tensors, (input, target, ...) tuples/lists or dicts with an 'input' key, or pass "
        "forward_fn=lambda model, batch: ..."
    )


def _batch_norms(model: Module) -> list[tuple[str, Module]]:
    """Batch norm layers (torch's or normlab's, subclasses included) that keep running stats."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (_TorchBatchNorm, _NormlabBatchNorm))
        and getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    ]


def precise_bn(
    model: Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    *,
    forward_fn: Callable[[Module, Any], Any] | None = None,
    process_group: Any = None,
) -> PreciseBNSummary:
    r"""Set every batch norm layer's running statistics to the exact statistics of its inputs.

    Runs up to ``num_batches`` batches through ``model`` in training mode under
    ``torch.no_grad()``, so that every batch norm normalizes with batch statistics as it does in
    training, and each layer's new statistics are those of the inputs it sees in training mode
    (downstream layers see upstream layers normalized by batch statistics, with dropout and every
    other train-mode behaviour active). A forward pre-hook on each layer summarizes its input per
    channel in float64, and the summaries are merged exactly (module docstring). Then, per layer,
    ``running_mean`` = the pooled mean and ``running_var`` = the pooled unbiased variance.

    Layers recalibrated: instances of torch's or normlab's batch norm base classes
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and normlab's batch norm variants) that keep
    running statistics; ``FrozenBatchNorm`` and instance norm are not batch norm layers here.

    Everything else is left as it was, also when an exception interrupts the run: each module's
    train/eval mode, parameters and their ``.grad``, ``num_batches_tracked`` and every other buffer
    (train-mode forwards update them; they are restored). A layer that saw fewer than 2 values per
    channel keeps its old statistics, with a warning.

    With ``torch.distributed`` initialized and ``process_group`` (default: world) spanning more
    than one rank, every rank iterates its own ``batches``, the per-layer summaries are merged
    across ranks with one all-gather, and every rank ends with identical statistics: those of all
    ranks' data together. Every rank must call :func:`precise_bn`; if the model holds
    :class:`~normlab.nn.SyncBatchNorm` layers, their train-mode forwards synchronize too, so every
    rank must then run the same number of batches.

    Args:
        model: the model to recalibrate, on the device of the batches.
        batches: any iterable; only the first ``num_batches`` items are drawn. The input is the
            batch itself if it is a tensor, its first element if it is a tuple or list (e.g.
            ``(input, target)``), ``batch["input"]`` if it is a mapping; otherwise pass
            ``forward_fn``. Batches are not moved to the model's device.
        num_batches: the most batches to use (> 0). Wu & Johnson use about 200 batches of 32+
            samples.
        forward_fn: ``forward_fn(model, batch)`` runs one batch through the model, replacing the
            input extraction above (e.g. ``lambda m, b: m(b["image"].cuda())``).
        process_group: the group to merge statistics over (None: world, when initialized).

    Returns:
        A :class:`PreciseBNSummary` with the per-layer value counts.

    Raises:
        ValueError: ``num_batches`` is not a positive integer; a mapping batch without 'input'.
        TypeError: a batch the default input extraction does not understand.

    Note:
        Flax and Keras store the biased variance; normlab, like torch, stores the unbiased one.
    """
    v.check_positive_int(_OP, "num_batches", num_batches)
    layers = _batch_norms(model)
    if not layers:
        return PreciseBNSummary(num_batches=0, counts={})
    forward = forward_fn if forward_fn is not None else _forward_input
    modes = [(m, m.training) for m in model.modules()]
    saved_buffers = [(b, b.clone()) for b in model.buffers()]
    summaries: dict[str, Moments | None] = {name: None for name, _ in layers}

    def summarize(name: str) -> Callable[..., None]:
        def hook(module: Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            part = Moments.of(x.detach(), [0, *range(2, x.dim())])
            prev = summaries[name]
            summaries[name] = part if prev is None else prev.merge(part)

        return hook

    handles = [m.register_forward_pre_hook(summarize(name), with_kwargs=True) for name, m in layers]
    seen = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                forward(model, batch)
                seen += 1
        parts = [
            summaries[name] or Moments.empty((m.num_features,), m.running_mean.device)
            for name, m in layers
        ]
        if is_distributed(process_group):
            parts = all_gather_moments(_OP, parts, process_group)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)
    counts: dict[str, int] = {}
    starved: list[str] = []
    with torch.no_grad():
        for (name, m), total in zip(layers, parts):
            counts[name] = int(total.count.item())
            if counts[name] < 2:
                starved.append(name)
                continue
            m.running_mean.copy_(total.mean)
            m.running_var.copy_(total.var(correction=1))
    if starved:
        warnings.warn(
            f"{_OP}: batch norm layers {starved} saw fewer than 2 values per channel in "
            f"{seen} batches and keep their old statistics; check that the batches reach them",
            stacklevel=2,
        )
    return PreciseBNSummary(num_batches=seen, counts=counts)
