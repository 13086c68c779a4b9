"""Diagnostics: measure what the claims about normalization are about, on any ``nn.Module``.

* :class:`Probe` - one context manager that hooks a model during training and records activation
  statistics, gradient norms, dead units and input drift as tidy records.
* One-shot measures on a model and data: :func:`dead_units`, :func:`gradient_change` (Santurkar's
  internal covariate shift), :func:`batch_coupling`, :func:`train_eval_gap`,
  :func:`running_stats_gap`, :func:`batch_stat_noise` / :func:`bn_input_noise`.
* The estimators they are built from, each with ``update()`` / ``compute()`` / ``reset()``:
  :class:`ActivationStats`, :class:`GradientNorm`, :class:`DeadUnits`, :class:`InputDrift`.
* :mod:`normlab.diagnostics.doctor` - ``doctor()`` trains a model a few steps and reports findings
  with their evidence (``normlab doctor`` on the command line). Import it from its module:
  ``from normlab.diagnostics.doctor import doctor`` (the package does not import it, so that
  ``normlab.diagnostics.doctor`` always names the module and ``python -m`` runs it cleanly).

Every measure's definition, paper and threshold is in its module's docstring.
"""

from normlab.diagnostics._util import Record, first_tensor, layer_key, to_records
from normlab.diagnostics.activations import (
    DEFAULT_PERCENTILES,
    SATURATION_MARGIN,
    ActivationStats,
    percentiles,
    saturation_bounds,
)
from normlab.diagnostics.coupling import Coupling, batch_coupling
from normlab.diagnostics.dead import DeadUnits, dead_units
from normlab.diagnostics.discrepancy import (
    RunningStatsGap,
    TrainEvalGap,
    running_stats_gap,
    train_eval_gap,
)
from normlab.diagnostics.gradients import (
    EXPLODING_RATIO,
    VANISHING_RATIO,
    GradientFlow,
    GradientNorm,
    gradient_flow,
)
from normlab.diagnostics.noise import BatchNoise, batch_stat_noise, bn_input_noise
from normlab.diagnostics.probe import Probe
from normlab.diagnostics.shift import GradientChange, InputDrift, gradient_change

__all__ = [
    "DEFAULT_PERCENTILES",
    "EXPLODING_RATIO",
    "SATURATION_MARGIN",
    "VANISHING_RATIO",
    "ActivationStats",
    "BatchNoise",
    "Coupling",
    "DeadUnits",
    "GradientChange",
    "GradientFlow",
    "GradientNorm",
    "InputDrift",
    "Probe",
    "Record",
    "RunningStatsGap",
    "TrainEvalGap",
    "batch_coupling",
    "batch_stat_noise",
    "bn_input_noise",
    "dead_units",
    "first_tensor",
    "gradient_change",
    "gradient_flow",
    "layer_key",
    "percentiles",
    "running_stats_gap",
    "saturation_bounds",
    "to_records",
    "train_eval_gap",
]
