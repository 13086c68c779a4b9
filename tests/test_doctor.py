"""normlab doctor: known pathologies are found, their healthy twins raise no alarm, and the command
line fails cleanly on bad input."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import normlab.nn as nlnn
from normlab.diagnostics.doctor import (
    DoctorError,
    DoctorReport,
    add_arguments,
    doctor,
    load_data,
    resolve_factory,
    run,
)
from normlab.diagnostics.examples import (
    bn_mlp,
    dead_relu_mlp,
    ln_mlp,
    normalized_sigmoid_mlp,
    relu_mlp,
    saturated_sigmoid_mlp,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:1000], dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y[:1000])


CASES = {
    # name: (factory, batch size, steps, findings that must appear; none for a healthy twin)
    "sigmoid_saturated": (saturated_sigmoid_mlp, 32, 60, {"saturation", "vanishing_gradients"}),
    # 60 steps: after 20, the running statistics still lag (a true finding, not the one tested)
    "sigmoid_normalized": (normalized_sigmoid_mlp, 32, 60, set()),
    "relu_dead": (dead_relu_mlp, 32, 20, {"dead_units"}),
    "relu_healthy": (relu_mlp, 32, 20, set()),
    "bn_batch_2": (bn_mlp, 2, 20, {"batch_noise", "train_eval_gap"}),
    "bn_batch_64": (bn_mlp, 64, 20, set()),
    "ln_batch_2": (ln_mlp, 2, 20, set()),
}


@pytest.fixture(scope="module")
def reports(digits: tuple[torch.Tensor, torch.Tensor]) -> dict[str, DoctorReport]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: doctor(factory, digits, batch_size=b, steps=steps)
                for name, (factory, b, steps, _) in CASES.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_findings(reports: dict[str, DoctorReport], name: str) -> None:
    expected = CASES[name][3]
    codes = reports[name].codes
    if expected:
        assert expected <= codes
    else:
        assert codes == set(), [f.message for f in reports[name].findings]  # no false alarm


def test_saturation_and_vanishing_evidence(reports: dict[str, DoctorReport]) -> None:
    report = reports["sigmoid_saturated"]
    found = {f.code: f for f in report.findings}
    assert found["vanishing_gradients"].evidence["ratio"] < 1e-3
    assert "gradients shrink 10^" in found["vanishing_gradients"].message
    sat = found["saturation"]
    assert set(sat.layers) <= {"1", "3", "5", "7", "9", "11"} and len(sat.layers) >= 3
    rows = {r["layer"]: r for r in report.layers}
    assert all(rows[k]["saturated"] == sat.evidence[k] >= 0.2 for k in sat.layers)
    healthy = {r["layer"]: r for r in reports["sigmoid_normalized"].layers}
    assert max(r["saturated"] for r in healthy.values() if r["saturated"] is not None) < 0.05
    assert reports["sigmoid_normalized"].summary["grad_verdict"] == "healthy"


def test_dead_unit_evidence(reports: dict[str, DoctorReport]) -> None:
    dead = {f.code: f for f in reports["relu_dead"].findings}["dead_units"]
    assert dead.evidence["3"] >= 0.5
    assert "(eval mode, 512 samples)" in dead.message
    rows = {r["layer"]: r for r in reports["relu_healthy"].layers}
    assert rows["1"]["dead_fraction"] == rows["3"]["dead_fraction"] == 0.0


def test_batch_norm_evidence(reports: dict[str, DoctorReport]) -> None:
    small = reports["bn_batch_2"]
    found = {f.code: f for f in small.findings}
    assert "BatchNorm at batch 2 per process" in found["batch_noise"].message
    assert found["batch_noise"].evidence["1.mean_noise"] > 0.5  # ~ 1/sqrt(2)
    assert found["train_eval_gap"].evidence["disagreement"] >= 0.25
    rows = {r["layer"]: r for r in small.layers}
    assert rows["1"]["bn_risk"] == rows["4"]["bn_risk"] == "high"
    assert rows["1"]["bn_noise_curve"][64] < 0.2 < rows["1"]["bn_noise_curve"][2]
    large = {r["layer"]: r for r in reports["bn_batch_64"].layers}
    assert large["1"]["bn_risk"] == "low"
    assert small.summary["coupling"] > reports["bn_batch_64"].summary["coupling"] > 0
    assert reports["ln_batch_2"].summary["coupling"] == 0.0
    assert "train_mode_accuracy" not in reports["ln_batch_2"].summary  # no running statistics


def test_report_renders_and_serializes(reports: dict[str, DoctorReport],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    report = reports["bn_batch_2"]
    out = io.StringIO()
    report.render(out)
    text = out.getvalue()
    for word in ("grad norm", "act std", "dead", "saturated", "BN risk @2", "BatchNorm1d",
                 "high (", "batch_noise:", "train_eval_gap:"):
        assert word in text
    data = json.loads(report.to_json())
    assert {f["code"] for f in data["findings"]} == report.codes
    assert data["layers"][1]["bn_noise_curve"]["2"] == pytest.approx(
        report.layers[1]["bn_noise_curve"][2])
    monkeypatch.setitem(sys.modules, "rich.console", None)  # rich not installed: plain text
    plain = io.StringIO()
    reports["relu_healthy"].render(plain)
    assert "No findings" in plain.getvalue() and "grad norm" in plain.getvalue()


# -- inputs ---------------------------------------------------------------------------------------


def test_synthetic_inputs_from_a_shape() -> None:
    report = doctor(lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), input_shape="1,4,4",
                    batch_size=8, steps=3)
    assert report.settings["loss"] == "cross-entropy"
    assert "random linear teacher" in report.settings["data"]
    assert report.settings["samples"] == 512
    regression = doctor(lambda: nn.Linear(5, 1), input_shape=(5,), batch_size=16, steps=2)
    assert regression.settings["loss"] == "mse"


def _write_module(tmp_path: Path) -> Path:
    path = tmp_path / "toy_models.py"
    path.write_text(
        "import torch.nn as nn\n"
        "def mlp():\n    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "def not_a_model():\n    return 42\n"
        "def broken():\n    raise RuntimeError('factory exploded')\n"
    )
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normlab doctor")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_json_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    module = _write_module(tmp_path)
    g = np.random.default_rng(0)
    x, y = g.normal(size=(64, 3)).astype(np.float32), g.integers(0, 2, 64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    torch.save((torch.from_numpy(x),), tmp_path / "x_only.pt")
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",", header="a,b,c,label",
               comments="")
    monkeypatch.syspath_prepend(str(tmp_path))
    for factory, data in ((f"{module}:mlp", "d.npz"), ("toy_models:mlp", "d.pt"),
                          ("toy_models:mlp", "d.csv"), ("toy_models:mlp", "x_only.pt")):
        code = run(_args(factory, "--data", str(tmp_path / data), "--batch-size", "16",
                         "--steps", "3", "--optimizer", "adam", "--json"))
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        assert report["settings"]["loss"] == "cross-entropy"
        assert report["settings"]["samples"] == 64
        assert [r["layer"] for r in report["layers"]] == ["0", "1", "2"]
    assert report["settings"]["data"].endswith("targets from a random linear teacher")
    np.testing.assert_array_equal(load_data(tmp_path / "d.csv")[1].numpy(), y)


def test_float_targets_mean_mse(tmp_path: Path) -> None:
    g = np.random.default_rng(1)
    np.savez(tmp_path / "r.npz", x=g.normal(size=(40, 5)), y=g.normal(size=40))
    report = doctor(lambda: nn.Linear(5, 1), tmp_path / "r.npz", batch_size=8, steps=2)
    assert report.settings["loss"] == "mse"


BAD_INPUTS = [
    (("no_colon_here", "--input-shape", "3"), "must look like 'package.module:function'"),
    (("surely_not_a_module_xyz:f", "--input-shape", "3"), "cannot import surely_not_a_module_xyz"),
    (("json:nope", "--input-shape", "3"), "json has no attribute 'nope'"),
    (("json:dumps", "--input-shape", "3"), "raised TypeError"),
    (("{m}:not_a_model", "--input-shape", "3"), "returned int, expected a torch.nn.Module"),
    (("{m}:broken", "--input-shape", "3"), "raised RuntimeError: factory exploded"),
    (("missing_dir/m.py:f", "--input-shape", "3"), "no file missing_dir/m.py"),
    (("{m}:mlp", "--input-shape", "a,b"), "must be positive integers separated by commas"),
    (("{m}:mlp", "--input-shape", "7"), "rejects inputs of shape [7] (per sample)"),
    (("{m}:mlp", "--data", "{d}/missing.npz"), "does not exist"),
    (("{m}:mlp", "--data", "{d}/no_x.npz"), "has no array 'x' (it has: inputs)"),
    (("{m}:mlp", "--data", "{d}/pickled.pt"), "cannot read data file"),
    (("{m}:mlp", "--data", "{d}/data.txt"), "unsupported suffix '.txt'"),
    (("{m}:mlp", "--data", "{d}/few.npz", "--batch-size", "32"), "fewer than one batch of 32"),
    (("{m}:mlp", "--data", "{d}/labels.npz", "--batch-size", "4"), "labels range over [0, 5] but the model outputs 2"),
    (("{m}:mlp", "--input-shape", "3", "--steps", "0"), "must be >= 1"),
]


class _Opaque:  # a pickled class: torch.load(weights_only=True) must refuse it
    pass


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_factory_or_input_exits_2_with_one_line(
    argv: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _write_module(tmp_path)
    np.savez(tmp_path / "no_x.npz", inputs=np.zeros((4, 3)))
    np.savez(tmp_path / "few.npz", x=np.zeros((4, 3)))
    np.savez(tmp_path / "labels.npz", x=np.zeros((20, 3)), y=np.arange(20) % 6)
    torch.save({"x": _Opaque()}, tmp_path / "pickled.pt")
    (tmp_path / "data.txt").write_text("1,2,3\n")
    filled = [a.format(m=module, d=tmp_path) for a in argv]
    assert run(_args(*filled)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("normlab doctor: error: ") and "\n" not in err
    assert message in err
    assert "Traceback" not in err


def test_resolve_factory_and_api_errors() -> None:
    assert resolve_factory(bn_mlp) is bn_mlp
    assert resolve_factory("normlab.nn:LayerNorm") is nlnn.LayerNorm
    assert resolve_factory("normlab.diagnostics.examples:relu_mlp") is relu_mlp
    with pytest.raises(DoctorError, match="either data or an input shape"):
        doctor(bn_mlp, batch_size=4)
    with pytest.raises(DoctorError, match="unknown optimizer 'rmsprop'"):
        doctor(bn_mlp, input_shape=(64,), optimizer="rmsprop")


def test_module_entry_point_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "normlab.diagnostics.doctor", "nowhere_xyz:model",
         "--input-shape", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "normlab doctor: error: model factory 'nowhere_xyz:model': cannot import nowhere_xyz: "
        "ModuleNotFoundError: No module named 'nowhere_xyz'"
    )
