"""Run (experiment, config, seed) tasks in parallel and record them in the results store.

Executors: a local process pool by default (one single-threaded torch worker per core), or a Ray
cluster when an address is given (``ray`` is optional and imported only then).

Who writes: the *driver* (the process that called :func:`run_sweep`) claims every task in the
store before it starts, workers only compute and return a :class:`RunResult`, and the driver
records each outcome in one transaction as it arrives. One writer keeps SQLite free of lock
contention, and it is the only design that works on Ray, whose workers may run on machines that
cannot see the database file. Results are small (scalars, short curves), so sending them back
costs nothing next to the runs.

Resume: the claims carry the driver's pid; if the driver is killed, its ``running`` rows are
stale and the next sweep claims them again, while finished rows are skipped (see
:mod:`normlab.lab.store`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Literal

from normlab.lab.experiment import Experiment, RunResult, config_to_dict, run_key
from normlab.lab.store import Store, StoreError

__all__ = [
    "DataParallelResult",
    "Outcome",
    "SweepError",
    "SweepSummary",
    "Task",
    "execute_task",
    "make_tasks",
    "run_sweep",
    "train_data_parallel",
]


class SweepError(Exception):
    """The sweep cannot start (e.g. Ray requested but not installed); a one-line message."""


@dataclass(frozen=True)
class Task:
    """One seeded run of one experiment with one config.

    Attributes:
        experiment: the experiment (must be picklable by reference: a module-level class).
        config: its config dataclass instance.
        seed: the seed passed to ``experiment.run``.
    """

    experiment: Experiment
    config: Any
    seed: int

    @property
    def name(self) -> str:
        """The experiment's name."""
        return self.experiment.name

    @property
    def config_hash(self) -> str:
        """The store key's config part: config values and the experiment's code version."""
        return run_key(self.experiment, self.config)

    def label(self) -> str:
        """Short text for progress lines, e.g. ``bn-convergence seed 2``."""
        return f"{self.name} seed {self.seed}"


@dataclass
class Outcome:
    """What happened to one task in this sweep.

    Attributes:
        task: the task.
        status: ``finished`` or ``failed`` (ran now), or ``skipped`` (already finished, or
            running in another live sweep).
        seconds: the run's wall-clock seconds (ran now only).
        error: the error text of a failed run.
    """

    task: Task
    status: Literal["finished", "failed", "skipped"]
    seconds: float | None = None
    error: str | None = None


@dataclass
class SweepSummary:
    """All outcomes of a sweep, in task order."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of tasks with `status`."""
        return sum(o.status == status for o in self.outcomes)


def make_tasks(experiment: Experiment, config: Any, seeds: int | Sequence[int]) -> list[Task]:
    """Tasks for seeds ``0..seeds-1`` (or the given seeds) of one experiment and config."""
    seed_list = range(seeds) if isinstance(seeds, int) else seeds
    return [Task(experiment, config, int(s)) for s in seed_list]


# -------------------------------------------------------------------------------- worker side


def _init_worker() -> None:
    """One torch thread per worker: N workers on N cores instead of N x N threads."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    # Raises if already set, or once parallel work ran in this process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def execute_task(experiment: Experiment, config: Any, seed: int) -> dict[str, Any]:
    """Run one task where it is called (a pool worker, a Ray worker, or inline).

    Seeds Python's, NumPy's and torch's global generators with `seed` first, so an experiment
    that forgets to seed its own generators is still reproducible. Never raises for an error of
    the experiment: it comes back as text.

    Returns:
        ``{"result": RunResult | None, "error": str | None, "started", "finished", "seconds"}``.
    """
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    started = time.time()
    t0 = time.perf_counter()
    result: RunResult | None = None
    error: str | None = None
    try:
        result = experiment.run(config, seed)
        if not isinstance(result, RunResult):
            raise TypeError(
                f"{type(experiment).__name__}.run returned {type(result).__name__}, "
                "expected a RunResult"
            )
    except Exception:
        result, error = None, traceback.format_exc()
    seconds = time.perf_counter() - t0
    return {
        "result": result,
        "error": error,
        "started": started,
        "finished": time.time(),
        "seconds": seconds,
    }


# -------------------------------------------------------------------------------- driver side


def _pool_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    if start_method is not None:
        return multiprocessing.get_context(start_method)
    # forkserver: the server imports torch once and forks cheap workers from it; fork from a
    # driver that may hold threads is unsafe, spawn re-imports torch in every worker.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["normlab.lab.sweep", "torch"])
        return ctx
    return multiprocessing.get_context("spawn")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Progress:
    """Overall and per-experiment bars with a line per finished run (rich), or nothing."""

    def __init__(self, tasks: Sequence[Task], enabled: bool) -> None:
        self._bar: Any = None
        if not enabled or not tasks:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, log_path=False),
            transient=False,
        )
        self._overall = self._bar.add_task("all runs", total=len(tasks))
        self._per: dict[str, Any] = {}
        for task in tasks:
            if task.name not in self._per:
                n = sum(t.name == task.name for t in tasks)
                self._per[task.name] = self._bar.add_task(f"  {task.name}", total=n)
        self._bar.start()

    def done(self, outcome: Outcome) -> None:
        if self._bar is None:
            return
        task = outcome.task
        if outcome.status == "finished":
            mark = f"[green]done[/] {task.label()} ({outcome.seconds:.1f} s)"
        else:
            last = (outcome.error or "").strip().splitlines()[-1:] or [""]
            mark = f"[red]failed[/] {task.label()}: {last[0]}"
        self._bar.console.log(mark, markup=True, highlight=False)
        self._bar.advance(self._overall)
        self._bar.advance(self._per[task.name])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _record(store: Store, run_id: int, task: Task, payload: dict[str, Any]) -> Outcome:
    """Write one worker payload; a run another sweep re-claimed meanwhile is left to it."""
    times = {k: payload.get(k) for k in ("started", "seconds")}
    try:
        if payload.get("error") is None:
            store.finish(run_id, payload["result"], finished=payload.get("finished"), **times)
            return Outcome(task, "finished", seconds=payload.get("seconds"))
        store.fail(run_id, payload["error"], **times)
    except StoreError as exc:
        return Outcome(task, "skipped", error=str(exc))
    return Outcome(task, "failed", seconds=payload.get("seconds"), error=payload["error"])


def run_sweep(
    tasks: Sequence[Task],
    store: Store,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
    retry_failed: bool = True,
    start_method: str | None = None,
) -> SweepSummary:
    """Run the tasks that are not finished yet and record each outcome in `store`.

    Args:
        tasks: the tasks (e.g. from :func:`make_tasks`); duplicates are run once.
        store: the results store (its process is the only writer).
        workers: process-pool size (default: all cores the process may use); ``0`` runs the
            tasks one after another in this process (for debugging). With Ray: the number of
            CPUs of a local instance.
        ray_address: a Ray cluster address (``"auto"``, ``"ray://host:10001"``, ...) or
            ``"local"`` to start a local instance; None uses the process pool.
        progress: show rich progress bars and a line per finished run.
        retry_failed: redo runs that failed in an earlier sweep.
        start_method: the pool's multiprocessing start method; default ``forkserver`` where
            available (its server imports torch once), else ``spawn``. ``fork`` is safe only
            from a driver that has not run torch operations yet.

    Returns:
        The outcome of every task (skipped ones included), in task order.

    Raises:
        SweepError: bad `workers`, or Ray requested but not installed or not reachable.
        StoreError: the store cannot be written.
    """
    if workers is not None and (isinstance(workers, bool) or workers < 0):
        raise SweepError(f"workers={workers!r} must be a non-negative integer")
    if ray_address is not None:
        _import_ray()  # fail before claiming anything
    unique: dict[tuple[str, str, int], Task] = {}
    for task in tasks:
        unique.setdefault((task.name, task.config_hash, task.seed), task)
    outcomes: dict[int, Outcome] = {}
    claimed: list[tuple[int, int, Task]] = []  # (position, run id, task)
    for pos, task in enumerate(unique.values()):
        run_id = store.claim(
            task.name,
            task.config_hash,
            task.seed,
            config_to_dict(task.config),
            retry_failed=retry_failed,
        )
        if run_id is None:
            outcomes[pos] = Outcome(task, "skipped")
        else:
            claimed.append((pos, run_id, task))
    bar = _Progress([t for _, _, t in claimed], progress)
    pending_ids = {run_id for _, run_id, _ in claimed}

    def record(pos: int, run_id: int, task: Task, payload: dict[str, Any]) -> None:
        outcomes[pos] = _record(store, run_id, task, payload)
        pending_ids.discard(run_id)
        bar.done(outcomes[pos])

    try:
        if not claimed:
            pass
        elif ray_address is not None:
            _run_ray(claimed, ray_address, workers, record)
        elif workers == 0:
            for pos, run_id, task in claimed:
                record(pos, run_id, task, execute_task(task.experiment, task.config, task.seed))
        else:
            _run_pool(claimed, workers or _default_workers(), record, start_method)
    finally:
        bar.close()
        if pending_ids:  # interrupted: give the unstarted claims back for the next sweep
            store.release(sorted(pending_ids))
    return SweepSummary([outcomes[pos] for pos in sorted(outcomes)])


Record = Callable[[int, int, Task, dict[str, Any]], None]


def _run_pool(
    claimed: list[tuple[int, int, Task]], workers: int, record: Record, start_method: str | None
) -> None:
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(claimed)),
        mp_context=_pool_context(start_method),
        initializer=_init_worker,
    )
    interrupted = True
    try:
        futures: dict[Future[dict[str, Any]], tuple[int, int, Task]] = {
            pool.submit(execute_task, task.experiment, task.config, task.seed): (pos, rid, task)
            for pos, rid, task in claimed
        }
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                pos, run_id, task = futures.pop(future)
                try:
                    payload = future.result()
                except BrokenProcessPool:
                    payload = _lost("a worker process died (killed, or out of memory)")
                except Exception:  # e.g. the task or its result could not be pickled
                    payload = _lost(traceback.format_exc())
                record(pos, run_id, task, payload)
        interrupted = False
    finally:
        # On Ctrl-C or an error, do not wait for queued runs: their claims are released.
        pool.shutdown(wait=not interrupted, cancel_futures=True)


def _lost(error: str) -> dict[str, Any]:
    return {"result": None, "error": error, "started": None, "finished": None, "seconds": None}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SweepError(
            "--ray-address needs Ray, which is not installed: pip install 'normlab[ray]'"
        ) from None
    return ray


def _run_ray(
    claimed: list[tuple[int, int, Task]],
    address: str,
    workers: int | None,
    record: Record,
) -> None:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address == "local":
                ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(address=address, log_to_driver=True)
        except Exception as exc:
            raise SweepError(f"cannot connect to Ray at {address!r}: {exc}") from None
    try:
        remote = ray.remote(num_cpus=1)(_ray_task)
        refs = {
            remote.remote(task.experiment, task.config, task.seed): (pos, rid, task)
            for pos, rid, task in claimed
        }
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    pos, run_id, task = refs.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except Exception:  # worker died, or the task could not be deserialized
                        payload = _lost(traceback.format_exc())
                    record(pos, run_id, task, payload)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _ray_task(experiment: Experiment, config: Any, seed: int) -> dict[str, Any]:
    _init_worker()
    return execute_task(experiment, config, seed)


# ------------------------------------------------------------------ data-parallel training


@dataclass
class DataParallelResult:
    """What :func:`train_data_parallel` measured (on rank 0).

    Attributes:
        losses: training loss of each step, averaged over the ranks' local batches.
        test_accuracy: ``(step, accuracy)`` of rank 0's model in eval mode (its running
            statistics, as ``DistributedDataParallel`` would broadcast them from rank 0).
        state_dict: rank 0's final parameters and buffers.
    """

    losses: list[float]
    test_accuracy: list[tuple[int, float]]
    state_dict: dict[str, Any]


def _data_parallel_rank(
    rank: int,
    world_size: int,
    build_model: Callable[[], Any],
    data: tuple[Any, Any, Any, Any],
    batch_per_process: int,
    steps: int,
    lr: float,
    momentum: float,
    seed: int,
    sync_bn: bool,
    eval_every: int,
) -> DataParallelResult | None:
    """One rank's training loop; with ``world_size == 1`` it needs no process group."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from normlab.distributed import all_reduce_sum, is_distributed

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model()  # the same seed gives every rank the same initial weights
    if sync_bn:
        from normlab.nn.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    distributed = is_distributed()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    # Every rank draws the same global batch and takes its own slice of it.
    gen = torch.Generator().manual_seed(seed)
    global_batch = batch_per_process * world_size
    losses: list[float] = []
    accuracy: list[tuple[int, float]] = []

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        accuracy.append((step, acc))
        model.train()

    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_train), (global_batch,), generator=gen)
        mine = idx[rank * batch_per_process : (rank + 1) * batch_per_process]
        loss = nn.functional.cross_entropy(model(x_train[mine]), y_train[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        report = loss.detach().reshape(1).clone()
        if distributed:
            # The mean of the ranks' gradients is the gradient of the global batch's mean loss.
            for p in model.parameters():
                if p.grad is not None:
                    all_reduce_sum("train_data_parallel", p.grad).div_(world_size)
            all_reduce_sum("train_data_parallel", report).div_(world_size)
        opt.step()
        losses.append(report.item())
        if rank == 0 and eval_every and step % eval_every == 0:
            evaluate(step)
    if rank == 0 and (not accuracy or accuracy[-1][0] != steps):
        evaluate(steps)
    if distributed:
        dist.barrier()
    if rank != 0:
        return None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return DataParallelResult(losses, accuracy, state)


def train_data_parallel(
    build_model: Callable[[], Any],
    data: tuple[Any, Any, Any, Any],
    *,
    world_size: int,
    batch_per_process: int,
    steps: int,
    lr: float = 0.1,
    momentum: float = 0.0,
    seed: int = 0,
    sync_bn: bool = False,
    eval_every: int = 0,
    timeout: float = 600.0,
) -> DataParallelResult:
    """Data-parallel SGD over `world_size` local processes (gloo), for the batch-size experiment.

    Each step draws one global batch of ``world_size * batch_per_process`` examples (the same
    draw on every rank), each rank computes the loss of its slice, gradients are averaged over
    the ranks (what ``DistributedDataParallel`` does) and every rank takes the same SGD step.
    Batch norm layers therefore see ``batch_per_process`` examples ("BN per process"), unless
    ``sync_bn`` converts them to :class:`normlab.nn.sync_batchnorm.SyncBatchNorm`, whose
    statistics span the global batch; group or layer norm never depend on the split. The
    processes are started by :func:`normlab.distributed.spawn`.

    Args:
        build_model: a picklable zero-argument callable (module-level function or
            ``functools.partial`` of one) returning the model; called after
            ``torch.manual_seed(seed)`` so every rank starts from the same weights.
        data: ``(x_train, y_train, x_test, y_test)`` tensors (copied to every process).
        world_size: number of processes.
        batch_per_process: examples per process per step.
        steps: SGD steps.
        lr: learning rate.
        momentum: SGD momentum.
        seed: seeds the initial weights and the batch draws.
        sync_bn: convert batch norm layers to SyncBatchNorm.
        eval_every: evaluate rank 0's model on the test set every this many steps (0: only at
            the end).
        timeout: seconds for the whole run.

    Returns:
        Rank 0's losses, test accuracies and final state.

    Raises:
        ValueError: a non-positive size.
        RuntimeError, TimeoutError: from :func:`normlab.distributed.spawn`.
    """
    for key, value in (
        ("world_size", world_size),
        ("batch_per_process", batch_per_process),
        ("steps", steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train_data_parallel: {key}={value!r} must be a positive integer")
    from normlab.distributed import spawn

    args = (build_model, data, batch_per_process, steps, lr, momentum, seed, sync_bn, eval_every)
    results = spawn(_data_parallel_rank, world_size, *args, timeout=timeout)
    result = results[0]
    assert isinstance(result, DataParallelResult)
    return result
