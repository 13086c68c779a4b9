"""The SQLite results store: round trips, claims and resume rules, concurrency, bad files."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from normlab.lab.experiment import RunResult
from normlab.lab.store import SCHEMA_VERSION, Store, StoreError


def _result(**metrics: float) -> RunResult:
    return RunResult(
        metrics=dict(metrics),
        curves={"acc": [0.1, math.nan, math.inf, -math.inf, 0.5]},
        tables={"layers": [{"layer": 0, "std": 1.25, "name": "fc1"}]},
    )


def test_round_trip_with_nonfinite_metrics(tmp_path: Path) -> None:
    with Store(tmp_path / "lab.db") as store:
        run_id = store.claim("exp", "abc", 3, {"lr": 0.1, "widths": [4, 8]})
        assert run_id is not None
        result = _result(
            nan=math.nan, pinf=math.inf, ninf=-math.inf, tiny=5e-324, neg=-0.0, big=1.5e308
        )
        store.finish(run_id, result, started=100.0, finished=101.5, seconds=1.5)
    with Store(tmp_path / "lab.db", create=False) as store:
        (run,) = store.runs()
    assert (run.experiment, run.config_hash, run.seed, run.status) == ("exp", "abc", 3, "finished")
    assert run.config == {"lr": 0.1, "widths": [4, 8]}
    m = run.result.metrics
    assert math.isnan(m["nan"]) and m["pinf"] == math.inf and m["ninf"] == -math.inf
    assert m["tiny"] == 5e-324 and m["big"] == 1.5e308
    assert math.copysign(1.0, m["neg"]) == -1.0
    assert list(m) == ["nan", "pinf", "ninf", "tiny", "neg", "big"]
    acc = run.result.curves["acc"]
    assert acc[0] == 0.1 and math.isnan(acc[1]) and acc[2:4] == [math.inf, -math.inf]
    assert run.result.tables == result.tables
    assert (run.started, run.finished, run.seconds) == (100.0, 101.5, 1.5)
    assert run.versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert run.versions["torch"] and run.versions["normlab"]


def test_schema_version_wal_and_unique_key(tmp_path: Path) -> None:
    path = tmp_path / "lab.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT app, version FROM schema_version").fetchall() == [
        ("normlab", SCHEMA_VERSION)
    ]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.execute(
        "INSERT INTO runs (experiment, config_hash, seed, status, config) "
        "VALUES ('e', 'h', 0, 'running', '{}')"
    )
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute(
            "INSERT INTO runs (experiment, config_hash, seed, status, config) "
            "VALUES ('e', 'h', 0, 'running', '{}')"
        )
    conn.close()


def test_claim_rules(tmp_path: Path) -> None:
    store = Store(tmp_path / "lab.db")
    first = store.claim("e", "h", 0, {})
    assert first is not None
    # Running in a live process (this one): nobody else takes it.
    assert Store(tmp_path / "lab.db").claim("e", "h", 0, {}) is None
    store.finish(first, _result(x=1.0))
    assert store.claim("e", "h", 0, {}) is None  # finished runs are never redone
    # A failed run is redone by default, but not with retry_failed=False; same row either way.
    failed = store.claim("e", "h", 1, {})
    assert failed is not None
    store.fail(failed, "Traceback ...\nValueError: boom", seconds=0.5)
    assert store.claim("e", "h", 1, {}, retry_failed=False) is None
    assert store.claim("e", "h", 1, {}) == failed
    (row,) = store.runs(status="running")
    assert row.id == failed and row.error is None
    store.close()


def test_stale_claims_of_dead_or_reused_pids_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "lab.db"
    store = Store(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    conn = sqlite3.connect(path)
    host = socket.gethostname()
    rows = [
        # (seed, pid, claimed): a dead pid; our live pid but claimed before this process started
        # (a reused pid); our live pid claimed just now (genuinely running).
        (0, dead.pid, time.time()),
        (1, os.getpid(), 1.0),
        (2, os.getpid(), time.time()),
    ]
    for seed, pid, claimed in rows:
        conn.execute(
            "INSERT INTO runs (experiment, config_hash, seed, status, config, host, pid, owner, "
            "claimed) VALUES ('e', 'h', ?, 'running', '{}', ?, ?, 'someone', ?)",
            (seed, host, pid, claimed),
        )
    # Another host's claim counts as abandoned only after `stale_after`.
    conn.execute(
        "INSERT INTO runs (experiment, config_hash, seed, status, config, host, pid, owner, "
        "claimed) VALUES ('e', 'h', 3, 'running', '{}', 'elsewhere', 1, 'x', ?)",
        (time.time(),),
    )
    conn.commit()
    conn.close()
    assert store.claim("e", "h", 0, {}) is not None
    assert store.claim("e", "h", 1, {}) is not None
    assert store.claim("e", "h", 2, {}) is None
    assert store.claim("e", "h", 3, {}) is None
    store.stale_after = 0.0
    assert store.claim("e", "h", 3, {}) is not None
    assert len(store.runs()) == 4
    store.close()


def test_finish_needs_ownership_and_release(tmp_path: Path) -> None:
    a = Store(tmp_path / "lab.db")
    b = Store(tmp_path / "lab.db")
    run_id = a.claim("e", "h", 0, {})
    assert run_id is not None
    with pytest.raises(StoreError, match="not owned"):
        b.finish(run_id, _result(x=1.0))
    b.release([run_id])  # not b's claim: untouched
    assert [r.status for r in a.runs()] == ["running"]
    a.release([run_id])
    assert a.runs() == []
    a.close()
    b.close()


def test_failed_finish_is_atomic(tmp_path: Path) -> None:
    store = Store(tmp_path / "lab.db")
    run_id = store.claim("e", "h", 0, {})
    assert run_id is not None
    bad = RunResult(metrics={"ok": 1.0, "bad": "not a number"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        store.finish(run_id, bad)
    (run,) = store.runs()
    assert run.status == "running" and run.result.metrics == {}
    store.close()


def _one_line(exc: pytest.ExceptionInfo[StoreError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_bad_files_fail_fast_with_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n" * 20)
    with pytest.raises(StoreError) as exc:
        Store(text)
    assert "is not a SQLite database" in _one_line(exc)

    foreign = tmp_path / "browser.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE moz_places (id INTEGER, url TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as exc:
        Store(foreign)
    assert "another application" in _one_line(exc)
    # Nothing was added to the foreign database.
    names = sqlite3.connect(foreign).execute("SELECT name FROM sqlite_master").fetchall()
    assert names == [("moz_places",)]

    newer = tmp_path / "newer.db"
    Store(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as exc:
        Store(newer)
    assert "newer" in _one_line(exc)

    good = tmp_path / "good.db"
    Store(good).close()
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(good.read_bytes()[:200] + b"\xff" * 300)
    with pytest.raises(StoreError) as exc:
        Store(truncated)
    _one_line(exc)

    with pytest.raises(StoreError) as exc:
        Store(tmp_path / "missing.db", create=False)
    assert "no database" in _one_line(exc)
    with pytest.raises(StoreError) as exc:
        Store(tmp_path)
    assert "folder" in _one_line(exc)
    with pytest.raises(StoreError) as exc:
        Store(tmp_path / "no" / "such" / "dir.db")
    _one_line(exc)


def _writer(db: str, name: str, index: int, go: Any, out: Any) -> None:
    """One writer process: races the others for 12 shared tasks, then writes 5 runs of its own."""
    store = Store(db, busy_timeout=60)
    go.wait(30)
    claimed = []
    for seed in range(12):
        run_id = store.claim("shared", "h", seed, {"seed": seed})
        if run_id is not None:
            claimed.append(seed)
            metrics = {"writer": float(index), "nan": math.nan}
            store.finish(run_id, RunResult(metrics=metrics))
    for seed in range(5):
        run_id = store.claim(name, "h", seed, {})
        assert run_id is not None
        store.finish(run_id, RunResult(metrics={"seed": float(seed)}, curves={"c": [1.0] * 50}))
    store.close()
    out.put((index, claimed))


@pytest.mark.slow
def test_concurrent_writer_processes(tmp_path: Path) -> None:
    # fork: the writers need no torch, and forking spares each a fresh interpreter start-up.
    ctx = multiprocessing.get_context("fork")
    db = str(tmp_path / "lab.db")
    Store(db).close()
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(db, f"own{i}", i, go, out)) for i in range(3)]
    for proc in procs:
        proc.start()
    go.set()
    claims: dict[int, list[int]] = dict(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    # Every shared task was claimed by exactly one writer.
    assert sorted(s for c in claims.values() for s in c) == list(range(12))
    with Store(db) as store:
        runs = store.runs()
    assert len(runs) == 12 + 3 * 5
    assert all(r.status == "finished" for r in runs)
    shared = [r for r in runs if r.experiment == "shared"]
    assert sorted(r.seed for r in shared) == list(range(12))
    for r in shared:
        writer = int(r.result.metrics["writer"])
        assert r.seed in claims[writer] and math.isnan(r.result.metrics["nan"])
    for i in range(3):
        own = [r for r in runs if r.experiment == f"own{i}"]
        assert [r.result.metrics["seed"] for r in own] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_run_key_changes_with_the_experiment_code_and_config(tmp_path) -> None:
    # An edited experiment must not reuse runs of its old code: its source is part of the key.
    import importlib.util
    import textwrap

    from normlab.lab.experiment import run_key

    def load(body: str):
        path = tmp_path / f"exp_{abs(hash(body))}.py"
        path.write_text(textwrap.dedent(f"""
            from dataclasses import dataclass
            from normlab.lab.experiment import Experiment

            @dataclass
            class Cfg:
                lr: float = 0.1

            class Exp(Experiment):
                name = "edited"
                def run(self, config, seed):
                    return {body}
        """))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        import sys

        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module

    old, new = load("1"), load("2")
    key_old = run_key(old.Exp(), old.Cfg())
    assert key_old == run_key(old.Exp(), old.Cfg())  # stable
    assert key_old != run_key(new.Exp(), new.Cfg())  # the edit changes the key
    assert key_old != run_key(old.Exp(), old.Cfg(lr=0.2))  # so does the config
