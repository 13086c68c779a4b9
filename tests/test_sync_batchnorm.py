"""SyncBatchNorm: single-process equivalence, torch compatibility, conversion, and multi-process
runs over gloo checked against one torch BatchNorm over the concatenated batch (float64)."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab.nn as nlnn
from normlab.distributed import spawn
from normlab.nn.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

C = 3
TOL = {"rtol": 1e-10, "atol": 1e-12}
PEER_TIMEOUT = 3.0  # seconds; the missing-peer check waits this long once

# Per step, the batch size of each rank. (1, 1): one sample per rank, two in all, which a local
# batch norm rejects and a synchronized one accepts. (0, 0): an empty global batch.
STEPS = {
    2: [(3, 5), (0, 4), (1, 1), (0, 0), (6, 2)],
    3: [(2, 0, 5), (1, 1, 1), (4, 2, 3), (0, 0, 0)],
}


def _step_data(step: int, n: int) -> dict[str, torch.Tensor]:
    """The global batch of one step: inputs with an offset, and upstream gradients."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "x4": 3.0 + 2.0 * torch.randn(n, C, 2, 3, generator=g, dtype=torch.float64),
        "dy4": torch.randn(n, C, 2, 3, generator=g, dtype=torch.float64),
        "x2": -1.0 + 0.5 * torch.randn(n, C, generator=g, dtype=torch.float64),
        "dy2": torch.randn(n, C, generator=g, dtype=torch.float64),
    }


def _make_layers(
    cls: type, cma_cls: type | None = None, **kw: object
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An affine layer (momentum 0.1, fed 4D input) with non-trivial parameters, and a non-affine
    one (cumulative average, fed 2D input)."""
    affine = cls(C, dtype=torch.float64, **kw)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        affine.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    cma = (cma_cls or cls)(C, momentum=None, affine=False, dtype=torch.float64, **kw)
    return affine, cma


def _run_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, object]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * dy).sum().backward()
    return {
        "out": out.detach(),
        "grad_input": x.grad,
        "grad_weight": None if layer.weight is None else layer.weight.grad,
        "grad_bias": None if layer.bias is None else layer.bias.grad,
    }


def _state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in layer.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Multi-process worker (module level: spawned processes import it by name).


def _scenario(rank: int, steps: list[tuple[int, ...]], group: object) -> dict[str, object]:
    """Training steps over ``group``, then a one-value-per-channel batch over the whole group."""
    affine, cma = _make_layers(SyncBatchNorm, process_group=group)
    results: dict[str, object] = {"steps": []}
    for step, sizes in enumerate(steps):
        data = _step_data(step, sum(sizes))
        local = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        results["steps"].append(
            {
                "affine": _run_step(affine, data["x4"][local], data["dy4"][local]),
                "cma": _run_step(cma, data["x2"][local], data["dy2"][local]),
            }
        )
    results["state"] = {"affine": _state(affine), "cma": _state(cma)}
    before = _state(cma)
    try:  # rank 0 holds the only sample of the group
        cma(torch.zeros(1 if rank == 0 else 0, C, dtype=torch.float64))
        results["one_value_error"] = None
    except ValueError as err:
        results["one_value_error"] = str(err)
    results["one_value_state_kept"] = all(
        torch.equal(before[k], t) for k, t in cma.state_dict().items()
    )
    before = _state(affine)
    x = _step_data(0, 4)["x4"]
    x[0, 1, 0, 0] = float("nan") if rank == 0 else 0.0  # only rank 0's data is non-finite
    try:
        affine(x)
        results["nonfinite_error"] = None
    except FloatingPointError as err:
        results["nonfinite_error"] = str(err)
    results["nonfinite_state_kept"] = all(
        torch.equal(before[k], t) for k, t in affine.state_dict().items()
    )
    return results


def _sync_worker(rank: int, world: int, peer_left: object) -> dict[object, object]:
    """Three ranks: the 3-rank scenario over the world, then the 2-rank one over a subgroup of
    ranks 0 and 1, which also run the no-collective and missing-peer checks."""
    # Every rank creates every group, in the same order (torch.distributed requires it).
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(world)]
    short = dist.new_group([0, 1], timeout=timedelta(seconds=PEER_TIMEOUT))
    results: dict[object, object] = {3: _scenario(rank, STEPS[3], None)}
    if rank < 2:
        results[2] = _scenario(rank, STEPS[2], pair)
        results.update(_no_collective_checks(rank, singles[rank]))
        results["timeout_error"] = _missing_peer(rank, short, peer_left)
    return results


def _no_collective_checks(rank: int, single: object) -> dict[str, object]:
    """Eval mode and one-rank groups must not start a collective; the patch detects one."""
    data = _step_data(99, 4)
    x, dy = data["x4"] + rank, data["dy4"]
    solo, _ = _make_layers(SyncBatchNorm, process_group=single)
    layer, _ = _make_layers(SyncBatchNorm)
    ref, _ = _make_layers(torch.nn.BatchNorm2d)
    failing = {"side_effect": AssertionError("collective started")}
    with (
        mock.patch.object(dist, "all_gather", **failing) as gather,
        mock.patch.object(dist, "all_reduce", **failing) as reduce,
    ):
        got, want = _run_step(solo, x, dy), _run_step(ref, x, dy)
        out = {"single_rank_train": all(torch.allclose(got[k], want[k]) for k in want)}
        layer.load_state_dict(ref.state_dict())
        layer.eval()
        ref.eval()
        got, want = _run_step(layer, x, dy), _run_step(ref, x, dy)
        out["eval"] = all(torch.allclose(got[k], want[k]) for k in want)
        out["calls_without_sync"] = gather.call_count + reduce.call_count
        layer.train()
        with pytest.raises(AssertionError, match="collective started"):
            layer(x)
        out["calls_with_sync"] = gather.call_count
    return out


def _missing_peer(rank: int, group: object, peer_left: object) -> tuple[str, float] | None:
    """Rank 1 never calls forward; rank 0 must fail after the group's timeout, not hang."""
    layer, _ = _make_layers(SyncBatchNorm, process_group=group)
    if rank == 1:
        assert peer_left.wait(timeout=60)  # stay alive and silent until rank 0 has given up
        return None
    start = time.monotonic()
    try:
        layer(_step_data(0, 4)["x4"])
        return None
    except RuntimeError as err:
        return str(err), time.monotonic() - start
    finally:
        peer_left.set()


_RUN: dict[str, object] = {}


def _run() -> list[dict[object, object]]:
    """One spawned three-process run shared by the tests (process start-up dominates); a failed
    run fails every test that needs it without being retried."""
    if not _RUN:
        peer_left = mp.get_context("spawn").Event()
        try:
            _RUN["results"] = spawn(_sync_worker, 3, peer_left, timeout=90)
        except (RuntimeError, TimeoutError) as err:
            _RUN["error"] = f"{type(err).__name__}: {err}"
    if "error" in _RUN:
        pytest.fail(f"the shared three-process run failed:\n{_RUN['error']}", pytrace=False)
    return _RUN["results"]


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def world(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, object]]]:
    """(n, per-rank results of the n-rank scenario)."""
    n = request.param
    return n, [res[n] for res in _run()[:n]]


@pytest.fixture
def world2() -> list[dict[object, object]]:
    return _run()[:2]


def _reference(steps: list[tuple[int, ...]]) -> tuple[list[dict[str, dict]], dict[str, dict]]:
    """torch's BatchNorm over each step's whole batch."""
    affine, cma = _make_layers(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
    per_step = []
    for step, sizes in enumerate(steps):
        if sum(sizes) == 0:  # nothing to normalize, nothing to update
            per_step.append({})
            continue
        data = _step_data(step, sum(sizes))
        per_step.append(
            {
                "affine": _run_step(affine, data["x4"], data["dy4"]),
                "cma": _run_step(cma, data["x2"], data["dy2"]),
            }
        )
    return per_step, {"affine": _state(affine), "cma": _state(cma)}


@pytest.mark.slow
def test_outputs_and_grads_match_one_batchnorm_over_all_ranks(world):
    n, results = world
    steps = STEPS[n]
    ref_steps, _ = _reference(steps)
    for step, sizes in enumerate(steps):
        for name in ("affine", "cma"):
            for rank, res in enumerate(results):
                got = res["steps"][step][name]
                local = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                if sum(sizes) == 0:
                    assert got["out"].shape == (0, *got["out"].shape[1:])
                    assert got["grad_input"].numel() == 0
                    continue
                ref = ref_steps[step][name]
                torch.testing.assert_close(got["out"], ref["out"][local], **TOL)
                torch.testing.assert_close(got["grad_input"], ref["grad_input"][local], **TOL)
            if sum(sizes) == 0 or name == "cma":
                continue
            for key in ("grad_weight", "grad_bias"):  # local; their sum is the full-batch gradient
                total = sum(res["steps"][step][name][key] for res in results)
                torch.testing.assert_close(total, ref_steps[step][name][key], **TOL)


@pytest.mark.slow
def test_empty_rank_gets_empty_input_grad_and_zero_param_grads(world):
    n, results = world
    empties = [
        (s, r)
        for s, sizes in enumerate(STEPS[n])
        for r, k in enumerate(sizes)
        if k == 0 and sum(sizes) > 0
    ]
    assert empties
    for step, rank in empties:
        got = results[rank]["steps"][step]["affine"]
        assert got["out"].shape == (0, C, 2, 3) and got["grad_input"].shape == (0, C, 2, 3)
        assert torch.equal(got["grad_weight"], torch.zeros(C, dtype=torch.float64))
        assert torch.equal(got["grad_bias"], torch.zeros(C, dtype=torch.float64))


@pytest.mark.slow
def test_running_stats_match_and_agree_across_ranks(world):
    n, results = world
    _, ref_state = _reference(STEPS[n])
    nonempty = sum(1 for sizes in STEPS[n] if sum(sizes) > 0)
    for name in ("affine", "cma"):
        assert int(ref_state[name]["num_batches_tracked"]) == nonempty
        for res in results:
            state = res["state"][name]
            assert state.keys() == ref_state[name].keys()
            for key, value in ref_state[name].items():
                torch.testing.assert_close(state[key], value, **TOL)
            for key, value in results[0]["state"][name].items():
                assert torch.equal(state[key], value), "ranks disagree"


@pytest.mark.slow
def test_one_value_per_channel_counts_all_ranks(world):
    _, results = world
    for res in results:
        assert res["one_value_error"] is not None
        assert re.search(
            r"more than 1 value per channel .* got 1 across the \d ranks", res["one_value_error"]
        )
        assert res["one_value_state_kept"]


@pytest.mark.slow
def test_nonfinite_statistics_of_one_rank_refused_on_every_rank(world):
    _, results = world
    for res in results:
        assert re.search(
            r"SyncBatchNorm: the batch statistics are NaN or infinite in channel\(s\) "
            r"\[1\]",
            res["nonfinite_error"] or "",
        )
        assert res["nonfinite_state_kept"]


@pytest.mark.slow
def test_eval_and_single_rank_group_start_no_collective(world2):
    for res in world2:
        assert res["calls_without_sync"] == 0
        assert res["calls_with_sync"] == 1  # the patch does see a synchronized forward
        assert res["single_rank_train"] and res["eval"]


@pytest.mark.slow
def test_missing_peer_fails_with_timeout_error(world2):
    results = world2
    assert results[0]["timeout_error"] is not None
    message, waited = results[0]["timeout_error"]
    assert PEER_TIMEOUT * 0.9 <= waited < PEER_TIMEOUT + 30
    assert re.search(
        r"SyncBatchNorm: the all-gather .* failed on rank 0: a peer did not arrive", message
    )
    assert "Timed out" in message  # gloo's own words, kept in the message
    assert results[1]["timeout_error"] is None


# --------------------------------------------------------------------------------------------
# Single process: no process group, so SyncBatchNorm is batch norm.


@pytest.mark.parametrize("shape", [(6, C), (5, C, 4), (4, C, 2, 3), (3, C, 2, 2, 2)])
def test_without_process_group_equals_batchnorm(shape):
    sync, sync_cma = _make_layers(SyncBatchNorm)
    ref_cls = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[len(shape)]
    ref, ref_cma = _make_layers(ref_cls)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = 2.0 + torch.randn(shape, generator=g, dtype=torch.float64)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        for ours, theirs in ((sync, ref), (sync_cma, ref_cma)):
            got, want = _run_step(ours, x, dy), _run_step(theirs, x, dy)
            for key, value in want.items():
                if value is not None:
                    torch.testing.assert_close(got[key], value, **TOL)
    for ours, theirs in ((sync, ref), (sync_cma, ref_cma)):
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, **TOL)
        ours.eval()
        theirs.eval()
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_empty_batch_without_process_group_changes_nothing():
    layer, _ = _make_layers(SyncBatchNorm)
    before = _state(layer)
    out = layer(torch.empty(0, C, 4, dtype=torch.float64))
    assert out.shape == (0, C, 4)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_torch_compatible_state_dict_and_repr():
    ours = SyncBatchNorm(5, eps=1e-3, momentum=None, bias=False)
    theirs = torch.nn.SyncBatchNorm(5, eps=1e-3, momentum=None, bias=False)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.process_group is None
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.running_mean.uniform_()
        theirs.num_batches_tracked.fill_(4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    no_stats = SyncBatchNorm(2, affine=False, track_running_stats=False)
    assert repr(no_stats) == repr(
        torch.nn.SyncBatchNorm(2, affine=False, track_running_stats=False)
    )
    assert list(no_stats.state_dict()) == []


def test_input_errors():
    layer = SyncBatchNorm(C)
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected an input of shape \(N, C, \*\)"):
        layer(torch.zeros(C))
    with pytest.raises(ValueError, match="expected 3 channels in dim 1"):
        layer(torch.zeros(4, C + 1))
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.zeros(4, C, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.zeros(1, C))
    assert int(layer.num_batches_tracked) == 0


def test_convert_sync_batchnorm_recursively_carries_state():
    head = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), torch.nn.BatchNorm2d(4, momentum=None))
    model = torch.nn.Sequential(
        head,
        nlnn.BatchNorm2d(4, eps=1e-3, affine=False),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 9, 5, bias=False),
        torch.nn.BatchNorm1d(5, bias=False, track_running_stats=False),
        nlnn.InstanceNorm1d(5),
        nlnn.BatchNorm1d(5, on_nonfinite="skip"),
    )
    with torch.no_grad():
        head[1].weight.uniform_()
        head[1].running_var.uniform_(1, 2)
        head[1].num_batches_tracked.fill_(3)
    head.eval()
    tensors = {
        "bn": (head[1].weight, head[1].running_mean),
        "nl": (model[1].weight, model[1].running_mean),
    }
    group = object()
    converted = convert_sync_batchnorm(model, group)
    assert converted is model
    bn, nl, lin_bn = model[0][1], model[1], model[4]
    for layer in (bn, nl, lin_bn):
        assert type(layer) is SyncBatchNorm and layer.process_group is group
    assert type(model[5]) is nlnn.InstanceNorm1d and type(model[0][0]) is torch.nn.Conv2d
    assert bn.weight is tensors["bn"][0] and bn.running_mean is tensors["bn"][1]
    assert int(bn.num_batches_tracked) == 3 and bn.momentum is None and not bn.training
    assert nl.weight is None and nl.running_mean is tensors["nl"][1] and nl.eps == 1e-3
    assert nl.training
    assert lin_bn.bias is None and lin_bn.weight is not None and lin_bn.running_mean is None
    assert lin_bn.on_nonfinite == "error" and model[6].on_nonfinite == "skip"
    single = torch.nn.BatchNorm3d(2)
    new = SyncBatchNorm.convert_sync_batchnorm(single)
    assert type(new) is SyncBatchNorm and new.weight is single.weight


def test_convert_leaves_normlab_variants_alone():
    class Variant(nlnn.BatchNorm2d):
        pass

    model = torch.nn.Sequential(Variant(3))
    assert type(convert_sync_batchnorm(model)[0]) is Variant


# --------------------------------------------------------------------------------------------
# The launcher the multi-process tests rely on.


def _fail_on_rank1(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("boom on rank 1")
    dist.barrier()  # rank 1 never arrives: only the launcher can end this rank early


def _wait_for(rank: int, world: int, never_set: object) -> bool:
    return never_set.wait(timeout=120)


def _workers_alive() -> list[str]:
    return [p.name for p in mp.active_children() if p.name.startswith("normlab-rank")]


def test_spawn_reports_a_failing_rank_and_kills_the_others():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 raised:.*KeyError: 'boom on rank 1'"):
        spawn(_fail_on_rank1, 2, timeout=120)
    assert time.monotonic() - start < 60  # rank 0 was killed, not left to its 120 s timeout
    assert _workers_alive() == []


def test_spawn_times_out_and_kills_every_rank():
    never_set = mp.get_context("spawn").Event()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 3 s"):
        spawn(_wait_for, 2, never_set, timeout=3)
    assert _workers_alive() == []


def test_spawn_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size=0 must be a positive integer"):
        spawn(_wait_for, 0)
