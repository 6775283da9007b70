"""Run ``write_shard`` over many shard jobs at once: a local process pool or a Dask cluster.

    for job, result in run_shard_jobs(jobs, num_procs=0, executor="process", dask_address=None):
        ...   # result: the job's ShardStats, or the exception it raised (the other jobs go on)

``executor="process"``: a pool of ``num_procs`` processes (0 = all cores; 1 runs in this process),
started by forkserver (or spawn), never fork, each adopting the caller's environment.
``"dask"``: a distributed Client at ``dask_address`` or, without one, a LocalCluster of ``num_procs``
single-threaded workers. Results come back as each job finishes, in no particular order.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Literal

from captioning.data.format import ShardStats
from captioning.data.shard_writer import ShardJob, write_shard

Executor = Literal["process", "dask"]


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
        methods = multiprocessing.get_all_start_methods()
        # Never fork: the parent may hold threads (tqdm, boto3, Dask) and open handles.
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        # A forkserver outlives this call and keeps the environment it started with; hand the
        # workers today's (S3 credentials and endpoint set in-process by a caller or a test).
        with ProcessPoolExecutor(
            max_workers=min(num_procs, len(jobs)),
            mp_context=context,
            initializer=_adopt_environment,
            initargs=(dict(os.environ),),
        ) as pool:
            futures = {pool.submit(write_shard, job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    error = future.exception()
                    yield futures[future], error if error is not None else future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _resolve_procs(num_procs: int) -> int:
    if num_procs > 0:
        return num_procs
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _adopt_environment(environ: dict[str, str]) -> None:
    """Pool initializer: make the worker's environment the parent's at submission time."""
    os.environ.clear()
    os.environ.update(environ)


def _run_dask(
    jobs: list[ShardJob], *, num_procs: int, dask_address: str | None
) -> Iterator[tuple[ShardJob, ShardStats | BaseException]]:
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_as_completed

    cluster = None
    if dask_address is None:
        cluster = LocalCluster(
            n_workers=min(num_procs, len(jobs)), threads_per_worker=1, processes=True, dashboard_address=None
        )
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


def _call(fn: Callable[[ShardJob], ShardStats], job: ShardJob) -> ShardStats | BaseException:
    try:
        return fn(job)
    except Exception as e:
        return e
