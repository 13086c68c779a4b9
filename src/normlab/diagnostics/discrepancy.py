"""Train/inference discrepancy of layers with running statistics (batch norm and kin).

In training, batch norm normalizes with the statistics of the batch; in inference, with running
averages. The two differ when batches are small or not i.i.d., and when the running averages lag
behind the weights (Ioffe 2017, batch renorm; Wu & Johnson 2021, precise BN; Summers & Dinneen
2019). Two measures:

* :func:`train_eval_gap`: the same data through the model in train mode and in eval mode, in
  batches of the training batch size; the relative output gap
  ``||f_train(X) - f_eval(X)||_F / ||f_eval(X)||_F``, for classifiers the fraction of samples whose
  predicted class differs between the modes, and, with integer labels, both accuracies.
  Train mode here switches only the layers with batch statistics (dropout stays off), so the gap
  isolates normalization, and it runs on a copy, so the model's running statistics are untouched.
* :func:`running_stats_gap`: per layer, the distance between its running statistics and the true
  population statistics of its input, measured over a data set with the model in eval mode (the
  inputs the running statistics are applied to at inference):

      mean_gap = mean_c |running_mean_c - mu_c| / sqrt(var_c + eps)
      var_gap  = mean_c |log((running_var_c + eps) / (var_c + eps))|

  with mu, var the population mean and unbiased variance per channel (dim 1), the convention of
  the running variance. 0 means perfectly calibrated; precise BN (recomputing the statistics over
  many batches) is the fix when they are large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.diagnostics._util import (
    CallKeys,
    batches,
    copy_model,
    eval_pass,
    first_tensor,
    has_running_stats,
    is_batch_norm,
    output_tensor,
    temporary_forward_hooks,
)
from normlab.functional.moments import Moments

__all__ = ["RunningStatsGap", "TrainEvalGap", "running_stats_gap", "train_eval_gap"]


@dataclass(frozen=True)
class TrainEvalGap:
    """Output and accuracy gap between train-mode and eval-mode inference on the same data.

    Attributes:
        output_gap: ``||f_train(X) - f_eval(X)||_F / ||f_eval(X)||_F``.
        train_accuracy: accuracy in train mode (NaN without integer labels).
        eval_accuracy: accuracy in eval mode (NaN without integer labels).
        accuracy_gap: ``train_accuracy - eval_accuracy`` as a fraction (0.2 = 20 points).
        disagreement: fraction of samples whose predicted class (argmax) differs between the two
            modes; needs no labels (NaN unless the outputs are (N, classes)).
        samples: how many samples were used (whole batches only).
    """

    output_gap: float
    train_accuracy: float
    eval_accuracy: float
    accuracy_gap: float
    disagreement: float
    samples: int


@dataclass(frozen=True)
class RunningStatsGap:
    """Distance of one layer's running statistics from its input's population statistics.

    Attributes:
        mean_gap: mean over channels of ``|running_mean - mu| / sqrt(var + eps)``.
        var_gap: mean over channels of ``|log((running_var + eps) / (var + eps))|``.
        max_mean_gap: the largest channel's mean gap.
    """

    mean_gap: float
    var_gap: float
    max_mean_gap: float


def _uses_batch_stats(module: nn.Module) -> bool:
    return is_batch_norm(module) or has_running_stats(module)


@torch.no_grad()
def train_eval_gap(
    model: nn.Module, x: Tensor, y: Tensor | None = None, *, batch_size: int
) -> TrainEvalGap:
    """Compare train-mode and eval-mode outputs on `x` (module docstring).

    Args:
        model: the model (untouched: a copy is measured).
        x: inputs, batch first; only the first ``len(x) // batch_size`` whole batches are used,
            since a train-mode batch norm needs more than one value per channel.
        y: optional integer class labels for the accuracies (outputs must be (N, classes)).
        batch_size: the train-mode batch size (the training batch size, to see its noise).

    Raises:
        ValueError: when `x` holds fewer than `batch_size` samples.
    """
    if x.shape[0] < batch_size:
        raise ValueError(
            f"train_eval_gap: needs at least one whole batch of {batch_size} samples, "
            f"got {x.shape[0]}"
        )
    net = copy_model(model)
    slices = list(batches(x, batch_size, drop_last=True))
    net.eval()
    out_eval = torch.cat([output_tensor(net(x[s]), "train_eval_gap") for s in slices]).double()
    for module in net.modules():
        if _uses_batch_stats(module):
            module.train()
    out_train = torch.cat([output_tensor(net(x[s]), "train_eval_gap") for s in slices]).double()
    norm = float(out_eval.norm())
    diff = float((out_train - out_eval).norm())
    output_gap = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    acc_train = acc_eval = disagreement = math.nan
    if out_eval.dim() == 2 and out_eval.shape[1] >= 2:
        disagreement = float((out_train.argmax(1) != out_eval.argmax(1)).double().mean())
    if y is not None and not y.is_floating_point() and out_eval.dim() == 2:
        labels = y[: out_eval.shape[0]].to(out_eval.device)
        acc_train = float((out_train.argmax(1) == labels).double().mean())
        acc_eval = float((out_eval.argmax(1) == labels).double().mean())
    return TrainEvalGap(
        output_gap=output_gap,
        train_accuracy=acc_train,
        eval_accuracy=acc_eval,
        accuracy_gap=acc_train - acc_eval,
        disagreement=disagreement,
        samples=out_eval.shape[0],
    )


def running_stats_gap(
    model: nn.Module, x: Tensor, *, batch_size: int = 256
) -> dict[str, RunningStatsGap]:
    """Running statistics vs population statistics of every layer that keeps them (module
    docstring), over the data `x` with the model in eval mode (modes restored afterwards; eval mode
    changes no buffer).

    Returns:
        layer name -> :class:`RunningStatsGap`, in forward order.
    """
    layers = {n: m for n, m in model.named_modules() if has_running_stats(m)}
    stats: dict[str, Moments] = {}
    owner: dict[str, str] = {}
    keys = CallKeys()

    def on_input(name: str, module: nn.Module, args: tuple[object, ...]) -> None:
        key = keys.next(name)
        inp = first_tensor(args)
        if inp is None or inp.dim() < 2:
            return
        owner[key] = name
        dims = [0, *range(2, inp.dim())]
        chunk = Moments.of(inp, dims)
        stats[key] = chunk if key not in stats else stats[key].merge(chunk)

    with temporary_forward_hooks(layers, on_input=on_input):
        eval_pass(model, x, batch_size, keys)
    out: dict[str, RunningStatsGap] = {}
    for key, moments in stats.items():
        module = layers[owner[key]]
        eps = float(getattr(module, "eps", 1e-5))
        mean, var = moments.mean, moments.var(correction=1)
        run_mean = module.running_mean.double()
        run_var = module.running_var.double()
        mean_gaps = (run_mean - mean).abs() / (var + eps).sqrt()
        var_gaps = ((run_var + eps) / (var + eps)).log().abs()
        out[key] = RunningStatsGap(
            mean_gap=float(mean_gaps.mean()),
            var_gap=float(var_gaps.mean()),
            max_mean_gap=float(mean_gaps.max()),
        )
    return out
