"""Orchestration: pick experiments and configs, run what the store lacks, then verdicts and report.

The CLI is a thin layer over :func:`run_lab` and :func:`rebuild_report`; both take the
experiments as a list, so tests (and users with experiments of their own) can pass any.

The registry is ``normlab.lab.experiments`` (``ALL``); the environment variable
``NORMLAB_LAB_REGISTRY`` names another module with an ``ALL`` list to use instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiment import Experiment, run_key
from normlab.lab.report import ReportEntry, build_entries, print_verdicts, write_report
from normlab.lab.store import Store
from normlab.lab.sweep import SweepSummary, make_tasks, run_sweep

__all__ = [
    "REGISTRY_ENV",
    "LabError",
    "LabOutcome",
    "apply_overrides",
    "load_registry",
    "rebuild_report",
    "run_lab",
    "select",
]

REGISTRY_ENV = "NORMLAB_LAB_REGISTRY"


class LabError(Exception):
    """A bad request (unknown experiment, unknown config key, ...); a one-line message."""


@dataclass
class LabOutcome:
    """What :func:`run_lab` did.

    Attributes:
        sweep: outcome of every task (finished / failed / skipped).
        entries: the report's entries.
        index: path of the written ``index.html``.
    """

    sweep: SweepSummary
    entries: list[ReportEntry]
    index: Path


def load_registry() -> list[Experiment]:
    """The registered experiments (``normlab.lab.experiments.ALL``, or ``$NORMLAB_LAB_REGISTRY``).

    Raises:
        LabError: the registry module is missing, fails to import, or has no ``ALL``.
    """
    module_name = os.environ.get(REGISTRY_ENV) or "normlab.lab.experiments"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LabError(f"cannot import the experiment registry {module_name}: {exc}") from None
    experiments = getattr(module, "ALL", None)
    if not experiments:
        raise LabError(f"no experiments registered in {module_name} (it has no ALL list)")
    return list(experiments)


def select(registry: Sequence[Experiment], names: Sequence[str]) -> list[Experiment]:
    """The experiments called `names` (all of `registry` if empty), in the order given.

    Accepts a claim id (``C3``) as well as a name.

    Raises:
        LabError: a name matches no experiment.
    """
    if not names:
        return list(registry)
    chosen: list[Experiment] = []
    for name in names:
        match = [e for e in registry if name in (e.name, e.claim) or name.upper() == e.claim]
        if not match:
            known = ", ".join(e.name for e in registry)
            raise LabError(f"unknown experiment {name!r}; known: {known}")
        chosen.extend(e for e in match if e not in chosen)
    return chosen


def _coerce(key: str, text: str, default: Any) -> Any:
    """Parse `text` as the type of the field's default value."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, str):  # "nan", "inf", "1e-3" spelled the Python way
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise LabError(f"--set {key}: must be a finite number")
            return float(value)
    elif isinstance(default, str):
        return text
    elif isinstance(default, (list, tuple)):
        if isinstance(value, list):
            return value
    else:
        return value
    kinds = {bool: "true or false", int: "an integer", float: "a number", tuple: "a JSON list"}
    kind = kinds.get(type(default), "a JSON list" if isinstance(default, list) else "a value")
    raise LabError(f"--set {key}: expected {kind} like the default {default!r}")


def apply_overrides(
    experiments: Sequence[Experiment], configs: Mapping[str, Any], overrides: Sequence[str]
) -> dict[str, Any]:
    """Apply ``key=value`` (every selected experiment) or ``name.key=value`` overrides.

    Values are parsed as JSON where possible and must match the type of the field's default.

    Returns:
        New configs by experiment name.

    Raises:
        LabError: malformed override, unknown key or experiment, wrong type, or a value the
            config rejects.
    """
    out = dict(configs)
    by_name = {e.name: e for e in experiments}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise LabError(f"--set expects key=value, got {item!r}")
        target, dot, field_name = key.rpartition(".")
        names = [target] if dot else list(by_name)
        if dot and target not in by_name:
            raise LabError(f"--set {item}: {target!r} is not a selected experiment")
        for name in names:
            config = out[name]
            fields = {f.name for f in dataclasses.fields(config)}
            if field_name not in fields:
                raise LabError(
                    f"--set {item}: {name} has no config key {field_name!r}; "
                    f"known: {', '.join(sorted(fields))}"
                )
            value = _coerce(item, text, getattr(config, field_name))
            try:
                out[name] = dataclasses.replace(config, **{field_name: value})
            except (TypeError, ValueError) as exc:
                raise LabError(f"--set {item}: {exc}") from None
    return out


def run_lab(
    experiments: Sequence[Experiment],
    *,
    db: str | Path = "normlab.db",
    out: str | Path = "normlab-report",
    quick: bool = False,
    seeds: int = 3,
    workers: int | None = None,
    ray_address: str | None = None,
    overrides: Sequence[str] = (),
    progress: bool = False,
    console: Any = None,
    registry: Sequence[Experiment] = (),
) -> LabOutcome:
    """Run the missing seeds of `experiments`, then write the report and print the verdicts.

    Args:
        experiments: what to run.
        db: the results store (created if missing).
        out: the report folder.
        quick: use each experiment's ``--quick`` config.
        seeds: seeds ``0..seeds-1`` per experiment.
        workers: process-pool size (default all cores; 0 runs inline).
        ray_address: run on Ray instead (see :func:`normlab.lab.sweep.run_sweep`).
        overrides: ``key=value`` config overrides (see :func:`apply_overrides`).
        progress: show progress bars.
        console: a rich console for the verdict table (None prints nothing).
        registry: all known experiments: the report also shows those of them the database
            holds runs of (their latest config), so running one experiment does not drop the
            others from the report.

    Raises:
        LabError, normlab.lab.store.StoreError, normlab.lab.sweep.SweepError: bad requests.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LabError(f"seeds={seeds!r} must be a positive integer")
    configs = {e.name: e.default_config(quick=quick) for e in experiments}
    configs = apply_overrides(experiments, configs, overrides)
    tasks = [t for e in experiments for t in make_tasks(e, configs[e.name], seeds)]
    with Store(db) as store:
        summary = run_sweep(
            tasks, store, workers=workers, ray_address=ray_address, progress=progress
        )
        keys = [(e.name, run_key(e, configs[e.name])) for e in experiments]
        known = {e.name: e for e in [*registry, *experiments]}
        keys += [k for k in store.latest_configs() if k[0] in known and k[0] not in configs]
        order = {name: i for i, name in enumerate(known)}
        keys.sort(key=lambda k: order[k[0]])
        entries = build_entries(store, keys, known, out)
    index = write_report(entries, out, db=db)
    if console is not None:
        print_verdicts(entries, console)
    return LabOutcome(summary, entries, index)


def rebuild_report(
    db: str | Path,
    out: str | Path,
    experiments: Sequence[Experiment],
    *,
    console: Any = None,
) -> tuple[list[ReportEntry], Path]:
    """Rebuild the report from the store alone: each experiment's latest config, no reruns.

    Experiments stored but not in `experiments` are reported with their metrics, no verdict.

    Raises:
        normlab.lab.store.StoreError: no database at `db`, or not a usable one.
    """
    with Store(db, create=False) as store:
        keys = store.latest_configs()
        order = {e.name: i for i, e in enumerate(experiments)}
        keys.sort(key=lambda k: (order.get(k[0], len(order)), k[0]))
        entries = build_entries(store, keys, {e.name: e for e in experiments}, out)
    index = write_report(entries, out, db=db)
    if console is not None:
        print_verdicts(entries, console)
    return entries, index
