"""What an experiment is: a config, a seeded run, a verdict from the numbers, and plots.

Every claim of ``shared/REFERENCE.md``'s claims table is one :class:`Experiment` in
``normlab.lab.experiments``. The lab runs ``run(config, seed)`` for several seeds (possibly in
other processes, so configs and results are plain data), stores each :class:`RunResult`, then
asks the experiment for its :class:`Verdict` over all seeds and for its figures.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

Status = Literal["supported", "not supported", "inconclusive"]


@dataclass
class RunResult:
    """What one seeded run measured.

    Attributes:
        metrics: named scalars (e.g. ``"steps_to_90pct/bn"``); NaN/inf allowed.
        curves: named series, e.g. test accuracy per evaluation step.
        tables: named small tables (list of row dicts), e.g. per-layer statistics.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Verdict:
    """The claim's status as measured, with the evidence in numbers.

    Attributes:
        status: supported / not supported / inconclusive.
        effect: the headline effect size (mean over seeds), in ``unit``.
        spread: its standard deviation over seeds (NaN for one seed).
        unit: what ``effect`` is measured in (e.g. "accuracy points", "x fewer steps").
        summary: one sentence built from the numbers, e.g. "BN reached 90% in 3.1x fewer
            steps (±0.4, 3 seeds)".
        agrees_with_literature: whether the status matches the literature's, None where the
            literature is contested.
    """

    status: Status
    effect: float
    spread: float
    unit: str
    summary: str
    agrees_with_literature: bool | None = None


class Experiment:
    """Base class: subclasses set the class attributes and implement the four methods.

    Class attributes:
        name: CLI name, e.g. ``"bn-convergence"``.
        claim: the claims-table id, e.g. ``"C3"``.
        title: the claim in words.
        literature: what the literature reports (shown next to our verdict).
        config_class: the experiment's config dataclass (documented defaults; every field a
            JSON-serializable scalar or list).
    """

    name: ClassVar[str]
    claim: ClassVar[str]
    title: ClassVar[str]
    literature: ClassVar[str]
    config_class: ClassVar[type]

    def default_config(self, quick: bool = False) -> Any:
        """The config the lab runs: defaults, or the `--quick` variant (about seconds)."""
        config = self.config_class()
        return self.quick_config(config) if quick else config

    def quick_config(self, config: Any) -> Any:
        """Shrink `config` for --quick; subclasses override."""
        return config

    def run(self, config: Any, seed: int) -> RunResult:
        raise NotImplementedError

    def verdict(self, config: Any, results: Sequence[RunResult]) -> Verdict:
        raise NotImplementedError

    def plot(self, config: Any, results: Sequence[RunResult], out_dir: Path) -> list[Path]:
        """Write PNG figures into `out_dir`; return their paths."""
        raise NotImplementedError


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any) -> str:
    """Stable short hash of a config's values."""
    text = json.dumps(config_to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version(experiment: Experiment) -> str:
    """Short hash of the code an experiment's numbers come from: its own module's source and the
    lab's shared modules (experiment helpers, training loops, data sets).

    Part of the store key, so that editing an experiment or a helper it uses runs it again instead
    of reusing runs of the old code. Edits elsewhere in normlab (the layers and kernels under test)
    do not change it: those are checked by the test suite, and rerunning every experiment after each
    kernel change would make the store pointless.
    """
    return _module_code_version(type(experiment).__module__)


@functools.cache
def _module_code_version(module_name: str) -> str:
    # Once per module and process: every task of a sweep asks for its key, some more than once.
    import inspect
    import sys

    from normlab.lab import common, datasets
    from normlab.lab.experiments import _shared

    modules = [sys.modules.get(module_name), _shared, common, datasets]
    digest = hashlib.sha256()
    for module in modules:
        try:
            source = inspect.getsource(module) if module is not None else ""
        except (OSError, TypeError):  # no source on disk (e.g. defined interactively)
            source = getattr(module, "__name__", "")
        digest.update(source.encode())
    return digest.hexdigest()[:12]


def run_key(experiment: Experiment, config: Any) -> str:
    """The store's key for a run with experiment name and seed: config values and code version."""
    text = json.dumps({"config": config_to_dict(config), "code": code_version(experiment)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compare(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    higher_is_better: bool,
    min_effect: float,
) -> tuple[Status, float, float]:
    """Paired comparison over seeds: the effect, its spread and a status.

    The effect is the mean over seeds of (treatment - control), signed so that positive means
    the treatment is better. "supported" needs the mean effect above ``min_effect`` (a practical
    threshold in the metric's unit) *and* above two standard errors; "not supported" needs the
    effect below ``min_effect`` by two standard errors (or the opposite sign clearly);
    anything else is "inconclusive". With one seed the standard error is unknown, so only an
    effect beyond ``min_effect`` in either direction is called.

    Returns:
        (status, mean effect, standard deviation of the per-seed effects).
    """
    diffs = np.asarray(treatment, dtype=float) - np.asarray(control, dtype=float)
    if not higher_is_better:
        diffs = -diffs
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return "inconclusive", math.nan, math.nan
    mean = float(diffs.mean())
    std = float(diffs.std(ddof=1)) if diffs.size > 1 else math.nan
    sem = std / math.sqrt(diffs.size) if diffs.size > 1 else 0.0
    if mean > min_effect and mean > 2 * sem:
        return "supported", mean, std
    if mean + 2 * sem < min_effect:
        return "not supported", mean, std
    return "inconclusive", mean, std
