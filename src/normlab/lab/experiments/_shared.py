"""Pieces shared by the experiments of C5, C6, C7, C9 and C13 that :mod:`normlab.lab.common` lacks.

* :class:`DeviceBatchNorm2d`: batch norm (or batch renorm) whose training statistics are those
  of each group of ``device_batch`` consecutive samples, as on data-parallel devices.
* :class:`NoisyShift`: Santurkar et al.'s (2018, Sec. 2) injected non-stationary shift, a random
  per-unit scale and shift redrawn at every training forward pass.
* :func:`train_in_chunks`: :func:`~normlab.lab.common.train_classifier` run in chunks, with a
  callback between chunks (for measurements during training).
* :func:`train_on_batches`: plain SGD over batches given as index tensors (non-i.i.d. batches).
* :func:`class_batches`: batches drawn from a few classes at a time.
* :func:`accuracy`: eval-mode accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normlab.functional as NF
from normlab.functional.batch_renorm import renorm_correction, renorm_limits
from normlab.lab.common import TrainCurves, train_classifier

__all__ = [
    "DeviceBatchNorm2d",
    "NoisyShift",
    "accuracy",
    "class_batches",
    "seeds_label",
    "train_in_chunks",
    "train_on_batches",
]

Split = tuple[Tensor, Tensor, Tensor, Tensor]


class NoisyShift(nn.Module):
    """Random per-unit scale and shift, redrawn at every training forward pass ("noisy BN").

    In training, ``y = x * exp(scale_std * z1) + shift_std * z2`` with ``z1, z2 ~ N(0, 1)`` drawn
    per unit (dim 1) and per call, so the distribution the next layer sees moves at every step
    (Santurkar et al. 2018, Sec. 2: non-zero mean, non-unit variance, time-varying). In eval mode
    it is the identity. The draws use torch's global generator, so a caller that seeds it (or forks
    it, as :func:`~normlab.diagnostics.gradient_change` does) gets reproducible noise.

    Args:
        num_features: number of units (dim 1).
        scale_std: standard deviation of the log scale.
        shift_std: standard deviation of the shift.
    """

    def __init__(self, num_features: int, scale_std: float = 0.5, shift_std: float = 0.5) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale_std = scale_std
        self.shift_std = shift_std

    def forward(self, x: Tensor) -> Tensor:
        """Scale and shift each unit of ``x`` (``(N, C, *)``) in training; identity in eval."""
        if not self.training:
            return x
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        scale = torch.exp(self.scale_std * torch.randn(shape, dtype=x.dtype))
        shift = self.shift_std * torch.randn(shape, dtype=x.dtype)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, scale_std={self.scale_std}, shift_std={self.shift_std}"


class DeviceBatchNorm2d(nn.Module):
    """Batch norm with statistics per "device": each group of ``device_batch`` consecutive samples.

    Emulates data-parallel training where every device normalizes its own ``device_batch``
    images (Wu & He 2018's "images per GPU") while the gradient is that of the whole batch: the
    training output equals :class:`normlab.nn.ghost.GhostBatchNorm2d` with
    ``virtual_batch_size=device_batch``, computed for all devices at once. The per-device,
    per-channel normalization over (samples, H, W) is a group norm with one group per channel on
    the input rearranged to ``(devices, C, device_batch * H * W)``
    (:func:`normlab.functional.group_norm`). With ``renorm=True`` each device's output is batch
    renorm's ``x_hat * r + d`` (Ioffe 2017; r, d per device from the running statistics, without
    gradient; limits from :func:`normlab.functional.batch_renorm.renorm_limits`). Running statistics: the
    device-averaged mean and unbiased variance, one momentum update per forward call. Eval:
    :func:`normlab.functional.batch_norm` with the running statistics.

    Args:
        num_features: channels C.
        device_batch: samples per device (the batch must be a multiple of it).
        renorm: batch renorm instead of batch norm.
        warmup_steps, ramp_steps: batch renorm's schedule (plain BN, then r_max -> 3, d_max -> 5).
        momentum, eps: as in batch norm.
    """

    def __init__(
        self,
        num_features: int,
        device_batch: int,
        *,
        renorm: bool = False,
        warmup_steps: int = 0,
        ramp_steps: int = 1,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.device_batch = device_batch
        self.renorm = renorm
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, C, H, W)`` with N a multiple of ``device_batch`` in training."""
        if not self.training:
            return NF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 False, 0.0, self.eps)
        n, c = x.shape[:2]
        if n % self.device_batch:
            raise ValueError(
                f"DeviceBatchNorm2d: batch {n} is not a multiple of device_batch="
                f"{self.device_batch}; use a batch of whole devices"
            )
        devices = n // self.device_batch
        grouped = x.reshape(devices, self.device_batch, c, -1).transpose(1, 2)
        grouped = grouped.reshape(devices, c, -1)  # (devices, C, device_batch * H * W)
        x_hat = NF.group_norm(grouped, c, eps=self.eps)
        with torch.no_grad():
            count = grouped.shape[2]
            mean = grouped.mean(dim=2)
            var = grouped.var(dim=2, unbiased=False)
            if self.renorm:
                r_max, d_max = renorm_limits(
                    int(self.num_batches_tracked), 3.0, 5.0, self.warmup_steps,
                    self.ramp_steps, self.ramp_steps,
                )
                r, d = renorm_correction(mean, var, self.running_mean, self.running_var,
                                         self.eps, r_max, d_max)
            unbiased = var * count / max(count - 1, 1)
            self.running_mean.lerp_(mean.mean(dim=0), self.momentum)
            self.running_var.lerp_(unbiased.mean(dim=0), self.momentum)
            self.num_batches_tracked.add_(1)
        if self.renorm:
            x_hat = x_hat * r.unsqueeze(2) + d.unsqueeze(2)
        out = x_hat.reshape(devices, c, self.device_batch, -1).transpose(1, 2).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return out * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, device_batch={self.device_batch}, renorm={self.renorm}"


def train_in_chunks(
    model: nn.Module,
    data: Split,
    *,
    steps: int,
    chunk: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    callback: Callable[[int], None] | None = None,
    explode_factor: float = 20.0,
) -> tuple[TrainCurves, list[int]]:
    """Plain SGD (no momentum, so no optimizer state is lost between chunks) in chunks.

    Calls :func:`~normlab.lab.common.train_classifier` for ``chunk`` steps at a time with
    ``eval_every=chunk``, and ``callback(step)`` before the first chunk (step 0) and after each.
    Divergence is judged against the run's first loss, not each chunk's: a non-finite loss, or
    a chunk whose mean training loss exceeds ``explode_factor`` times the run's first loss, ends
    training (``diverged`` is then set).

    Returns:
        The concatenated curves (one evaluation per chunk) and the steps at which ``callback``
        ran.
    """
    curves = TrainCurves()
    calls: list[int] = []
    if callback is not None:
        callback(0)
        calls.append(0)
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        part = train_classifier(
            model, data, steps=n, lr=lr, batch_size=batch_size, generator=generator,
            eval_every=n, explode_factor=explode_factor if done == 0 else math.inf,
        )
        done += n
        if math.isnan(curves.initial_loss):
            curves.initial_loss = part.initial_loss
        curves.steps.append(done)
        curves.test_acc.append(part.final_acc)
        curves.test_loss.append(part.test_loss[-1] if part.test_loss else math.nan)
        train_loss = part.train_loss[-1] if part.train_loss else math.nan
        curves.train_loss.append(train_loss)
        if callback is not None:
            callback(done)
            calls.append(done)
        if part.diverged or not train_loss <= explode_factor * max(curves.initial_loss, 1e-3):
            curves.diverged = True
            break
    return curves, calls


def train_on_batches(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batches: Iterable[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    after_backward: Callable[[nn.Module], None] | None = None,
) -> list[float]:
    """SGD on cross-entropy over the given batches of indices into ``(x, y)``.

    Args:
        model: the classifier (put in train mode).
        x, y: training inputs and integer labels.
        batches: index tensors, one per step.
        lr: learning rate.
        momentum: SGD momentum.
        after_backward: called with the model after each backward pass, before the step (e.g. to
            all-reduce gradients across processes).

    Returns:
        The loss of every step (training stops at the first non-finite loss).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    losses: list[float] = []
    for idx in batches:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        opt.step()
    return losses


def class_batches(
    y: Tensor,
    batch_size: int,
    classes_per_batch: int,
    steps: int,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """Non-i.i.d. batches: each holds ``batch_size / classes_per_batch`` examples (drawn with
    replacement) of each of ``classes_per_batch`` random distinct classes, in random order.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``classes_per_batch``.
    """
    if batch_size % classes_per_batch:
        raise ValueError(
            f"class_batches: batch_size={batch_size} is not a multiple of "
            f"classes_per_batch={classes_per_batch}"
        )
    per_class = batch_size // classes_per_batch
    classes = torch.unique(y)
    members = [torch.nonzero(y == c).flatten() for c in classes]
    for _ in range(steps):
        chosen = torch.randperm(len(classes), generator=generator)[:classes_per_batch]
        parts = [
            members[int(c)][torch.randint(len(members[int(c)]), (per_class,), generator=generator)]
            for c in chosen
        ]
        idx = torch.cat(parts)
        yield idx[torch.randperm(len(idx), generator=generator)]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Eval-mode accuracy of ``model`` on ``(x, y)``; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(was_training)


def seeds_label(n: int) -> str:
    """``"1 seed"`` / ``"3 seeds"`` for figure titles."""
    return f"{n} seed{'s' if n != 1 else ''}"
