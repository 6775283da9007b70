"""Run ``write_shard`` over many shard jobs at once: a local process pool or a Dask cluster.

    for job, result in run_shard_jobs(jobs, num_procs=0, executor="process", dask_address=None):
        ...   # result: the job's ShardStats, or the exception it raised (the other jobs go on)

``executor="process"``: a pool of ``num_procs`` processes (0 = all cores; 1 runs in this process),
started by spawn (never fork: the caller may hold threads and open handles), so each is a child of
this process and inherits its environment at submission time. ``"dask"``: a distributed Client at
``dask_address`` or, without one, a LocalCluster of ``num_procs`` single-threaded worker processes.
Results come back as each job finishes, in no particular order.

Workers started here die with this process however it ends, SIGKILL included: each asks the kernel
(PR_SET_PDEATHSIG, Linux) for SIGKILL when its parent goes, so none goes on writing shards into an
output its build has abandoned. Workers of a cluster at ``dask_address`` belong to that cluster.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Literal

from captioning.data.format import ShardStats
from captioning.data.shard_writer import ShardJob, write_shard

Executor = Literal["process", "dask"]
_PR_SET_PDEATHSIG = 1


def check_executor(executor: str, num_procs: int) -> None:
    if executor not in ("process", "dask"):
        raise ValueError(f"unknown executor {executor!r}; valid: process, dask")
    if num_procs < 0:
        raise ValueError(f"num_procs must be >= 0 (0 = all cores), got {num_procs}")


def run_shard_jobs(
    jobs: list[ShardJob], *, num_procs: int, executor: Executor, dask_address: str | None
) -> Iterator[tuple[ShardJob, ShardStats | BaseException]]:
    """Run write_shard over jobs; yield (job, stats or the exception it raised) as each finishes.

    ``num_procs`` 0 means all cores (the CPUs this process may run on).
    """
    if not jobs:
        return
    num_procs = _resolve_procs(num_procs)
    if executor == "dask":
        yield from _run_dask(jobs, num_procs=num_procs, dask_address=dask_address)
    elif num_procs == 1:
        for job in jobs:
            yield job, _call(write_shard, job)
    else:
        # spawn, not forkserver: a forkserver's children are the server's, which outlives a killed
        # caller (and is shared by the whole process); spawned workers are this process's own.
        with ProcessPoolExecutor(
            max_workers=min(num_procs, len(jobs)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
        ) as pool:
            futures = {pool.submit(write_shard, job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    error = future.exception()
                    yield futures[future], error if error is not None else future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def die_with_parent() -> bool:
    """In a multiprocessing child: have the kernel SIGKILL it when its parent dies (Linux).

    The pool initializer and the Dask workers' preload (``dask_setup``). A parent that died before
    the request was armed is caught by its sentinel (closed when the parent is gone), and this
    process ends at once. Returns True when armed; False in a main process or off Linux.
    The request belongs to the thread that makes it (one thread's signal kills the whole process)
    and fires when the parent's thread that started this process ends: a pool's submitting thread,
    alive for the whole ``run_shard_jobs`` call, or a LocalCluster's event-loop thread.
    """
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if not parent.is_alive():  # the parent died before the request was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def dask_setup(worker: Any) -> None:
    """Dask preload hook (``preload=["captioning.data.shard_executors"]``): workers die with their parent."""
    die_with_parent()


def _resolve_procs(num_procs: int) -> int:
    if num_procs > 0:
        return num_procs
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_dask(
    jobs: list[ShardJob], *, num_procs: int, dask_address: str | None
) -> Iterator[tuple[ShardJob, ShardStats | BaseException]]:
    from distributed import Client
    from distributed import as_completed as dask_as_completed

    cluster = None
    if dask_address is None:
        cluster = local_cluster(min(num_procs, len(jobs)))
        client = Client(cluster)
    else:
        client = Client(dask_address)
    try:
        run_id = uuid.uuid4().hex[:12]  # keys unique per build: a shared cluster must not reuse results
        futures = {
            client.submit(write_shard, job, key=f"write_shard-{job.name}-{run_id}", retries=0): job
            for job in jobs
        }
        for future in dask_as_completed(list(futures)):
            job = futures[future]
            try:
                yield job, future.result()
            except Exception as e:
                yield job, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def local_cluster(num_workers: int) -> Any:
    """A Dask LocalCluster of ``num_workers`` single-threaded worker processes that die with this one.

    The workers are this process's children; the preload (this module's ``dask_setup``) arms
    ``die_with_parent`` in each, next to any worker preloads the Dask config names.
    """
    import dask
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=num_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        preload=[*dask.config.get("distributed.worker.preload", []), __name__],
    )


def _call(fn: Callable[[ShardJob], ShardStats], job: ShardJob) -> ShardStats | BaseException:
    try:
        return fn(job)
    except Exception as e:
        return e
