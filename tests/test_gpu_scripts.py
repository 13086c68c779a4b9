"""The GPU scripts run end to end on this CPU-only machine (Triton's interpreter), so they cannot
rot between the sessions that lend a GPU: the check runs every Triton-backed module through the
public API against the float64 reference with the Triton kernels selected for CPU tensors, and
the backward probe checks each kernel variant it would time against the formula."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--dry-run", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _check_records(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "check.json"
    _script("gpu_check.py", "--quick", "--dtypes", "float32", "--json", str(out), *args)
    return json.loads(out.read_text())["records"]


def test_gpu_check_dry_run_passes_and_uses_the_triton_kernels(tmp_path) -> None:
    records = _check_records(tmp_path)
    assert len(records) == 30 and all(r["ok"] for r in records)
    # every case went through Triton (forward and backward), channels_last included
    assert all(r["triton_calls"] >= 2 for r in records)


def test_gpu_check_only_runs_the_matching_cases(tmp_path) -> None:
    records = _check_records(tmp_path, "--only", r"^GroupNorm .* CL$")
    assert [(r["case"], r["channels_last"]) for r in records] == [("GroupNorm", True)]


def test_gpu_probe_vec_dry_run_variants_agree_with_the_formula() -> None:
    proc = _script("gpu_probe_vec.py")
    lines = [ln for ln in proc.stdout.splitlines() if "max rel err" in ln]
    assert len(lines) == 6 and all(ln.endswith(" ok") for ln in lines), proc.stdout


def test_gpu_probe_bn_dry_run_times_every_module_and_pass() -> None:
    proc = _script("gpu_probe_bn.py")
    lines = [ln for ln in proc.stdout.splitlines() if ln.rstrip().endswith(" us")]
    assert len(lines) == 20, proc.stdout  # 5 modules x 2 layouts x (fwd, fwd+bwd)
