"""Shared pieces of the lab's experiments: models, a seeded training loop, evaluation, plots.

Models take a *norm factory* (``num_features -> nn.Module``, or None for no normalization) so one
architecture serves every variant of a claim; :func:`norm_factory` builds normlab's own layers
by name. :func:`train_classifier` is the one training loop: plain minibatch SGD (optionally with
momentum) over batches drawn from a seeded :class:`torch.Generator`, evaluated on the test set
every ``eval_every`` steps, stopped early when the loss diverges.

Determinism: every random draw of a run goes through a generator seeded from the run's seed
(:func:`seeded`), and model parameters are drawn after ``torch.manual_seed(seed)``, so the same
seed gives the same numbers regardless of what ran before in the process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normlab.nn as nnl
from normlab.lab.experiment import RunResult, Status

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MLP",
    "NormFactory",
    "RowRNN",
    "SmallCNN",
    "TrainCurves",
    "activation",
    "agrees",
    "evaluate",
    "load_digits",
    "metric_values",
    "n_seeds",
    "new_figure",
    "norm_factory",
    "plot_band",
    "save_figure",
    "seeded",
    "steps_to_target",
    "summarize",
    "train_classifier",
]

NormFactory = Callable[[int], nn.Module] | None
"""Builds a norm layer for ``num_features`` channels; None means no normalization."""

Split = tuple[Tensor, Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# data and seeding


def load_digits(seed: int = 0, n_test: int = 500) -> Split:
    """Digits split ``(x_train, y_train, x_test, y_test)``, flat float32 in [0, 1].

    Delegates to :func:`normlab.lab.datasets.load_digits_split` (the demo's loader is the
    fallback for an install without it).
    """
    try:
        from normlab.lab.datasets import load_digits_split
    except ImportError:  # pragma: no cover - only before the datasets module exists
        from normlab.demo import load_digits_split  # type: ignore[assignment]
    return load_digits_split(seed=seed, n_test=n_test)  # type: ignore[call-arg]


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global generator (parameter init) and return a fresh generator (data order).

    Call it again before building each variant of a run so every variant starts from the same
    initial weights (where the shapes agree) and sees the same batches: comparisons are paired.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# models


def activation(name: str) -> nn.Module:
    """``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"linear"`` as a module."""
    table: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "linear": nn.Identity,
    }
    try:
        return table[name]()
    except KeyError:
        raise ValueError(f"activation: unknown name {name!r}; use one of {sorted(table)}") from None


def norm_factory(kind: str, *, images: bool = False, groups: int = 4) -> NormFactory:
    """normlab's norm layer by name: ``none``, ``bn``, ``ln``, ``gn``, ``in``, ``rms``.

    Args:
        kind: which norm; ``none`` returns None (no layer).
        images: build for ``(N, C, H, W)`` activations instead of ``(N, C)`` features. For
            images ``ln`` is ``GroupNorm(1, C)``, the layer norm of Ba et al. over (C, H, W)
            (``LayerNorm(C)`` on NCHW would normalize over W only).
        groups: number of groups of ``gn``.

    Returns:
        A callable ``num_features -> nn.Module``, or None for ``none``.
    """
    if kind == "none":
        return None
    if images:
        table: dict[str, NormFactory] = {
            "bn": nnl.BatchNorm2d,
            "ln": lambda c: nnl.GroupNorm(1, c),
            "gn": lambda c: nnl.GroupNorm(groups, c),
            "in": lambda c: nnl.InstanceNorm2d(c, affine=True),
        }
    else:
        table = {
            "bn": nnl.BatchNorm1d,
            "ln": nnl.LayerNorm,
            "gn": lambda c: nnl.GroupNorm(groups, c),
            "rms": nnl.RMSNorm,
        }
    try:
        return table[kind]
    except KeyError:
        raise ValueError(
            f"norm_factory: unknown norm {kind!r} for {'images' if images else 'features'}; "
            f"use 'none' or one of {sorted(table)}"
        ) from None


class MLP(nn.Sequential):
    """Fully connected net: ``(Linear -> norm -> activation)`` per hidden layer, then a Linear.

    The norm sits between the linear map and the nonlinearity, as in Ioffe & Szegedy.

    Args:
        in_features: input width.
        widths: hidden widths, one per hidden layer.
        out_features: number of outputs (classes).
        norm: norm factory, or None.
        act: activation name (see :func:`activation`).
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        out_features: int,
        norm: NormFactory = None,
        act: str = "relu",
    ) -> None:
        layers: list[nn.Module] = []
        fan_in = in_features
        for width in widths:
            layers.append(nn.Linear(fan_in, width))
            if norm is not None:
                layers.append(norm(width))
            layers.append(activation(act))
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features))
        super().__init__(*layers)

    def linears(self) -> list[nn.Linear]:
        """The linear layers, input to output."""
        return [m for m in self if isinstance(m, nn.Linear)]


class SmallCNN(nn.Module):
    """A two-convolution net for 8x8 digits: conv-norm-ReLU twice, global average pool, linear.

    With ``padding=0`` the first layer sees no zero padding, so a per-image affine intensity
    change ``a*x + b`` (a > 0) reaches the first norm as a per-channel affine change of its
    input, which instance norm removes exactly.

    Args:
        norm: 2-D norm factory (see ``norm_factory(..., images=True)``), or None.
        channels: output channels of the two convolutions.
        padding: zero padding of both 3x3 convolutions.
        num_classes: outputs.
    """

    def __init__(
        self,
        norm: NormFactory = None,
        channels: tuple[int, int] = (16, 32),
        padding: int = 0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=padding)
        self.norm1 = norm(c1) if norm is not None else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=padding)
        self.norm2 = norm(c2) if norm is not None else nn.Identity()
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, 64)`` flat digits or ``(N, 1, 8, 8)`` images; returns logits."""
        if x.dim() == 2:
            side = math.isqrt(x.shape[1])
            x = x.reshape(x.shape[0], 1, side, side)
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


class RowRNN(nn.Module):
    """An Elman RNN that reads a digit row by row, with a norm inside the cell.

    ``h_t = tanh(norm_t(W_x x_t + W_h h_{t-1}))`` with ``h_0 = 0``; the class comes from a linear
    read-out of the last hidden state. Batch norm gets one layer per time step (statistics per
    step, as in Cooijmans et al. 2016); layer norm is one layer shared over steps (Ba et al.).

    Args:
        norm: ``"none"``, ``"bn"`` or ``"ln"``.
        hidden: hidden size.
        input_size: pixels per row (8 for digits).
        seq_len: number of rows (8 for digits).
        num_classes: outputs.
    """

    def __init__(
        self,
        norm: str = "none",
        hidden: int = 64,
        input_size: int = 8,
        seq_len: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.seq_len = seq_len
        self.w_x = nn.Linear(input_size, hidden, bias=norm == "none")
        self.w_h = nn.Linear(hidden, hidden, bias=False)
        if norm == "bn":
            self.norms = nn.ModuleList(nnl.BatchNorm1d(hidden) for _ in range(seq_len))
        elif norm == "ln":
            shared = nnl.LayerNorm(hidden)
            self.norms = nn.ModuleList([shared] * seq_len)
        elif norm == "none":
            self.norms = nn.ModuleList([nn.Identity()] * seq_len)
        else:
            raise ValueError(f"RowRNN: unknown norm {norm!r}; use 'none', 'bn' or 'ln'")
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, seq_len * input_size)``; returns logits ``(N, num_classes)``."""
        rows = x.reshape(x.shape[0], self.seq_len, self.input_size)
        inputs = self.w_x(rows)  # all steps at once: (N, T, hidden)
        h = torch.zeros(x.shape[0], self.w_h.in_features, dtype=x.dtype)
        for t in range(self.seq_len):
            h = torch.tanh(self.norms[t](inputs[:, t] + self.w_h(h)))
        return self.head(h)


# --------------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class TrainCurves:
    """What :func:`train_classifier` recorded.

    Attributes:
        steps: the evaluation steps (``eval_every, 2*eval_every, ..., steps``).
        test_acc: test accuracy (eval mode) at each evaluation step.
        test_loss: test cross-entropy at each evaluation step (NaN after a divergence).
        train_loss: mean training loss over the steps since the previous evaluation.
        train_acc: train-set accuracy (eval mode) per evaluation, when requested.
        diverged: whether training stopped on a non-finite or exploding loss.
        initial_loss: the first minibatch's loss.
    """

    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    diverged: bool = False
    initial_loss: float = math.nan

    @property
    def final_acc(self) -> float:
        """The last test accuracy."""
        return self.test_acc[-1] if self.test_acc else math.nan


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on ``(x, y)`` in eval mode.

    The model's train/eval mode is restored afterwards, so probes never leave it in eval mode
    and never update batch-norm running statistics.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    acc = (logits.argmax(1) == y).float().mean().item()
    loss = F.cross_entropy(logits, y).item()
    return acc, loss


def train_classifier(
    model: nn.Module,
    data: Split,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    eval_every: int,
    momentum: float = 0.0,
    eval_train: bool = False,
    explode_factor: float = 20.0,
) -> TrainCurves:
    """Minibatch SGD on cross-entropy with periodic evaluation on the test set.

    Batches are drawn with replacement by `generator`. Training stops early, marked diverged,
    when a minibatch loss is non-finite or exceeds ``explode_factor`` times the first loss; the
    remaining evaluation points then repeat the accuracy measured at that moment (about chance)
    with a NaN test loss, so curves of all runs have the same length.

    Args:
        model: the classifier (logits out).
        data: ``(x_train, y_train, x_test, y_test)``.
        steps: number of SGD steps.
        lr: learning rate.
        batch_size: examples per step.
        generator: source of the batch indices.
        eval_every: evaluation period in steps.
        momentum: SGD momentum.
        eval_train: also record train-set accuracy (eval mode) at each evaluation.
        explode_factor: divergence threshold relative to the first loss.

    Returns:
        The curves; see :class:`TrainCurves`.
    """
    x_train, y_train, x_test, y_test = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, foreach=True)
    curves = TrainCurves()
    window: list[float] = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_train), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        value = loss.item()
        if step == 1:
            curves.initial_loss = value
        if not math.isfinite(value) or value > explode_factor * max(curves.initial_loss, 1e-3):
            curves.diverged = True
            break
        window.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            acc, test_loss = evaluate(model, x_test, y_test)
            curves.steps.append(step)
            curves.test_acc.append(acc)
            curves.test_loss.append(test_loss)
            curves.train_loss.append(float(np.mean(window)))
            window = []
            if eval_train:
                curves.train_acc.append(evaluate(model, x_train, y_train)[0])
    if curves.diverged:
        acc = evaluate(model, x_test, y_test)[0]
        train_acc = evaluate(model, x_train, y_train)[0] if eval_train else math.nan
        done = curves.steps[-1] if curves.steps else 0
        grid = list(range(eval_every, steps + 1, eval_every))
        if not grid or grid[-1] != steps:
            grid.append(steps)
        for step in grid:
            if step <= done:
                continue
            curves.steps.append(step)
            curves.test_acc.append(acc)
            curves.test_loss.append(math.nan)
            curves.train_loss.append(math.nan)
            if eval_train:
                curves.train_acc.append(train_acc)
    return curves


def steps_to_target(
    steps: Sequence[int], values: Sequence[float], target: float, budget: int
) -> int:
    """The first evaluation step at which ``values`` reaches ``target``; ``budget`` if never.

    Never reaching the target is right-censored at the training budget, so the value stays
    finite and comparisons understate (never overstate) the gap to a run that does reach it.
    """
    for step, value in zip(steps, values, strict=True):
        if value >= target:
            return int(step)
    return int(budget)


# --------------------------------------------------------------------------------------------
# verdict helpers


def metric_values(results: Sequence[RunResult], key: str) -> list[float]:
    """``results[i].metrics[key]`` for every seed (NaN where missing)."""
    return [float(r.metrics.get(key, math.nan)) for r in results]


def agrees(status: Status, literature: Status | None) -> bool | None:
    """Whether our status matches the literature's; None for contested claims or no call.

    An inconclusive measurement neither confirms nor contradicts: it gives None as well.
    """
    if literature is None or status == "inconclusive":
        return None
    return status == literature


def n_seeds(n: int) -> str:
    """``"1 seed"`` / ``"3 seeds"``."""
    return f"{n} seed{'s' if n != 1 else ''}"


def summarize(effect: float, spread: float, n: int, unit: str, fmt: str = ".2f") -> str:
    """``"3.10 ±0.40 x fewer steps (3 seeds)"``: the effect with its seed spread."""
    spread_text = f" ±{spread:{fmt}}" if math.isfinite(spread) else ""
    return f"{effect:{fmt}}{spread_text} {unit} ({n_seeds(n)})"


# --------------------------------------------------------------------------------------------
# plotting (matplotlib's object API with the Agg canvas: no pyplot, no global state)


def new_figure(
    ncols: int = 1, width: float = 5.0, height: float = 3.6
) -> tuple[Figure, list[Axes]]:
    """A figure with ``ncols`` side-by-side axes, rendered by Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_band(
    ax: Axes,
    x: Sequence[float],
    runs: Sequence[Sequence[float]],
    label: str,
    color: str | None = None,
    **line_kwargs: Any,
) -> None:
    """Mean over seeds as a line and ±1 standard deviation as a shaded band.

    Points where every seed is NaN (e.g. after a divergence) are left out of the line.
    Extra keyword arguments go to ``ax.plot`` (linestyle, marker, ...).
    """
    values = np.asarray([list(r) for r in runs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as wanted
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
    line = ax.plot(list(x), mean, label=label, color=color, **line_kwargs)[0]
    if len(runs) > 1:
        ax.fill_between(list(x), mean - std, mean + std, color=line.get_color(), alpha=0.2)


def save_figure(fig: Figure, out_dir: Path, name: str) -> Path:
    """Write ``fig`` as ``out_dir/name.png`` (creating the folder) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path
