"""torch.distributed helpers: exact cross-process moments, and a local multi-process launcher.

:func:`all_gather_moments` is the one collective SyncBatchNorm and precise-BN recalibration use to
combine per-process statistics: every rank contributes its (count, mean, M2) per channel, and
every rank folds the gathered summaries with Chan's merge in rank order, so all ranks end with the
same bits, whatever the per-rank counts (zero included).

:func:`spawn` starts ``world_size`` local processes joined in one process group (gloo over
loopback by default), runs a function on each and returns their results; tests and lab
experiments use it to exercise the multi-process paths on one machine.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from normlab.functional.moments import Moments

__all__ = ["all_gather_moments", "all_reduce_sum", "is_distributed", "spawn"]

_HOST = "127.0.0.1"


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialized and ``group`` (default: world) spans > 1 rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_error(op: str, what: str, group: Any, err: Exception) -> RuntimeError:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return RuntimeError(
        f"{op}: the {what} over the {world} ranks of the process group failed on rank {rank}: "
        f"a peer did not arrive within the process group's timeout, or left ({err}). Every rank "
        "must make the same collective calls in the same order (a rank with no samples still "
        "calls with an empty batch); raise the limit with init_process_group(timeout=...) or "
        "new_group(timeout=...)"
    )


def all_gather_moments(op: str, parts: Sequence[Moments], group: Any = None) -> list[Moments]:
    """Merge per-rank moments across ``group``; every rank receives the identical result.

    Each rank packs its summaries into one float64 vector ``[count, mean, m2]`` per entry, one
    all-gather exchanges them, and each rank folds the gathered copies with
    :func:`~normlab.functional.moments.merge_moments` in rank order:

    .. math::
        n = n_a + n_b, \\quad \\mu = \\mu_a + (\\mu_b - \\mu_a)\\,n_b/n, \\quad
        M_2 = M_{2,a} + M_{2,b} + (\\mu_b - \\mu_a)^2\\,n_a n_b / n

    exact for any counts, zero included. Every rank must pass entries of the same shapes.

    Args:
        op: caller's name, for error messages.
        parts: this rank's summaries (count, mean and m2 on one device, any statistics shape).
        group: the process group (default: world).

    Raises:
        RuntimeError: a peer did not join within the group's timeout or the collective failed.
    """
    if not parts:
        return []
    device = parts[0].mean.device
    flat = torch.cat(
        [
            torch.cat([p.count.reshape(1), p.mean.reshape(-1), p.m2.reshape(-1)]).to(
                device=device, dtype=torch.float64
            )
            for p in parts
        ]
    )
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, flat, group=group)
    except RuntimeError as err:
        raise _collective_error(op, "all-gather of statistics", group, err) from err
    merged = []
    offset = 0
    for p in parts:
        size = p.mean.numel()
        total: Moments | None = None
        for row in gathered:
            count, mean, m2 = row[offset : offset + 1 + 2 * size].split([1, size, size])
            part = Moments(count.reshape(()), mean.view_as(p.mean), m2.view_as(p.m2))
            total = part if total is None else total.merge(part)
        assert total is not None
        merged.append(total)
        offset += 1 + 2 * size
    return merged


def all_reduce_sum(op: str, tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place; returns it. Errors as in
    :func:`all_gather_moments`."""
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise _collective_error(op, "all-reduce", group, err) from err
    return tensor


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout: float,
    num_threads: int | None,
    args: tuple[Any, ...],
    conn: multiprocessing.connection.Connection,
) -> None:
    sent = False
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        limit = timedelta(seconds=pg_timeout)
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=limit)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=limit
        )
        try:
            payload = pickle.dumps(("ok", fn(rank, world_size, *args)))
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        # Report before leaving the group: peers blocked on this rank only fail (and report) once
        # it has gone, so the parent hears the root cause first.
        conn.send_bytes(payload)
        sent = True
        dist.destroy_process_group()
    except BaseException:
        if not sent:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()
        # Skip interpreter teardown, which takes seconds once torch is imported and would only
        # delay the parent's join.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _context(start_method: str | None) -> Any:
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Add to, rather than replace, a preload list the caller may have set (the stdlib has no
        # public getter, hence the guarded private read).
        server = getattr(multiprocessing.forkserver, "_forkserver", None)
        current = list(getattr(server, "_preload_modules", []))
        wanted = ["torch", "torch.distributed", "normlab.distributed"]
        ctx.set_forkserver_preload(current + [m for m in wanted if m not in current])
    return ctx


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    pg_timeout: float | None = None,
    num_threads: int | None = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes of one process group.

    The parent opens a ``TCPStore`` on a free loopback port (the OS picks it, so concurrent runs
    never collide) and starts the processes; each joins the default process group through that
    store before calling ``fn``; the group is destroyed after ``fn`` returns or raises. Results
    travel back pickled (tensors as copies); then the process ends with ``os._exit`` (no
    ``atexit`` handlers: interpreter teardown with torch loaded takes seconds).

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of processes (>= 1).
        *args: extra picklable arguments for ``fn``; ``multiprocessing`` events (from
            ``get_context("spawn")`` or ``"forkserver"``) work, for signalling between ranks.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank, chosen by ``fn``).
        timeout: seconds for the whole run; when it passes, every process is killed.
        pg_timeout: the process group's collective timeout in seconds (default: ``timeout``).
        num_threads: torch intra-op threads per process (1 keeps N processes from
            oversubscribing the cores); None leaves torch's default.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``. The forkserver
            imports torch once and forks every worker from it, so a launch costs milliseconds
            instead of one torch import per process (torch is added to the forkserver's preload
            list, which only matters before the server's first start).

    Returns:
        The results of ``fn``, indexed by rank.

    Raises:
        ValueError: ``world_size`` < 1.
        RuntimeError: a rank raised (its traceback is in the message) or died without a result;
            the other ranks are killed at once rather than left to wait for it.
        TimeoutError: not every rank finished within ``timeout``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"spawn: world_size={world_size!r} must be a positive integer")
    ctx = _context(start_method)
    deadline = time.monotonic() + timeout
    store = dist.TCPStore(
        _HOST,
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
    )
    procs: list[Any] = []
    pending: dict[Any, int] = {}
    results: dict[int, Any] = {}
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(
                    fn,
                    rank,
                    world_size,
                    store.port,
                    backend,
                    timeout if pg_timeout is None else pg_timeout,
                    num_threads,
                    args,
                    writer,
                ),
                name=f"normlab-rank{rank}",
            )
            proc.start()
            writer.close()  # the child holds the only writer: EOF here means it died
            procs.append(proc)
            pending[reader] = rank
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"spawn: ranks {sorted(pending.values())} of {world_size} did not finish "
                    f"within {timeout:g} s; all processes were killed"
                )
            errors = []
            ready = multiprocessing.connection.wait(list(pending), timeout=remaining)
            for reader in sorted(ready, key=pending.__getitem__):
                rank = pending.pop(reader)
                try:
                    status, value = pickle.loads(reader.recv_bytes())
                except EOFError:
                    procs[rank].join(timeout=5)
                    status, value = "died", procs[rank].exitcode
                finally:
                    reader.close()
                if status == "ok":
                    results[rank] = value
                elif status == "died":
                    errors.append(
                        f"spawn: rank {rank} of {world_size} exited with code {value} "
                        "without returning a result"
                    )
                else:
                    errors.append(f"spawn: rank {rank} of {world_size} raised:\n{value}")
            if errors:
                raise RuntimeError("\n".join(errors))
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 5.0))
    finally:
        for reader in pending:
            reader.close()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=5)
            with contextlib.suppress(ValueError):
                proc.close()
        del store
    return [results[r] for r in range(world_size)]
