"""The lab's results store: one embedded SQLite file, safe to share between processes.

A run is keyed by ``(experiment, config_hash, seed)`` (a UNIQUE constraint, so it exists at most
once) and moves through ``running -> finished | failed``. A sweep first *claims* a run (an
``INSERT`` or a guarded ``UPDATE`` inside ``BEGIN IMMEDIATE``, so two sweeps never run the same
task), then records the outcome in a single transaction: the run row, its metrics and its
curves/tables commit together or not at all, so a crash never leaves half a run.

Resuming: a ``running`` row whose owner process is gone (killed, crashed, rebooted) is stale and
the next sweep claims it again; ``finished`` rows are never redone; ``failed`` rows are redone by
the next sweep (the error may have been fixed) unless it passes ``retry_failed=False``.

Numerics: SQLite stores NaN as NULL, so a metric row keeps non-finite values in a separate
``special`` column (``'nan'``, ``'inf'``, ``'-inf'``, and ``'-0'``, whose sign SQLite drops) so
every float round-trips exactly. Curves and
tables are JSON blobs written with Python's ``json`` (which writes ``NaN``/``Infinity``).

Note:
    WAL mode with ``synchronous=NORMAL``: a committed run survives a killed process (the case
    that matters for sweeps), the last commits may be lost on power failure. WAL needs a local
    file system (not NFS); with Ray, workers return results to the driver, which writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from normlab.lab.experiment import RunResult

__all__ = [
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "StoredRun",
    "versions",
]

SCHEMA_VERSION = 1
_APP = "normlab"
_APPLICATION_ID = 0x4E4C4142  # "NLAB" in the file header, so `file(1)`-like tools can tell
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0": -0.0}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    app TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    experiment TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    config TEXT NOT NULL,
    normlab_version TEXT,
    torch_version TEXT,
    python_version TEXT,
    host TEXT,
    pid INTEGER,
    owner TEXT,
    claimed REAL,
    started REAL,
    finished REAL,
    seconds REAL,
    error TEXT,
    curves TEXT,
    tables TEXT,
    UNIQUE (experiment, config_hash, seed)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    special TEXT CHECK (special IN ('nan', 'inf', '-inf', '-0')),
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (experiment, status);
"""


class StoreError(Exception):
    """The database cannot be used: missing, unreadable, corrupt, foreign or too new.

    The message is one line meant for the user (the CLI prints it and exits with status 2).
    """


@dataclass
class StoredRun:
    """One row of ``runs`` with its result.

    Attributes:
        id: the row id.
        experiment: experiment name.
        config_hash: :func:`normlab.lab.experiment.run_key` of the experiment and config (config
            values and the experiment's code version).
        seed: the seed.
        status: ``running``, ``finished`` or ``failed``.
        config: the config as a dict (its JSON).
        versions: ``normlab``, ``torch`` and ``python`` versions of the process that ran it.
        started: Unix time the run started (None until known).
        finished: Unix time it finished or failed.
        seconds: wall-clock seconds of the run itself.
        error: the error text of a failed run.
        result: metrics, curves and tables (empty unless finished).
    """

    id: int
    experiment: str
    config_hash: str
    seed: int
    status: str
    config: dict[str, Any]
    versions: dict[str, str | None] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    error: str | None = None
    result: RunResult = field(default_factory=RunResult)


def versions() -> dict[str, str | None]:
    """Versions recorded with every run (read from package metadata: no heavy imports)."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "normlab": version("normlab"),
        "torch": version("torch"),
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def _encode_metric(value: float) -> tuple[float | None, str | None]:
    value = float(value)
    if math.isnan(value):
        return None, "nan"
    if math.isinf(value):
        return None, "inf" if value > 0 else "-inf"
    if value == 0.0 and math.copysign(1.0, value) < 0:  # SQLite drops the sign of -0.0
        return None, "-0"
    return value, None


def _decode_metric(value: float | None, special: str | None) -> float:
    if special is not None:
        return _SPECIAL[special]
    if value is None:  # only another writer could leave this; read it as missing
        return math.nan
    return float(value)


def _process_start_time(pid: int) -> float | None:
    """Unix start time of `pid` from /proc (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # Field 22 (starttime, in clock ticks since boot) counts from after the ")" of comm.
        fields = stat[stat.rindex(")") + 2 :].split()
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _process_alive(pid: int, claimed: float | None) -> bool:
    """Whether the process that claimed a run at time `claimed` still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rindex(")") + 2] in "ZX":  # a killed child its parent has not reaped
            return False
    except (OSError, ValueError, IndexError):
        pass
    start = _process_start_time(pid)
    # A process started after the claim only reuses the pid of the one that claimed (2 s of
    # slack for the clock-tick rounding of /proc's start time).
    return not (start is not None and claimed is not None and start > claimed + 2.0)


class Store:
    """The SQLite results store.

    Args:
        path: the database file; created with the schema if missing (or empty).
        create: if False, a missing file is an error instead of a new database.
        busy_timeout: seconds a writer waits for another one's lock before failing.
        stale_after: seconds after which a ``running`` row claimed on *another* host counts as
            abandoned (on this host, liveness of the owner process is checked directly).

    Raises:
        StoreError: the file is missing (with ``create=False``), unreadable, not SQLite,
            another application's database, or written by a newer normlab.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        busy_timeout: float = 60.0,
        stale_after: float = 24 * 3600.0,
    ) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self._host = socket.gethostname()
        self._owner = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._check_file(create)
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self._init_schema()
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            with contextlib.suppress(sqlite3.OperationalError):  # read-only file: keep its mode
                self._conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path} is not a usable normlab database: {exc}") from None

    # ---------------------------------------------------------------- opening

    def _check_file(self, create: bool) -> None:
        if not self.path.exists():
            if not create:
                raise StoreError(f"no database at {self.path} (run `normlab lab` first)")
            if not self.path.parent.is_dir():
                raise StoreError(f"cannot create database {self.path}: no such folder")
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a database file")
        try:
            with open(self.path, "rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise StoreError(f"cannot read database {self.path}: {exc.strerror}") from None
        if header and header != _SQLITE_MAGIC:
            raise StoreError(f"{self.path} is not a SQLite database (corrupt or another format)")

    def _tables(self) -> set[str]:
        rows = self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}

    def _init_schema(self) -> None:
        # Read first: an existing database is only checked, never written (read-only copies
        # of results can still be reported on).
        tables = self._tables()
        if not tables:
            with self._transaction() as conn:
                if not self._tables():  # another process may have created it meanwhile
                    # One statement at a time: executescript() would commit our transaction.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (app, version) VALUES (?, ?)",
                        (_APP, SCHEMA_VERSION),
                    )
                    conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            tables = self._tables()
        if "schema_version" not in tables:
            raise StoreError(
                f"{self.path} is a SQLite database of another application "
                "(no normlab schema); use another --db path"
            )
        row = self._conn.execute("SELECT app, version FROM schema_version").fetchone()
        if row is None or row[0] != _APP:
            raise StoreError(
                f"{self.path} is a SQLite database of another application; use another --db path"
            )
        if row[1] > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {row[1]}, newer than this normlab's "
                f"{SCHEMA_VERSION}; upgrade normlab"
            )
        missing = {"runs", "metrics"} - tables
        if missing:
            raise StoreError(f"{self.path} is damaged: missing tables {sorted(missing)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front (no upgrade
        deadlocks between readers that later write), rolls back on any exception."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writing

    def _is_stale(self, host: str | None, pid: int | None, claimed: float | None) -> bool:
        if host == self._host and pid is not None:
            return not _process_alive(pid, claimed)
        return claimed is None or time.time() - claimed > self.stale_after

    def claim(
        self,
        experiment: str,
        config_hash: str,
        seed: int,
        config: dict[str, Any],
        *,
        retry_failed: bool = True,
    ) -> int | None:
        """Atomically take the task ``(experiment, config_hash, seed)`` for this process.

        Returns:
            The run id to report the outcome under, or None when there is nothing to do: the
            run is finished, running in a live process, or failed and ``retry_failed`` is off.
        """
        config_json = json.dumps(config, sort_keys=True)
        v = versions()
        now = time.time()
        values = (
            config_json,
            v["normlab"],
            v["torch"],
            v["python"],
            self._host,
            os.getpid(),
            self._owner,
            now,
        )
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id, status, host, pid, claimed FROM runs "
                "WHERE experiment = ? AND config_hash = ? AND seed = ?",
                (experiment, config_hash, int(seed)),
            ).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO runs (experiment, config_hash, seed, status, config, "
                    "normlab_version, torch_version, python_version, host, pid, owner, claimed) "
                    "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (experiment, config_hash, int(seed), *values),
                )
                return int(cur.lastrowid)  # type: ignore[arg-type]
            run_id, status, host, pid, claimed = row
            if status == "finished":
                return None
            if status == "failed" and not retry_failed:
                return None
            if status == "running" and not self._is_stale(host, pid, claimed):
                return None
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.execute(
                "UPDATE runs SET status = 'running', config = ?, normlab_version = ?, "
                "torch_version = ?, python_version = ?, host = ?, pid = ?, owner = ?, "
                "claimed = ?, started = NULL, finished = NULL, seconds = NULL, error = NULL, "
                "curves = NULL, tables = NULL WHERE id = ?",
                (*values, run_id),
            )
            return int(run_id)

    def finish(
        self,
        run_id: int,
        result: RunResult,
        *,
        started: float | None = None,
        finished: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record a finished run: row, metrics, curves and tables in one transaction.

        Raises:
            StoreError: this process no longer owns the run (another sweep re-claimed it).
        """
        finished = time.time() if finished is None else finished
        curves = json.dumps(result.curves, default=_json_default)
        tables = json.dumps(result.tables, default=_json_default)
        metrics = [(run_id, str(name), *_encode_metric(v)) for name, v in result.metrics.items()]
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE runs SET status = 'finished', started = ?, finished = ?, seconds = ?, "
                "curves = ?, tables = ?, error = NULL WHERE id = ? AND owner = ?",
                (started, finished, seconds, curves, tables, run_id, self._owner),
            )
            if cur.rowcount != 1:
                raise StoreError(f"run {run_id} is not owned by this process any more")
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.executemany(
                "INSERT INTO metrics (run_id, name, value, special) VALUES (?, ?, ?, ?)", metrics
            )

    def fail(
        self,
        run_id: int,
        error: str,
        *,
        started: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record a failed run with its error text (redone by the next sweep)."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = 'failed', error = ?, started = ?, finished = ?, "
                "seconds = ? WHERE id = ? AND owner = ?",
                (error, started, time.time(), seconds, run_id, self._owner),
            )

    def release(self, run_ids: Sequence[int]) -> None:
        """Give back claimed runs that will not run (e.g. on Ctrl-C): their rows are removed."""
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM runs WHERE id = ? AND owner = ? AND status = 'running'",
                [(int(i), self._owner) for i in run_ids],
            )

    # ---------------------------------------------------------------- reading

    def runs(
        self,
        experiment: str | None = None,
        config_hash: str | None = None,
        status: str | None = None,
    ) -> list[StoredRun]:
        """Stored runs, filtered; ordered by experiment, config, seed."""
        where, args = [], []
        for column, value in (
            ("experiment", experiment),
            ("config_hash", config_hash),
            ("status", status),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (
            "SELECT id, experiment, config_hash, seed, status, config, normlab_version, "
            "torch_version, python_version, started, finished, seconds, error, curves, tables "
            "FROM runs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY experiment, config_hash, seed"
        )
        try:
            rows = self._conn.execute(sql, args).fetchall()
            metric_rows = self._conn.execute(
                "SELECT run_id, name, value, special FROM metrics ORDER BY run_id, rowid"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        metrics: dict[int, dict[str, float]] = {}
        for run_id, name, value, special in metric_rows:
            metrics.setdefault(run_id, {})[name] = _decode_metric(value, special)
        out = []
        for (
            run_id,
            exp,
            chash,
            seed,
            stat,
            config,
            v_normlab,
            v_torch,
            v_python,
            started,
            finished,
            seconds,
            error,
            curves,
            tables,
        ) in rows:
            result = RunResult(
                metrics=metrics.get(run_id, {}),
                curves=json.loads(curves) if curves else {},
                tables=json.loads(tables) if tables else {},
            )
            out.append(
                StoredRun(
                    id=run_id,
                    experiment=exp,
                    config_hash=chash,
                    seed=seed,
                    status=stat,
                    config=json.loads(config),
                    versions={"normlab": v_normlab, "torch": v_torch, "python": v_python},
                    started=started,
                    finished=finished,
                    seconds=seconds,
                    error=error,
                    result=result,
                )
            )
        return out

    def latest_configs(self) -> list[tuple[str, str]]:
        """``(experiment, config_hash)`` of each experiment's most recently finished config."""
        try:
            rows = self._conn.execute(
                "SELECT experiment, config_hash, MAX(COALESCE(finished, claimed)) AS last "
                "FROM runs GROUP BY experiment, config_hash ORDER BY experiment, last DESC"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        latest: dict[str, str] = {}
        for exp, chash, _ in rows:
            latest.setdefault(exp, chash)
        return sorted(latest.items())


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays in tables written by experiments
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
