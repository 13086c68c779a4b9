"""The report: entries from stored runs, HTML and results.json, terminal table, headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lab_fakes import FailingExperiment, FakeConfig, FastExperiment
from normlab.lab.experiment import (
    Experiment,
    RunResult,
    Verdict,
    config_to_dict,
    run_key,
)
from normlab.lab.report import build_entries, print_verdicts, write_report
from normlab.lab.runner import rebuild_report
from normlab.lab.store import Store

CHROMIUM = Path("/usr/bin/chromium")


class BrokenVerdict(FastExperiment):
    """Its verdict raises: the report must carry on with a note."""

    name: ClassVar[str] = "fake-broken"
    claim: ClassVar[str] = "C96"
    title: ClassVar[str] = "A fake claim <b>with markup</b> & a broken verdict"

    def verdict(self, config: Any, results: Sequence[RunResult]) -> Verdict:
        raise ZeroDivisionError("no verdict for you")


def _fill(store: Store, experiment: Experiment, config: Any, seeds: int) -> str:
    chash = run_key(experiment, config)
    for seed in range(seeds):
        run_id = store.claim(experiment.name, chash, seed, config_to_dict(config))
        assert run_id is not None
        try:
            result = experiment.run(config, seed)
        except RuntimeError as exc:
            store.fail(run_id, f"Traceback (most recent call last):\nRuntimeError: {exc}")
        else:
            store.finish(run_id, result, seconds=0.25)
    return chash


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Experiment]]:
    """A database of fake runs (no sweep) and the report written from it."""
    root = tmp_path_factory.mktemp("report")
    db, out = root / "lab.db", root / "report"
    experiments: list[Experiment] = [FastExperiment(), FailingExperiment(), BrokenVerdict()]
    with Store(db) as store:
        keys = [
            (e.name, _fill(store, e, e.default_config(), 3 if e.name != "fake-fast" else 4))
            for e in experiments
        ]
        _fill(store, FastExperiment(), FakeConfig(effect=-5.0), 2)  # an older config
        keys.append(("fake-orphan", _fill(store, _Orphan(), FakeConfig(), 2)))
        entries = build_entries(store, keys, {e.name: e for e in experiments}, out)
    write_report(entries, out, db=db)
    return db, out, experiments


class _Orphan(FastExperiment):
    name: ClassVar[str] = "fake-orphan"


def test_results_json_is_strict_and_complete(report: tuple[Path, Path, list[Experiment]]) -> None:
    _, out, _ = report
    data = json.loads((out / "results.json").read_text(), parse_constant=_reject_constant)
    by_name = {e["name"]: e for e in data["experiments"]}
    assert list(by_name) == ["fake-fast", "fake-failing", "fake-broken", "fake-orphan"]
    fast = by_name["fake-fast"]
    assert fast["verdict"]["status"] == "supported" and fast["seeds"] == [0, 1, 2, 3]
    assert fast["verdict"]["effect"] == pytest.approx(
        1.0 + sum((s * 7919) % 13 for s in range(4)) / 400
    )
    assert fast["metrics"]["nan_metric"] == {"mean": None, "std": None, "n": 0, "n_total": 4}
    assert fast["metrics"]["control"]["mean"] == 10.0 and fast["metrics"]["control"]["n"] == 4
    assert fast["figures"] == ["figures/fake-fast/acc.png"]
    failing = by_name["fake-failing"]
    assert failing["seeds"] == [0, 2] and failing["failures"][0]["seed"] == 1
    assert by_name["fake-broken"]["verdict"] is None
    assert "ZeroDivisionError: no verdict for you" in by_name["fake-broken"]["note"]
    assert "not registered" in by_name["fake-orphan"]["note"]
    for e in data["experiments"]:
        for fig in e["figures"]:
            assert (out / fig).stat().st_size > 1000


def _reject_constant(name: str) -> None:
    raise AssertionError(f"results.json holds the non-JSON constant {name}")


def test_html_has_table_sections_figures_and_escapes(
    report: tuple[Path, Path, list[Experiment]],
) -> None:
    _, out, _ = report
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page  # no external assets
    table = page[page.index('<table class="verdicts">') : page.index("</table>")]
    assert table.count("<tr>") == 1 + 4
    assert "s-supported" in table and "s-no-verdict" in table
    assert "4 seeds" in table and "±" in table
    for anchor in ("exp-fake-fast", "exp-fake-failing", "exp-fake-broken", "exp-fake-orphan"):
        assert f'href="#{anchor}"' in table and f'id="{anchor}"' in page
    assert re.findall(r"<img src='([^']+)'", page) == [
        "figures/fake-fast/acc.png",
        "figures/fake-failing/acc.png",
    ]
    assert "&lt;b&gt;with markup&lt;/b&gt; &amp; a broken verdict" in page
    assert "<b>with markup</b>" not in page
    assert "seed 1 failed: RuntimeError: fake failure for seed 1" in page
    assert "fail_seed" in page  # the config table


def test_rebuild_from_database_only(report: tuple[Path, Path, list[Experiment]]) -> None:
    db, out, experiments = report
    out2 = out.parent / "rebuilt"
    entries, index = rebuild_report(db, out2, experiments)
    assert index == out2 / "index.html" and index.exists()
    by_name = {e.name: e for e in entries}
    # The latest config of each experiment: fake-fast's second (effect -5) config came later.
    assert by_name["fake-fast"].config["effect"] == -5.0
    assert by_name["fake-fast"].status == "not supported"
    assert by_name["fake-failing"].status == "supported"
    assert [e.name for e in entries][:3] == ["fake-fast", "fake-failing", "fake-broken"]
    assert (out2 / "figures" / "fake-fast" / "acc.png").exists()


def test_terminal_table(report: tuple[Path, Path, list[Experiment]]) -> None:
    from rich.console import Console

    db, out, experiments = report
    with Store(db) as store:
        keys = [(e.name, run_key(e, e.default_config())) for e in experiments[:2]]
        entries = build_entries(store, keys, {e.name: e for e in experiments}, out.parent / "t")
    console = Console(record=True, width=140, color_system=None)
    print_verdicts(entries, console)
    text = console.export_text()
    assert "C98" in text and "fake-fast" in text and "supported" in text
    assert "4 seeds" in text and "2 seeds" in text


def _chromium(url: str, profile: Path) -> tuple[str, str]:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_page_in_headless_chromium(
    report: tuple[Path, Path, list[Experiment]], tmp_path: Path
) -> None:
    _, out, _ = report
    dom, log = _chromium((out / "index.html").as_uri(), tmp_path / "profile1")
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    assert 'data-figures="ok"' in body.group(0)
    assert 'data-figure-count="2"' in body.group(0)
    assert 'data-errors="0"' in body.group(0)
    console_lines = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console_lines == []

    # The same checks see a missing figure.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "figures" / "fake-failing" / "acc.png").unlink()
    dom, _ = _chromium((broken / "index.html").as_uri(), tmp_path / "profile2")
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None and 'data-figures="broken"' in body.group(0)
    assert 'data-errors="1"' in body.group(0)


def test_nan_effect_renders(tmp_path: Path) -> None:
    class NanVerdict(FastExperiment):
        def verdict(self, config: Any, results: Sequence[RunResult]) -> Verdict:
            return Verdict("inconclusive", math.nan, math.nan, "points", "Nothing to compare.")

    with Store(tmp_path / "lab.db") as store:
        chash = _fill(store, NanVerdict(), FakeConfig(), 1)
        entries = build_entries(
            store, [("fake-fast", chash)], {"fake-fast": NanVerdict()}, tmp_path
        )
    write_report(entries, tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert "effect NaN points (1 seed)" in page and "s-inconclusive" in page
