"""``normlab doctor``: train a model a few steps and say what is wrong with its signal flow.

Given a model factory, data (or an input shape) and a batch size, :func:`doctor` trains a few
steps under a :class:`~normlab.diagnostics.Probe`, runs the one-shot diagnostics, and reports a
table per layer (gradient norm, activation spread, dead fraction, saturation, batch-norm noise)
and *findings*: each one a measured number past a documented threshold, with its evidence.

Training setup:
    * Loss: cross-entropy when the targets are integer labels, mean squared error otherwise
      (``loss="ce"`` / ``"mse"`` to force one).
    * Optimizer: SGD (lr 0.01, momentum 0.9) or Adam (lr 1e-3); ``lr`` overrides.
    * Data: a file (``.npz`` with ``x`` and optionally ``y``; ``.pt`` holding a tensor, a dict with
      ``"x"``/``"y"`` or a tuple ``(x, y)``, loaded with ``torch.load(weights_only=True)`` only,
      never unpickled in full; ``.csv`` with a header, whose column ``y``/``label``/``target`` is the
      target) or arrays/tensors ``(x, y)``.
    * Synthesized data (input shape only, or a file without targets): inputs ~ N(0, 1), 8 batches or
      512 samples, whichever is more; targets from a fixed random *linear teacher*,
      ``t = flatten(x) @ W`` with W ~ N(0, 1/d) (seeded): class labels ``argmax(t)`` when the model
      outputs (N, K) with K >= 2, else ``t`` shaped like the output (MSE). The task is learnable, so
      accuracies mean something; the signal-flow numbers do not depend on it.
    * Batches: a seeded reshuffle each epoch, whole batches only. Probe set (dead units,
      train/eval gap): the first 512 samples (at least one batch).

Thresholds of the findings (module constants):
    * ``vanishing_gradients`` / ``exploding_gradients``: the first-to-last ratio of the median
      per-layer gradient norms below 1e-3 / above 1e3 (:mod:`normlab.diagnostics.gradients`).
    * ``saturation``: a sigmoid/tanh layer with ``SATURATION_ALARM`` (20%) or more of its outputs
      saturated (median over steps; saturation as in :mod:`normlab.diagnostics.activations`).
    * ``dead_units``: a ReLU-family layer with ``DEAD_ALARM`` (25%) or more dead units on the probe
      set after training (:mod:`normlab.diagnostics.dead`).
    * ``batch_noise``: a batch-norm layer whose batch means at the training batch size stray by
      ``BN_NOISE_ALARM`` (0.3 population std, RMS) or more (:mod:`normlab.diagnostics.noise`): about
      what i.i.d. features give at batch 11; in Wu & He (2018, Table 2) BN's error grows from 8
      images per GPU down (23.7% at 16, 24.8% at 8, 34.7% at 2).
      The table's risk column says "high" from 0.3, "moderate" from 0.2, "low" below.
    * ``train_eval_gap`` (:mod:`normlab.diagnostics.discrepancy`, on the probe set): train-mode and
      eval-mode accuracy differing by ``ACCURACY_GAP_ALARM`` (10 points) or more, or predicted
      classes differing on ``DISAGREEMENT_ALARM`` (25%) or more of the samples; for outputs that
      are not class scores, a relative output gap of ``OUTPUT_GAP_ALARM`` (0.5) or more. (On
      digits, a BatchNorm MLP after 20 SGD steps disagrees on 7-12% of the samples at batch 32-64,
      14-18% at 16, 35-66% at 2-4; accuracy gaps up to 5 points are sampling noise at 512
      samples.)
    * ``stale_running_stats``: a layer's running mean off its input's population mean by
      ``RUNNING_STATS_ALARM`` (0.5 population std, averaged over channels) or more.
    * ``diverged``: a loss that is not finite (training stops there).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from normlab.diagnostics._util import (
    Record,
    first_tensor,
    has_running_stats,
    is_batch_norm,
    restore_modes,
)
from normlab.diagnostics.coupling import batch_coupling
from normlab.diagnostics.discrepancy import running_stats_gap, train_eval_gap
from normlab.diagnostics.gradients import GradientFlow
from normlab.diagnostics.noise import bn_input_noise
from normlab.diagnostics.probe import Probe

__all__ = [
    "ACCURACY_GAP_ALARM",
    "BN_NOISE_ALARM",
    "DEAD_ALARM",
    "DISAGREEMENT_ALARM",
    "OUTPUT_GAP_ALARM",
    "RUNNING_STATS_ALARM",
    "SATURATION_ALARM",
    "DoctorError",
    "DoctorReport",
    "Finding",
    "add_arguments",
    "doctor",
    "load_data",
    "main",
    "resolve_factory",
    "run",
]

SATURATION_ALARM = 0.2
DEAD_ALARM = 0.25
BN_NOISE_ALARM = 0.3
BN_NOISE_MODERATE = 0.2
ACCURACY_GAP_ALARM = 0.10
DISAGREEMENT_ALARM = 0.25
OUTPUT_GAP_ALARM = 0.5
RUNNING_STATS_ALARM = 0.5

_PROBE_SIZE = 512
_NOISE_CURVE = (2, 4, 8, 16, 32, 64, 128)
_TARGET_COLUMNS = ("y", "label", "target")


class DoctorError(ValueError):
    """A bad factory, data file or setting: the message says which and how to fix it."""


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a measured number past a documented threshold.

    Attributes:
        code: stable identifier, e.g. ``"vanishing_gradients"``.
        message: one readable sentence with the number and a remedy.
        layers: the layers concerned (empty for model-level findings).
        evidence: the measured numbers behind it.
    """

    code: str
    message: str
    layers: tuple[str, ...] = ()
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class DoctorReport:
    """What :func:`doctor` measured and concluded.

    Attributes:
        settings: the run's setup (factory, batch size, steps, optimizer, loss, data).
        layers: one dict per layer in forward order (``None`` where a column does not apply).
        summary: model-level numbers (losses, gradient flow, accuracies, coupling).
        findings: the diagnoses; empty when nothing crossed a threshold.
        records: the probe's raw records.
    """

    settings: dict[str, Any]
    layers: list[dict[str, Any]]
    summary: dict[str, Any]
    findings: list[Finding]
    records: list[Record] = field(repr=False, default_factory=list)

    @property
    def codes(self) -> set[str]:
        """The codes of the findings."""
        return {f.code for f in self.findings}

    def to_dict(self, records: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become None); raw records only if asked."""
        out = {
            "settings": self.settings,
            "summary": self.summary,
            "layers": self.layers,
            "findings": [asdict(f) for f in self.findings],
        }
        if records:
            out["records"] = self.records
        return _json_safe(out)

    def to_json(self, records: bool = False) -> str:
        return json.dumps(self.to_dict(records), indent=2)

    def render(self, file: TextIO | None = None) -> None:
        """Print the table, the summary and the findings (with ``rich`` when installed)."""
        stream = file if file is not None else sys.stdout
        header, rows = _table(self)
        title = (
            f"normlab doctor: {self.settings['factory']} | batch {self.settings['batch_size']}, "
            f"{self.summary['steps_run']} steps, {self.settings['optimizer']}, "
            f"{self.settings['loss']} loss"
        )
        lines = _summary_lines(self)
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich is in the [lab] extra: plain text keeps doctor usable without
            _render_plain(stream, title, header, rows, lines, self.findings)
            return
        # A terminal keeps its own width; a pipe or file gets one wide enough for the table.
        console = Console(file=stream, highlight=False, width=None if stream.isatty() else 132)
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in lines:
            console.print(line, markup=False)
        console.print()
        if not self.findings:
            console.print("No findings: no measured number crossed a threshold.", markup=False)
        for f in self.findings:
            console.print(f"[bold yellow]![/] {f.code}: ", end="")
            console.print(f.message, markup=False)


def doctor(
    factory: str | Callable[[], nn.Module],
    data: str | Path | tuple[Any, Any] | Any | None = None,
    *,
    input_shape: str | Sequence[int] | None = None,
    batch_size: int = 32,
    steps: int = 20,
    optimizer: str = "sgd",
    lr: float | None = None,
    loss: str = "auto",
    seed: int = 0,
) -> DoctorReport:
    """Train a fresh model from `factory` for `steps` steps and diagnose it (module docstring).

    Args:
        factory: a callable returning the model, or ``"package.module:function"`` /
            ``"path/to/file.py:function"``.
        data: a data file path, an ``(x, y)`` pair of arrays/tensors, or inputs ``x`` alone.
        input_shape: the shape of one input sample (e.g. ``(1, 8, 8)`` or ``"1,8,8"``), when no
            data is given: inputs and targets are synthesized.
        batch_size: the training batch size (per process: what batch norm sees).
        steps: optimizer steps.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate (default 0.01 for SGD, 1e-3 for Adam).
        loss: ``"auto"``, ``"ce"`` or ``"mse"``.
        seed: seeds the model's initialization, the synthesized data and the batch order.

    Raises:
        DoctorError: for a bad factory, data, shape or setting, or a model that rejects the input.
    """
    if batch_size < 1 or steps < 1:
        raise DoctorError(f"batch size and steps must be >= 1, got {batch_size} and {steps}")
    if optimizer not in ("sgd", "adam"):
        raise DoctorError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    if loss not in ("auto", "ce", "mse"):
        raise DoctorError(f"unknown loss {loss!r}; use 'auto', 'ce' or 'mse'")
    if (data is None) == (input_shape is None):
        raise DoctorError("give either data or an input shape (exactly one of them)")
    if lr is None:
        lr = 0.01 if optimizer == "sgd" else 1e-3
    name = factory if isinstance(factory, str) else getattr(factory, "__name__", repr(factory))
    build = resolve_factory(factory)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
        torch.manual_seed(seed)
        model = _build(build, name)
        gen = torch.Generator().manual_seed(seed)
        x, y, source = _inputs(data, input_shape, batch_size, gen)
        out = _check_forward(model, x, name)
        if y is None:
            y = _teacher_targets(x, out, gen)
            source += ", targets from a random linear teacher"
        loss_name, loss_fn, y = _choose_loss(loss, out, y)
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
            else torch.optim.Adam(model.parameters(), lr=lr)
        )
        n_probe = min(x.shape[0], max(_PROBE_SIZE, batch_size))
        probe, losses = _train(model, opt, loss_fn, x, y, x[:n_probe], batch_size, steps, gen,
                               name)
        summary, flow, noise, gap, stale = _measure(model, probe, losses, x, y, n_probe,
                                                    batch_size)
    report = DoctorReport(
        settings={
            "factory": name,
            "data": source,
            "samples": int(x.shape[0]),
            "probe_samples": n_probe,
            "batch_size": batch_size,
            "steps": steps,
            "optimizer": optimizer,
            "lr": lr,
            "loss": loss_name,
            "seed": seed,
        },
        layers=_layer_rows(probe, noise, batch_size),
        summary=summary,
        findings=[],
        records=probe.records,
    )
    report.findings = _findings(report, losses, flow, noise, gap, stale, batch_size)
    return report


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor, y: Tensor, x_probe: Tensor, batch_size: int, steps: int, gen: torch.Generator,
    name: str,
) -> tuple[Probe, list[float]]:
    """`steps` optimizer steps under a probe, with snapshots on the probe set before and after;
    stops at a non-finite loss."""
    losses: list[float] = []
    model.train()
    with Probe(model) as probe:
        probe.snapshot(x_probe)
        for step, rows in enumerate(_batch_order(x.shape[0], batch_size, steps, gen)):
            try:
                value = loss_fn(_output(model(x[rows])), y[rows])
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise DoctorError(f"{name}: training step {step} failed: {_first_line(err)}") from err
            losses.append(float(value.detach()))
            if not math.isfinite(losses[-1]):
                break
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        probe.snapshot(x_probe)
    return probe, losses


def _measure(
    model: nn.Module, probe: Probe, losses: list[float], x: Tensor, y: Tensor, n_probe: int,
    batch_size: int,
) -> tuple[dict[str, Any], GradientFlow | None, dict[str, Any], Any, dict[str, Any]]:
    """The model-level summary and the one-shot diagnostics of the trained model."""
    summary: dict[str, Any] = {
        "steps_run": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    flow = probe.gradient_flow() if len(probe.layer_values("grad_norm")) >= 2 else None
    if flow is not None:
        summary.update(grad_first_layer=flow.first, grad_last_layer=flow.last,
                       grad_ratio=flow.ratio, grad_verdict=flow.verdict)
    if batch_size >= 2 and x.shape[0] >= 2 * batch_size - 1:
        coupling = batch_coupling(model, x[:batch_size], x[batch_size : 2 * batch_size - 1])
        summary["coupling"] = coupling.relative
    noise: dict[str, Any] = {}
    gap = None
    stale: dict[str, Any] = {}
    if any(is_batch_norm(m) for m in model.modules()):
        sizes = sorted({batch_size, *(b for b in _NOISE_CURVE if b <= x.shape[0])})
        noise = bn_input_noise(model, x, sizes)
    if any(has_running_stats(m) for m in model.modules()):
        gap = train_eval_gap(model, x[:n_probe], y[:n_probe], batch_size=batch_size)
        summary.update(train_mode_accuracy=gap.train_accuracy, eval_mode_accuracy=gap.eval_accuracy,
                       train_eval_output_gap=gap.output_gap, train_eval_disagreement=gap.disagreement)
        stale = running_stats_gap(model, x[:2048])
    return summary, flow, noise, gap, stale


# -- inputs ---------------------------------------------------------------------------------------


def resolve_factory(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The callable behind ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise DoctorError(
            f"model factory {spec!r} must look like 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise DoctorError(f"model factory {spec!r} must look like 'package.module:function'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise DoctorError(f"model factory {spec!r}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None:
                raise DoctorError(f"model factory {spec!r}: cannot load {where} as Python")
            module: Any = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except DoctorError:
        raise
    except Exception as err:  # an import runs arbitrary code: any failure is the factory's
        raise DoctorError(f"model factory {spec!r}: cannot import {where}: {_first_line(err)}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DoctorError(f"model factory {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DoctorError(f"model factory {spec!r}: {attr} is not callable")
    return obj


def _build(build: Callable[[], Any], name: str) -> nn.Module:
    try:
        model = build()
    except Exception as err:
        raise DoctorError(f"model factory {name} raised {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise DoctorError(
            f"model factory {name} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _parse_shape(shape: str | Sequence[int]) -> tuple[int, ...]:
    try:
        dims = (
            tuple(int(v) for v in shape.replace("x", ",").split(",") if v.strip())
            if isinstance(shape, str)
            else tuple(int(v) for v in shape)
        )
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise DoctorError(
            f"input shape {shape!r} must be positive integers separated by commas, e.g. 1,28,28"
        )
    return dims


def load_data(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Inputs and optional targets from a ``.npz``, ``.pt`` or ``.csv`` file (module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise DoctorError(f"data file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as arrays:
                if "x" not in arrays.files:
                    raise DoctorError(
                        f"data file {p} has no array 'x' (it has: {', '.join(arrays.files)})"
                    )
                return _tensor(arrays["x"]), _tensor(arrays["y"]) if "y" in arrays.files else None
        if suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            return _unpack(obj, p)
        if suffix == ".csv":
            return _read_csv(p)
    except DoctorError:
        raise
    except Exception as err:
        raise DoctorError(f"cannot read data file {p}: {_first_line(err)}") from err
    raise DoctorError(f"data file {p}: unsupported suffix {suffix!r}; use .npz, .pt or .csv")


def _unpack(obj: Any, p: Path) -> tuple[Tensor, Tensor | None]:
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, dict) and "x" in obj:
        return _tensor(obj["x"]), _tensor(obj["y"]) if obj.get("y") is not None else None
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return _tensor(obj[0]), _tensor(obj[1]) if len(obj) == 2 else None
    raise DoctorError(
        f"data file {p} must hold a tensor, a dict with 'x' (and 'y'), or a tuple (x, y); "
        f"got {type(obj).__name__}"
    )


def _read_csv(p: Path) -> tuple[Tensor, Tensor | None]:
    header = [h.strip().lower() for h in p.read_text().splitlines()[0].split(",")]
    table = np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2)
    target = next((header.index(c) for c in _TARGET_COLUMNS if c in header), None)
    if target is None:
        return _tensor(table), None
    y = table[:, target]
    if np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return _tensor(np.delete(table, target, axis=1)), _tensor(y)


def _tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == object:
        raise DoctorError("data arrays must be numeric, got an object array")
    return torch.from_numpy(np.ascontiguousarray(array))


def _inputs(
    data: Any, input_shape: str | Sequence[int] | None, batch_size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor | None, str]:
    """Inputs, optional targets and a description: loaded or given, else synthesized."""
    if input_shape is not None:
        shape = _parse_shape(input_shape)
        x = torch.randn((max(8 * batch_size, _PROBE_SIZE), *shape), generator=gen)
        return x, None, f"synthetic N(0,1) inputs of shape {list(shape)}"
    x, y, source = _as_data(data)
    if x.shape[0] < batch_size:
        raise DoctorError(f"the data has {x.shape[0]} samples, fewer than one batch of {batch_size}")
    return x, y, source


def _as_data(data: Any) -> tuple[Tensor, Tensor | None, str]:
    if isinstance(data, (str, Path)):
        x, y = load_data(data)
        source = str(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _tensor(data[0]), None if data[1] is None else _tensor(data[1])
        source = "given arrays"
    else:
        x, y = _tensor(data), None
        source = "given array"
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() == 0 or x.shape[0] == 0:
        raise DoctorError(f"the data has no samples (x of shape {list(x.shape)})")
    if x.dtype == torch.bool or x.is_complex():
        raise DoctorError(f"inputs must be real numbers, got dtype {x.dtype}")
    x = x.float()
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise DoctorError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        y = y.long() if not y.is_floating_point() else y.float()
    return x, y, source


def _check_forward(model: nn.Module, x: Tensor, name: str) -> Tensor:
    """One eval-mode forward (changes no buffer) to check that the model takes the input."""
    try:
        with torch.no_grad(), restore_modes(model):
            return _output(model.eval()(x[: min(2, x.shape[0])]))
    except Exception as err:
        raise DoctorError(
            f"{name} rejects inputs of shape {list(x.shape[1:])} (per sample): {_first_line(err)}"
        ) from err


def _output(out: Any) -> Tensor:
    t = first_tensor(out)
    if t is None:
        raise DoctorError("the model returned no floating-point tensor")
    return t


def _teacher_targets(x: Tensor, out: Tensor, gen: torch.Generator) -> Tensor:
    flat = x.flatten(1)
    width = out[0].numel()
    w = torch.randn(flat.shape[1], width, generator=gen) / math.sqrt(flat.shape[1])
    t = flat @ w
    if out.dim() == 2 and out.shape[1] >= 2:
        return t.argmax(1)
    return t.reshape(x.shape[0], *out.shape[1:])


def _choose_loss(
    loss: str, out: Tensor, y: Tensor
) -> tuple[str, Callable[[Tensor, Tensor], Tensor], Tensor]:
    if loss == "auto":
        loss = "mse" if y.is_floating_point() else "ce"
    if loss == "ce":
        if y.is_floating_point():
            raise DoctorError("cross-entropy needs integer class labels; got float targets")
        if out.dim() < 2 or out.shape[1] < 2:
            raise DoctorError(
                f"cross-entropy needs (N, classes) outputs; the model outputs {list(out.shape)}"
            )
        if int(y.max()) >= out.shape[1] or int(y.min()) < 0:
            raise DoctorError(
                f"labels range over [{int(y.min())}, {int(y.max())}] but the model outputs "
                f"{out.shape[1]} classes"
            )
        return "cross-entropy", nn.functional.cross_entropy, y
    y = y.float()
    if y.shape[1:] != out.shape[1:]:
        if y[0].numel() != out[0].numel():
            raise DoctorError(
                f"targets of shape {list(y.shape[1:])} per sample do not match the model's "
                f"output shape {list(out.shape[1:])}"
            )
        y = y.reshape(y.shape[0], *out.shape[1:])
    return "mse", nn.functional.mse_loss, y


def _batch_order(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Any:
    per_epoch = n // batch_size
    step = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for k in range(per_epoch):
            if step == steps:
                return
            yield perm[k * batch_size : (k + 1) * batch_size]
            step += 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# -- report ---------------------------------------------------------------------------------------


def _layer_rows(probe: Probe, noise: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    median = {m: probe.layer_values(m, "median")
              for m in ("grad_norm", "mean", "std", "p15", "p50", "p85", "saturated")}
    dead = probe.layer_values("dead_fraction", "last")
    rows = []
    for key, kind in probe.layer_types.items():
        at_b = noise.get(key, {}).get(batch_size)
        row = {
            "layer": key,
            "type": kind,
            "grad_norm": median["grad_norm"].get(key),
            "act_mean": median["mean"].get(key),
            "act_std": median["std"].get(key),
            "p15": median["p15"].get(key),
            "p50": median["p50"].get(key),
            "p85": median["p85"].get(key),
            "saturated": median["saturated"].get(key),
            "dead_fraction": dead.get(key),
            "bn_mean_noise": None if at_b is None else at_b.mean_noise,
            "bn_var_noise": None if at_b is None else at_b.var_noise,
            "bn_risk": None if at_b is None else _risk(at_b.mean_noise),
        }
        if key in noise:
            row["bn_noise_curve"] = {b: v.mean_noise for b, v in noise[key].items()}
        rows.append(row)
    return rows


def _risk(mean_noise: float) -> str:
    if mean_noise >= BN_NOISE_ALARM:
        return "high"
    return "moderate" if mean_noise >= BN_NOISE_MODERATE else "low"


def _findings(
    report: DoctorReport,
    losses: list[float],
    flow: GradientFlow | None,
    noise: dict[str, Any],
    gap: Any,
    stale: dict[str, Any],
    batch_size: int,
) -> list[Finding]:
    found: list[Finding] = []
    if not math.isfinite(losses[-1]):
        found.append(Finding(
            "diverged",
            f"the loss became {losses[-1]} at step {len(losses) - 1}: lower the learning rate, "
            "or normalize the layers/inputs",
            evidence={"step": float(len(losses) - 1)},
        ))
    if flow is not None and flow.verdict != "healthy":
        ends = f"from the last layer '{flow.last}' to the first '{flow.first}'"
        norms = f"median norms {flow.last_norm:.2e} vs {flow.first_norm:.2e}"
        if flow.verdict == "vanishing" and flow.first_norm == 0:
            message = (f"the first layer '{flow.first}' gets no gradient at all ({norms}): "
                       "dead or saturated units between it and the loss block the gradient")
        elif flow.verdict == "vanishing":
            message = (f"gradients shrink 10^{-flow.orders_of_magnitude:.1f} {ends} ({norms}); "
                       "add normalization layers or use a variance-preserving init (He/Glorot)")
        elif not math.isfinite(flow.ratio) or not math.isfinite(flow.first_norm):
            message = (f"gradients are not finite or blow up {ends} ({norms}); lower the learning "
                       "rate or the init scale, or normalize")
        else:
            message = (f"gradients grow 10^{flow.orders_of_magnitude:.1f} {ends} ({norms}); lower "
                       "the init scale or the learning rate, or normalize")
        found.append(Finding(
            f"{flow.verdict}_gradients", message, (flow.first, flow.last),
            {"ratio": flow.ratio, "first_norm": flow.first_norm, "last_norm": flow.last_norm},
        ))
    rows = report.layers
    saturated = {r["layer"]: r["saturated"] for r in rows
                 if r["saturated"] is not None and r["saturated"] >= SATURATION_ALARM}
    if saturated:
        worst = max(saturated, key=saturated.__getitem__)
        n_sat = sum(r["saturated"] is not None for r in rows)
        found.append(Finding(
            "saturation",
            f"{len(saturated)} of {n_sat} sigmoid/tanh layers saturate: {saturated[worst]:.0%} of "
            f"the outputs of layer '{worst}' lie within 1% of their bounds (slope < 4% of its "
            "peak); normalize the pre-activations (BatchNorm) or shrink the init",
            tuple(saturated), dict(saturated),
        ))
    dead = {r["layer"]: r["dead_fraction"] for r in rows
            if r["dead_fraction"] is not None and r["dead_fraction"] >= DEAD_ALARM}
    if dead:
        worst = max(dead, key=dead.__getitem__)
        found.append(Finding(
            "dead_units",
            f"{dead[worst]:.0%} of the units of layer '{worst}' output 0 for every probe sample "
            "(eval mode, "
            f"{report.settings['probe_samples']} samples); check the biases and learning rate, "
            "or normalize before the ReLU",
            tuple(dead), dict(dead),
        ))
    noisy = {k: v[batch_size] for k, v in noise.items()
             if batch_size in v and v[batch_size].mean_noise >= BN_NOISE_ALARM}
    if noisy:
        worst = max(noisy, key=lambda k: noisy[k].mean_noise)
        found.append(Finding(
            "batch_noise",
            f"BatchNorm at batch {batch_size} per process: batch statistics noise "
            f"{noisy[worst].mean_noise:.0%} of a std in the mean and {noisy[worst].var_noise:.0%} "
            f"in the variance (layer '{worst}'); consider GroupNorm or SyncBatchNorm",
            tuple(noisy),
            {f"{k}.mean_noise": v.mean_noise for k, v in noisy.items()}
            | {f"{k}.var_noise": v.var_noise for k, v in noisy.items()},
        ))
    if gap is not None:
        message = _train_eval_message(gap, batch_size)
        if message:
            found.append(Finding(
                "train_eval_gap", message, (),
                {"accuracy_gap": gap.accuracy_gap, "disagreement": gap.disagreement,
                 "output_gap": gap.output_gap, "train_accuracy": gap.train_accuracy,
                 "eval_accuracy": gap.eval_accuracy},
            ))
    off = {k: v for k, v in stale.items() if v.mean_gap >= RUNNING_STATS_ALARM}
    if off:
        worst = max(off, key=lambda k: off[k].mean_gap)
        found.append(Finding(
            "stale_running_stats",
            f"the running mean of layer '{worst}' is {off[worst].mean_gap:.2f} population std off its "
            "input's mean (average over channels): recalibrate with precise_bn",
            tuple(off), {f"{k}.mean_gap": v.mean_gap for k, v in off.items()},
        ))
    return found


def _train_eval_message(gap: Any, batch_size: int) -> str:
    acc = gap.accuracy_gap
    if math.isfinite(acc) and acc >= ACCURACY_GAP_ALARM:
        return (f"eval-mode accuracy {100 * acc:.0f} points below train-mode "
                f"({gap.eval_accuracy:.0%} vs {gap.train_accuracy:.0%}): the running statistics do "
                "not match the data; recalibrate with precise_bn")
    if math.isfinite(acc) and acc <= -ACCURACY_GAP_ALARM:
        return (f"train-mode accuracy {-100 * acc:.0f} points below eval-mode "
                f"({gap.train_accuracy:.0%} vs {gap.eval_accuracy:.0%}): batch statistics at batch "
                f"{batch_size} are too noisy; use larger batches, GroupNorm or batch renorm")
    if math.isfinite(gap.disagreement) and gap.disagreement >= DISAGREEMENT_ALARM:
        return (f"train-mode and eval-mode predictions disagree on {gap.disagreement:.0%} of the "
                f"probe samples at batch {batch_size}: batch statistics differ from the running "
                "ones; use larger batches or GroupNorm, or recalibrate with precise_bn")
    if not math.isfinite(gap.disagreement) and gap.output_gap >= OUTPUT_GAP_ALARM:
        return (f"train-mode and eval-mode outputs differ by {gap.output_gap:.0%} (relative) at "
                f"batch {batch_size}: recalibrate with precise_bn, or use larger batches")
    return ""


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "sci":
        return f"{value:.1e}"
    return f"{value:.2f}"


def _table(report: DoctorReport) -> tuple[list[str], list[list[str]]]:
    b = report.settings["batch_size"]
    header = ["layer", "type", "grad norm", "act mean", "act std", "p15 .. p85", "dead",
              "saturated", f"BN risk @{b}"]
    rows = []
    for r in report.layers:
        spread = "-" if r["p15"] is None else f"{r['p15']:.2f} .. {r['p85']:.2f}"
        risk = "-" if r["bn_risk"] is None else f"{r['bn_risk']} ({r['bn_mean_noise']:.0%})"
        rows.append([
            r["layer"], r["type"], _fmt(r["grad_norm"], "sci"), _fmt(r["act_mean"], "f"),
            _fmt(r["act_std"], "f"), spread, _fmt(r["dead_fraction"], "pct"),
            _fmt(r["saturated"], "pct"), risk,
        ])
    return header, rows


def _summary_lines(report: DoctorReport) -> list[str]:
    s = report.summary
    lines = [f"data: {report.settings['data']} ({report.settings['samples']} samples)",
             f"loss: {s['loss_first']:.4g} -> {s['loss_last']:.4g} over {s['steps_run']} steps"]
    if "grad_ratio" in s:
        lines.append(f"gradient flow: first/last layer norm ratio {s['grad_ratio']:.2e} "
                     f"({s['grad_verdict']})")
    if "train_mode_accuracy" in s and math.isfinite(s["train_mode_accuracy"]):
        lines.append(f"probe-set accuracy: train mode {s['train_mode_accuracy']:.1%}, "
                     f"eval mode {s['eval_mode_accuracy']:.1%}")
    if "train_eval_output_gap" in s:
        line = f"train/eval output gap: {s['train_eval_output_gap']:.1%} (relative)"
        if math.isfinite(s["train_eval_disagreement"]):
            line += f", predictions differ on {s['train_eval_disagreement']:.1%} of the samples"
        lines.append(line)
    if "coupling" in s:
        lines.append(f"batch coupling (train mode): {s['coupling']:.2%} change of one sample's "
                     "output when the rest of its batch is replaced")
    return lines


def _render_plain(
    stream: TextIO, title: str, header: list[str], rows: list[list[str]], lines: list[str],
    findings: list[Finding],
) -> None:
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    print(title, file=stream)
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=stream)
    for line in lines:
        print(line, file=stream)
    print(file=stream)
    if not findings:
        print("No findings: no measured number crossed a threshold.", file=stream)
    for f in findings:
        print(f"! {f.code}: {f.message}", file=stream)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``normlab doctor``'s arguments to `parser`."""
    parser.add_argument(
        "factory", help="model factory: 'package.module:function' or 'path/to/file.py:function'"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="FILE",
        help=".npz with x (and y), .pt with a tensor / {'x','y'} / (x, y) (weights_only load), "
             "or .csv with a header (column y/label/target = targets)",
    )
    source.add_argument(
        "--input-shape", metavar="SHAPE",
        help="shape of one input sample, e.g. 1,28,28: random inputs, random-teacher targets",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per-process batch (32)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (20)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=None, help="(SGD 0.01, Adam 1e-3)")
    parser.add_argument("--loss", choices=("auto", "ce", "mse"), default="auto",
                        help="auto: cross-entropy for integer labels, else MSE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``normlab doctor`` with parsed `args`; 0 on success, 2 on a bad factory or input."""
    try:
        report = doctor(
            args.factory,
            args.data,
            input_shape=args.input_shape,
            batch_size=args.batch_size,
            steps=args.steps,
            optimizer=args.optimizer,
            lr=args.lr,
            loss=args.loss,
            seed=args.seed,
        )
    except DoctorError as err:
        print(f"normlab doctor: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        report.render()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m normlab.diagnostics.doctor ...``."""
    parser = argparse.ArgumentParser(
        prog="normlab doctor",
        description="Train a model a few steps and report its signal flow, with findings.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
