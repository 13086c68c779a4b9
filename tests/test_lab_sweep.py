"""Sweeps: process pool, inline, resume after SIGKILL, Ray (when installed)."""

from __future__ import annotations

import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lab_fakes import (
    FailingExperiment,
    FakeConfig,
    FastExperiment,
    SlowExperiment,
    small_bn_mlp,
)
from normlab.lab.datasets import load_digits_split
from normlab.lab.experiment import RunResult
from normlab.lab.store import Store
from normlab.lab.sweep import (
    SweepError,
    Task,
    _data_parallel_rank,
    make_tasks,
    run_sweep,
    train_data_parallel,
)

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.slow
def test_process_pool_runs_records_and_skips(tmp_path: Path) -> None:
    fast, failing = FastExperiment(), FailingExperiment()
    tasks = make_tasks(fast, fast.default_config(), 3) + make_tasks(
        failing, failing.default_config(), 3
    )
    with Store(tmp_path / "lab.db") as store:
        summary = run_sweep(tasks, store, workers=2)
        assert [o.status for o in summary.outcomes] == ["finished"] * 4 + ["failed", "finished"]
        assert "fake failure for seed 1" in (summary.outcomes[4].error or "")
        runs = store.runs()
        finished = [r for r in runs if r.status == "finished"]
        assert len(runs) == 6 and len(finished) == 5
        # The runs happened in single-threaded worker processes, not in this one.
        pids = {r.result.metrics["pid"] for r in finished}
        assert float(os.getpid()) not in pids and 1 <= len(pids) <= 2
        assert {r.result.metrics["torch_threads"] for r in finished} == {1.0}
        assert all(r.seconds is not None and r.started is not None for r in finished)

        # A second sweep repeats nothing finished and redoes the failure (it fails again).
        again = run_sweep(tasks, store, workers=2)
        assert [o.status for o in again.outcomes] == ["skipped"] * 4 + ["failed", "skipped"]
        assert run_sweep(tasks, store, workers=2, retry_failed=False).count("skipped") == 6
        assert len(store.runs()) == 6


def test_inline_sweep_runs_duplicates_once(tmp_path: Path) -> None:
    fast = FastExperiment()
    config = FakeConfig(steps=2)
    tasks = [Task(fast, config, 0), Task(fast, FakeConfig(steps=2), 0), Task(fast, config, 1)]
    with Store(tmp_path / "lab.db") as store:
        summary = run_sweep(tasks, store, workers=0)
        assert [o.status for o in summary.outcomes] == ["finished", "finished"]
        (run0, run1) = store.runs()
    assert run0.result.metrics["pid"] == float(os.getpid())
    assert run0.result.curves["acc"] != run1.result.curves["acc"]
    assert run0.config["steps"] == 2


def test_bad_workers_and_missing_ray_release_claims(tmp_path: Path) -> None:
    fast = FastExperiment()
    tasks = make_tasks(fast, fast.default_config(), 2)
    with Store(tmp_path / "lab.db") as store:
        with pytest.raises(SweepError, match="workers"):
            run_sweep(tasks, store, workers=-1)
        if HAVE_RAY:
            return
        with pytest.raises(SweepError, match="Ray, which is not installed"):
            run_sweep(tasks, store, ray_address="local")
        assert store.runs() == []  # nothing claimed, nothing left 'running'


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (optional: pip install ray)")
def test_ray_local_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray's workers start from the environment of the local instance: let them import lab_fakes.
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    fast = FastExperiment()
    tasks = make_tasks(fast, fast.default_config(quick=True), 2)
    with Store(tmp_path / "lab.db") as store:
        summary = run_sweep(tasks, store, workers=2, ray_address="local")
        assert summary.count("finished") == 2
        assert [r.status for r in store.runs()] == ["finished", "finished"]


_DRIVER = textwrap.dedent(
    """
    import sys
    from lab_fakes import FakeConfig, SlowExperiment
    from normlab.lab.store import Store
    from normlab.lab.sweep import make_tasks, run_sweep

    store = Store(sys.argv[1])
    # fork: this fresh driver ran no torch op, and it spares a second interpreter start-up.
    tasks = make_tasks(SlowExperiment(), FakeConfig(sleep=1.0), 6)
    run_sweep(tasks, store, workers=2, start_method="fork")
    """
)


def _count(db: Path, status: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (status,)).fetchone()[
                0
            ]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(db)],
        env=env,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        deadline = time.monotonic() + 90
        while _count(db, "finished") < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the sweep never finished two runs"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    with Store(db) as store:
        before = {r.seed: r for r in store.runs()}
    done_before = {s: (r.id, r.finished) for s, r in before.items() if r.status == "finished"}
    assert 2 <= len(done_before) < 6
    assert {r.status for r in before.values()} == {"finished", "running"}

    # Restart: the killed sweep's claims are stale (its process is gone) and are redone.
    tasks = make_tasks(SlowExperiment(), FakeConfig(sleep=1.0), 6)
    with Store(db) as store:
        summary = run_sweep(tasks, store, workers=2)
        after = store.runs()
    assert summary.count("skipped") == len(done_before)
    assert summary.count("finished") == 6 - len(done_before)
    assert sorted(r.seed for r in after) == list(range(6))  # one row per task, none lost
    assert all(r.status == "finished" for r in after)
    for r in after:
        if r.seed in done_before:  # finished runs were not repeated
            assert (r.id, r.finished) == done_before[r.seed]


@pytest.mark.slow
def test_data_parallel_sync_bn_equals_one_process_on_the_global_batch() -> None:
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    data = (x_train[:400], y_train[:400], x_test[:100], y_test[:100])
    kwargs = {"steps": 6, "lr": 0.2, "momentum": 0.9, "seed": 3, "eval_every": 3}
    two = train_data_parallel(
        small_bn_mlp, data, world_size=2, batch_per_process=8, sync_bn=True, **kwargs
    )
    # One process, no process group, the whole global batch of 16 in plain batch norm.
    one = _data_parallel_rank(0, 1, small_bn_mlp, data, 16, sync_bn=False, **kwargs)
    assert one is not None
    assert len(two.losses) == 6 and [s for s, _ in two.test_accuracy] == [3, 6]
    assert two.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    for key, value in one.state_dict.items():
        torch.testing.assert_close(two.state_dict[key], value, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="world_size=0"):
        train_data_parallel(small_bn_mlp, data, world_size=0, batch_per_process=8, steps=1)


def test_interrupted_sweep_gives_back_unfinished_claims(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The same experiment class both times (its source is part of the run key), interrupted at
    # seed 1 the first time.
    finish = FastExperiment.run

    def interrupted(self: FastExperiment, config: FakeConfig, seed: int) -> RunResult:
        if seed == 1:
            raise KeyboardInterrupt
        return finish(self, config, seed)

    tasks = make_tasks(FastExperiment(), FakeConfig(), 3)
    with Store(tmp_path / "lab.db") as store:
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(FastExperiment, "run", interrupted)
            run_sweep(tasks, store, workers=0)
        # Seed 0 is stored; seeds 1 and 2 were claimed, then released for the next sweep.
        assert [(r.seed, r.status) for r in store.runs()] == [(0, "finished")]
        again = run_sweep(make_tasks(FastExperiment(), FakeConfig(), 3), store, workers=0)
    assert [o.status for o in again.outcomes] == ["skipped", "finished", "finished"]
