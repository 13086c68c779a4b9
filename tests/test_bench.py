"""``normlab bench`` runs and writes valid JSON (a smoke test: timings are never asserted)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from normlab import bench


def test_bench_quick_writes_json(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--quick", "--ops", "layer_norm", "batch_norm_relu",
                              "--repeats", "1", "--min-time", "0", "--json", str(out)])
    assert bench.run(args) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True
    cases = {(r["case"], r["layout"], r["pass"]) for r in data["results"]}
    assert cases == {("layer_norm", "contiguous", "fwd"), ("layer_norm", "contiguous", "fwd+bwd"),
                     ("batch_norm_relu", "contiguous", "fwd"),
                     ("batch_norm_relu", "contiguous", "fwd+bwd"),
                     ("batch_norm_relu", "channels_last", "fwd"),
                     ("batch_norm_relu", "channels_last", "fwd+bwd")}
    for rec in data["results"]:
        assert {"normlab", "reference", "torch", "copy"} <= set(rec["times_ms"])
        assert all(t > 0 for t in rec["times_ms"].values())
        assert rec["speedup"]["vs_torch"] > 0
    assert "layer_norm" in capsys.readouterr().out


def test_bench_rejects_unknown_op(capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--quick", "--ops", "nope"])) == 2
    assert "unknown op(s) ['nope']" in capsys.readouterr().err


def test_bench_add_layer_norm_gelu_providers_compute_the_same_thing() -> None:
    (case,) = bench._cases(True, ["add_layer_norm_gelu"])
    assert (case.reads, case.writes) == (2, 2)
    cpu, f32 = torch.device("cpu"), torch.float32
    inputs = bench._make_inputs(case, cpu, f32, seed=0)
    outs = {p: case.build(p, cpu, f32, case.shape[-1])(*inputs)
            for p in ("normlab", "reference", "torch")}
    torch.testing.assert_close(outs["torch"][1], inputs[0] + inputs[1])
    for p in ("reference", "torch"):
        for ours, theirs in zip(outs["normlab"], outs[p]):
            torch.testing.assert_close(ours, theirs)


def test_bench_keep_freed_memory_is_recorded(tmp_path) -> None:
    # In a subprocess: the option changes malloc's behaviour for the rest of the process.
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "normlab.bench", "--quick", "--ops", "rms_norm", "--repeats", "1",
         "--min-time", "0", "--forward-only", "--keep-freed-memory", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["meta"]["keep_freed_memory"] is True
    assert "freed" in proc.stdout.split("┏")[0]  # said in the title


def test_bench_gpu_cases_add_shapes_past_the_l2() -> None:
    cpu_shapes = {(c.name, c.shape) for c in bench._cases(False, None)}
    gpu_shapes = {(c.name, c.shape) for c in bench._cases(False, None, gpu=True)}
    assert cpu_shapes < gpu_shapes
    added = gpu_shapes - cpu_shapes
    assert ("rms_norm", (4096, 16384)) in added and ("group_norm", (128, 256, 56, 56)) in added
    # quick runs stay small on every device
    assert {c.shape for c in bench._cases(True, None, gpu=True)} == {(256, 512), (4, 64, 16, 16)}


def test_bench_liger_is_cuda_only_and_optional() -> None:
    (case,) = [c for c in bench._cases(True, ["rms_norm"])]
    assert case.build("liger", torch.device("cpu"), torch.float32, 512) is None
    # without Liger installed the factory says so instead of raising
    assert bench._liger_module("batch_norm", 64) is None


def test_bench_tiny_times_host_bound_shapes_on_every_op(tmp_path) -> None:
    cases = bench._cases(False, None, tiny=True)
    assert {c.name for c in cases} == {c.name for c in bench._cases(False, None)}
    assert {c.shape for c in cases} == {(8, 64), (2, 32, 4, 4)}
    # group norm's 32 groups divide the tiny images' channels
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "tiny.json"
    args = parser.parse_args(["--tiny", "--ops", "group_norm", "--repeats", "1",
                              "--min-time", "0", "--json", str(out)])
    assert bench.run(args) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["tiny"] is True
    assert {tuple(r["shape"]) for r in data["results"]} == {(2, 32, 4, 4)}



@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--repeats", "-1"], ["--min-time", "nan"],
                                 ["--min-time", "inf"], ["--min-time", "-1"],
                                 ["--threads", "-2"], ["--threads", "0"], ["--device", "tpu"],
                                 ["--json", "/no/such/dir/x.json"], ["--json", "."]])
def test_bad_options_exit_2_with_one_line_before_anything_runs(bad, capsys) -> None:
    from normlab import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad[0] in err and "Traceback" not in err, err
