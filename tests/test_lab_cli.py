"""The `normlab` CLI: lab/list/report end to end, exit codes and one-line errors, lazy imports."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.cli import build_parser, main
from normlab.lab.runner import REGISTRY_ENV

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REGISTRY_ENV, "lab_fakes")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


def _bad_files(tmp_path: Path) -> dict[str, str]:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00\x01not sqlite at all" * 50)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    return {"CORRUPT": str(corrupt), "FOREIGN": str(foreign), "MISSING": str(tmp_path / "no.db")}


BAD = [
    (["lab", "--seeds", "0"], "positive integer"),
    (["lab", "--seeds", "-1"], "positive integer"),
    (["lab", "--seeds", "nan"], "not a finite number"),
    (["lab", "--seeds", "inf"], "not a finite number"),
    (["lab", "--seeds", "1.5"], "not an integer"),
    (["lab", "--workers", "0"], "positive integer"),
    (["lab", "--workers=-inf"], "not a finite number"),
    (["lab", "--workers", "-inf"], "expected one argument"),
    (["lab", "nosuch"], "unknown experiment 'nosuch'; known: fake-failing, fake-fast"),
    (["lab", "--set", "nosuchkey=1"], "has no config key 'nosuchkey'"),
    (["lab", "--set", "steps=abc"], "expected an integer like the default 5"),
    (["lab", "--set", "effect=nan"], "finite number"),
    (["lab", "--set", "nokey"], "expects key=value"),
    (["lab", "--set", "other.steps=3"], "'other' is not a selected experiment"),
    (["lab", "--db", "CORRUPT"], "is not a SQLite database"),
    (["lab", "--db", "FOREIGN"], "another application"),
    (["report", "--db", "MISSING"], "no database at"),
    (["report", "--db", "CORRUPT"], "is not a SQLite database"),
    (["lab", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _bad_files(tmp_path)
    argv = [files.get(a, a) for a in argv]
    assert _run([*argv, "--out", str(tmp_path / "out")] if argv[0] != "frobnicate" else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        REGISTRY_ENV: "lab_fakes",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(SRC)]),
    }
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


_LIGHT = """
import sys
import normlab.cli
normlab.cli.build_parser()
heavy = ("matplotlib", "rich", "ray", "sqlite3", "normlab.lab.store", "normlab.bench", "sklearn")
print(sorted(m for m in heavy if m in sys.modules))
sys.exit(normlab.cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_real_processes_exit_2_without_traceback_and_import_light(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    proc = _subprocess(["-m", "normlab", "lab", "--seeds", "nan"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "normlab lab: error: argument --seeds: expected a positive integer, got 'nan' "
        "(not a finite number) (see --help)"
    ]
    # Importing the CLI and building its parser loads none of the heavy modules.
    proc = _subprocess(["-c", _LIGHT, "report", "--db", files["FOREIGN"]], tmp_path)
    assert proc.stdout.strip() == "[]"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("normlab: error: ") and "another application" in proc.stderr


@pytest.mark.slow
def test_lab_list_report_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # Defaults: normlab.db and normlab-report/ in the working directory.
    argv = ["lab", "fake-fast", "C97", "--seeds", "2", "--workers", "2", "--quick"]
    assert _run([*argv, "--set", "fake-fast.steps=4", "--set", "label=x"]) == 1  # C97 fails seed 1
    out = capsys.readouterr().out
    assert "verdicts" in out and "fake-fast" in out and "supported" in out
    assert "runs: 3 finished, 1 failed, 0 already in normlab.db" in out
    data = json.loads((tmp_path / "normlab-report" / "results.json").read_text())
    by_name = {e["name"]: e for e in data["experiments"]}
    assert by_name["fake-fast"]["config"]["steps"] == 4
    assert by_name["fake-failing"]["config"]["steps"] == 3  # --quick
    assert (
        by_name["fake-fast"]["config"]["label"] == "x" == by_name["fake-failing"]["config"]["label"]
    )
    assert (tmp_path / "normlab-report" / "figures" / "fake-fast" / "acc.png").exists()

    # Again: nothing finished is rerun, the failure is retried.
    assert _run([*argv, "--set", "fake-fast.steps=4", "--set", "label=x"]) == 1
    assert "runs: 0 finished, 1 failed, 3 already in normlab.db" in capsys.readouterr().out

    # One experiment now: the report keeps the others the database holds.
    assert _run(["lab", "fake-slow", "--seeds", "1", "--workers", "1", "--set", "sleep=0"]) == 0
    data = json.loads((tmp_path / "normlab-report" / "results.json").read_text())
    assert [e["name"] for e in data["experiments"]] == ["fake-failing", "fake-fast", "fake-slow"]
    capsys.readouterr()

    assert _run(["report", "--out", "rebuilt"]) == 0
    out = capsys.readouterr().out
    assert "report: rebuilt/index.html" in out and "C98" in out
    assert (tmp_path / "rebuilt" / "index.html").exists()

    assert _run(["list"]) == 0
    out = capsys.readouterr().out
    assert "fake-slow" in out and "C99" in out


def test_subcommands_registered(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "--steps", "5"])
    assert (args.command, args.steps) == ("demo", 5)
    args = parser.parse_args(["lab"])
    assert (args.db, args.out, args.seeds, args.workers) == (
        "normlab.db",
        "normlab-report",
        3,
        None,
    )
    for name, module in (("bench", "normlab.bench"), ("doctor", "normlab.diagnostics.doctor")):
        if importlib.util.find_spec(module) is None:
            continue
        assert _run([name, "--help"]) == 0
        assert f"usage: normlab {name}" in capsys.readouterr().out


def test_ray_address_without_ray_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    db = tmp_path / "lab.db"
    argv = ["lab", "fake-fast", "--ray-address", "local", "--db", str(db)]
    assert _run([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'normlab[ray]'" in err
    assert "Traceback" not in err
    # Nothing was claimed: a later sweep runs everything.
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
