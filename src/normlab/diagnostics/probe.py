"""The probe: one context manager that hooks a model, drives the estimators and keeps the records.

::

    with Probe(model) as probe:
        probe.snapshot(x_probe)             # eval-mode measurements on a fixed probe set
        for x, y in loader:
            loss = loss_fn(model(x), y)     # each forward with gradients opens a step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probe.snapshot(x_probe)
    probe.records                           # [{"layer", "step", "metric", "value"}, ...]
    probe.gradient_flow().verdict           # "healthy", "vanishing" or "exploding"

What is measured, and when:

* **Training steps** (forward passes of the root module with gradients enabled, one step each,
  whatever the mode: fine-tuning with frozen batch norm counts): per layer and
  call, the output's ``mean``, ``std``, ``p15``/``p50``/``p85`` and, for sigmoid/tanh, ``saturated``
  (:class:`ActivationStats`); the norm of the gradient flowing into the output,
  ``grad_output_norm``; per layer with parameters, ``grad_norm`` (all its parameters together) and
  per parameter ``param_grad_norm`` (layer = the parameter's full name) (:class:`GradientNorm`).
  Forward passes without gradients (``torch.no_grad``, ``inference_mode``: validation) are not
  recorded.
* **Snapshots** (:meth:`Probe.snapshot`, a fixed probe set, model in eval mode, no gradients): the
  same activation statistics prefixed ``eval_``; ``dead_fraction`` and ``dead_units`` for ReLU-family
  layers (:class:`DeadUnits`); ``shift_mean`` and ``shift_w1`` for the inputs of layers with
  parameters, against the previous snapshot (:class:`InputDrift`). A snapshot's step is the number
  of steps completed before it (0 before training).

Layers are the leaf modules and the modules with parameters of their own (containers such as
``nn.Sequential`` only pass their children's outputs on). A module called several times per forward
pass is recorded per call, as ``name``, ``name#1``, ... For tuple outputs (``nn.LSTM``, ``nn.GRU``)
the first floating-point tensor is measured. Activations computed by functions (``F.relu``) are
invisible to hooks: use modules for what should be measured.

Hygiene: every hook is removed when the ``with`` block ends, also when it raises; the estimators
keep only small detached tensors (no activation, no graph); gradient hooks ride on the autograd
graph of the step and die with it. Copies made by the one-shot diagnostics
(:func:`train_eval_gap`, :func:`batch_coupling`, :func:`gradient_change`) carry no probe hook.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from normlab.diagnostics._util import (
    RELU_FAMILY,
    CallKeys,
    Record,
    eval_pass,
    first_tensor,
    layer_key,
    mark_probe_hook,
    to_records,
)
from normlab.diagnostics.activations import (
    DEFAULT_PERCENTILES,
    ActivationStats,
    saturation_bounds,
)
from normlab.diagnostics.dead import DeadUnits
from normlab.diagnostics.gradients import GradientFlow, GradientNorm, gradient_flow
from normlab.diagnostics.shift import InputDrift

__all__ = ["Probe"]

LayerSelector = Iterable[str] | Callable[[str, nn.Module], bool]
_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda v: v[-1],
    "first": lambda v: v[0],
    "median": statistics.median,
    "mean": statistics.fmean,
    "max": max,
    "min": min,
}


class Probe:
    """Measure activations, gradients, dead units and input drift of any ``nn.Module``.

    Use as a context manager (see the module docstring); hooks exist only inside the ``with`` block.

    Args:
        model: the model; its forward passes with gradients enabled delimit the steps.
        layers: which submodules to measure: names, or a predicate ``(name, module) -> bool``;
            default: leaf modules and modules with parameters of their own.
        activations: record activation statistics in training steps.
        gradients: record gradient norms in training steps.
        percentiles: the activation percentiles recorded (Ioffe & Szegedy's 15/50/85 by default).
        every: record every `every`-th step only (steps are still counted); lowers the overhead.
        auto_step: each forward of `model` with gradients closes the previous step; if False, call
            :meth:`step` yourself after each optimizer step.
        unit_dim: the dimension indexing units, for dead units and input drift (1: features of
            (N, F), channels of (N, C, *)).
        max_samples: values kept per layer for percentiles and quantiles (beyond: seeded draws).
        seed: seed of those draws.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSelector | None = None,
        activations: bool = True,
        gradients: bool = True,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        every: int = 1,
        auto_step: bool = True,
        unit_dim: int = 1,
        max_samples: int = 1024,
        seed: int = 0,
    ) -> None:
        if every < 1:
            raise ValueError(f"Probe: every must be a positive integer, got {every}")
        self.model = model
        self.activations = activations
        self.gradients = gradients
        self.percentiles = tuple(percentiles)
        self.every = every
        self.auto_step = auto_step
        self.unit_dim = unit_dim
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = self._select(model, layers)
        self.records: list[Record] = []
        #: layer key -> module class name, in order of first measurement.
        self.layer_types: dict[str, str] = {}
        self.step_index = 0
        self._open = False  # a forward with gradients has happened in the current step
        self._recording = False
        self._grad_recording = False
        self._snapshot = False
        self._active = False
        self._handles: list[RemovableHandle] = []
        self._keys = CallKeys()
        self._acts: dict[str, ActivationStats] = {}
        self._out_grads: dict[str, GradientNorm] = {}
        self._param_grads: dict[str, dict[str, GradientNorm]] = {}  # layer -> param -> norm
        self._snap_acts: dict[str, ActivationStats] = {}
        self._dead: dict[str, DeadUnits] = {}
        self._drift: dict[str, InputDrift] = {}

    @staticmethod
    def _select(model: nn.Module, layers: LayerSelector | None) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        if layers is None:
            return {
                n: m for n, m in named.items()
                if not any(True for _ in m.children())
                or any(True for _ in m.parameters(recurse=False))
            }
        if callable(layers):
            return {n: m for n, m in named.items() if layers(n, m)}
        selected = {}
        for name in layers:
            if name not in named:
                raise ValueError(
                    f"Probe: no submodule named {name!r}; names are those of model.named_modules()"
                )
            selected[name] = named[name]
        return selected

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Probe:
        if self._active:
            raise RuntimeError("Probe: already active; a probe's `with` blocks cannot be nested")
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._open:
                self.step()
            else:
                self._flush()
        finally:
            self._remove()
            self._active = False
            self._recording = self._grad_recording = self._snapshot = False

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._root_hook()))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._output_hook(name)))
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if params:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if self.gradients:
                for pname, p in params:
                    full = f"{name}.{pname}" if name else pname
                    hook = self._param_hook(layer_key(name), full)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._keys.clear()

    # -- hooks -------------------------------------------------------------------------------

    def _root_hook(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._keys.clear()
            # A training step builds a graph: validation under no_grad is not one, fine-tuning
            # in eval mode (frozen batch norm) is.
            if self._snapshot or not torch.is_grad_enabled():
                self._recording = False
                return
            if self.auto_step and self._open:
                self.step()
            self._open = True
            self._recording = self.step_index % self.every == 0
            self._grad_recording = self._recording

        return mark_probe_hook(hook)

    def _output_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (self._snapshot or self._recording):
                return
            key = self._keys.next(name)
            y = first_tensor(output)
            if y is None:
                return
            self.layer_types.setdefault(key, type(module).__name__)
            if self._snapshot:
                self._snap_acts.setdefault(key, self._activation_stats(module)).update(y)
                if isinstance(module, RELU_FAMILY):
                    self._dead.setdefault(key, DeadUnits(self.unit_dim)).update(y)
                return
            if self.activations:
                self._acts.setdefault(key, self._activation_stats(module)).update(y)
            if self.gradients and y.requires_grad:
                y.register_hook(self._grad_hook(key))

        return mark_probe_hook(hook)

    def _input_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if not self._snapshot:
                return
            x = first_tensor(args)
            if x is not None:
                key = self._keys.peek(name)  # the output hook counts the call
                drift = self._drift.get(key)
                if drift is None:
                    drift = self._drift[key] = InputDrift(
                        self.unit_dim, max_samples=self.max_samples, generator=self.generator
                    )
                drift.update(x)

        return mark_probe_hook(hook)

    def _grad_hook(self, key: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._active:
                self._out_grads.setdefault(key, GradientNorm()).update(grad)

        return hook

    def _param_hook(self, layer: str, full_name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if self._active and self._grad_recording and param.grad is not None:
                norm = self._param_grads.setdefault(layer, {}).setdefault(full_name, GradientNorm())
                norm.reset()  # .grad already holds the sum over this step's backward passes
                norm.update(param.grad)

        return mark_probe_hook(hook)

    def _activation_stats(self, module: nn.Module) -> ActivationStats:
        return ActivationStats(
            self.percentiles, saturation_bounds(module), self.max_samples, self.generator
        )

    # -- steps and records -------------------------------------------------------------------

    def step(self) -> None:
        """Close the current step: turn its measurements into records and start the next step.

        Called automatically at each forward of the model with gradients when ``auto_step`` is set.
        """
        self._flush()
        self.step_index += 1
        self._open = False

    @property
    def completed_steps(self) -> int:
        """Steps completed so far: the step a snapshot taken now is recorded at."""
        return self.step_index + int(self._open)

    def _flush(self) -> None:
        """Records of the current step from every estimator; the estimators start afresh."""
        rows: list[tuple[str, str, Tensor]] = []
        for key, acts in self._acts.items():
            rows += [(key, metric, value) for metric, value in acts.compute().items()]
        # Backward reaches the last layer first: list the layers in forward order instead.
        order = {key: i for i, key in enumerate(self.layer_types)}
        for key in sorted(self._out_grads, key=lambda k: order.get(k, len(order))):
            rows += [(key, "grad_output_norm", v) for v in self._out_grads[key].compute().values()]
        for layer in sorted(self._param_grads, key=lambda k: order.get(k, len(order))):
            norms = {p: n.compute()["norm"] for p, n in self._param_grads[layer].items()}
            total = torch.stack(list(norms.values())).double().square().sum().sqrt()
            rows.append((layer, "grad_norm", total))
            rows += [(p, "param_grad_norm", norm) for p, norm in norms.items()]
        self._emit(rows, self.step_index)
        self._acts.clear()
        self._out_grads.clear()
        self._param_grads.clear()

    def _emit(self, rows: list[tuple[str, str, Tensor]], step: int) -> None:
        if not rows:
            return
        # One device-to-host transfer per step rather than one per value.
        values = [v.detach().reshape(()) for _, _, v in rows]
        try:
            flat = torch.stack(values).double().tolist()
        except RuntimeError:  # values on several devices (a model split across devices)
            flat = [float(v) for v in values]
        for (layer, metric, _), value in zip(rows, flat):
            self.records.append(Record(layer=layer, step=step, metric=metric, value=value))

    def snapshot(self, x: Tensor, *, batch_size: int = 256) -> list[Record]:
        """Measure the model on the probe set `x` in eval mode, without gradients.

        Records ``eval_*`` activation statistics, ``dead_fraction``/``dead_units`` of ReLU-family
        layers and ``shift_mean``/``shift_w1`` of the inputs of layers with parameters (against the
        previous snapshot) at step :attr:`completed_steps`. Use the same `x` every time: the drift
        and the dead-unit definition assume a fixed probe set. Modes are restored afterwards.

        Returns:
            The records added.

        Raises:
            RuntimeError: outside the probe's ``with`` block.
        """
        if not self._active:
            raise RuntimeError(
                "Probe.snapshot: the probe is not active; call it inside `with Probe(model) as "
                "probe:`"
            )
        start = len(self.records)
        self._snapshot = True
        try:
            eval_pass(self.model, x, batch_size, self._keys)
        finally:
            self._snapshot = False
        out: list[tuple[str, str, Tensor]] = []
        for key, acts in self._snap_acts.items():
            out += [(key, "eval_" + m, v) for m, v in acts.compute().items()]
        for key, dead in self._dead.items():
            out += [(key, m, v) for m, v in dead.compute().items()]
        for key, drift in self._drift.items():
            out += [(key, m, v) for m, v in drift.compute().items()]
        self._snap_acts.clear()
        self._dead.clear()
        self._emit(out, self.completed_steps)
        return self.records[start:]

    def log(self, results: Any, *, prefix: str = "", layer: str = "model") -> list[Record]:
        """Add the results of a one-shot diagnostic (e.g. :func:`running_stats_gap`) as records at
        step :attr:`completed_steps`; see :func:`to_records` for the accepted shapes."""
        new = to_records(results, step=self.completed_steps, prefix=prefix, layer=layer)
        self.records += new
        return new

    # -- reading the records -----------------------------------------------------------------

    def select(
        self, metric: str | None = None, layer: str | None = None, step: int | None = None
    ) -> list[Record]:
        """The records matching every given field."""
        return [
            r for r in self.records
            if (metric is None or r["metric"] == metric)
            and (layer is None or r["layer"] == layer)
            and (step is None or r["step"] == step)
        ]

    def layer_values(self, metric: str, reduce: str = "last") -> dict[str, float]:
        """One value of `metric` per layer, reduced over steps, in order of first record.

        Args:
            metric: e.g. ``"grad_norm"``, ``"std"``, ``"dead_fraction"``.
            reduce: ``"last"``, ``"first"``, ``"median"``, ``"mean"``, ``"max"`` or ``"min"``.
        """
        if reduce not in _REDUCERS:
            raise ValueError(f"Probe.layer_values: reduce must be one of {list(_REDUCERS)}, "
                             f"got {reduce!r}")
        series: dict[str, list[float]] = {}
        for r in self.records:
            if r["metric"] == metric:
                series.setdefault(r["layer"], []).append(r["value"])
        return {layer: _REDUCERS[reduce](values) for layer, values in series.items()}

    def gradient_flow(self, reduce: str = "median") -> GradientFlow:
        """:func:`gradient_flow` of the per-layer ``grad_norm``, reduced over steps."""
        return gradient_flow(self.layer_values("grad_norm", reduce))
