"""Training tasks: one stage as a torchrun process tree, under the GPU concurrency limit.

The task holds a slot of the global concurrency limit ``gpu`` (created with 1 slot when missing)
for as long as torchrun runs, so two training runs never share one node's GPUs; more GPU sets on
the work pool's machines = more slots (`prefect gcl update gpu --limit N`). Output lines stream
into the task's Prefect logs; cancelling the flow run, or the time limit, kills the whole tree.

With ``nnodes`` > 1 the stage runs as that many node jobs on the ``captioning-nodes`` pool
(``tasks.nodes``), holding ``nnodes`` slots for the whole launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from captioning.stages import launch_stage
from captioning.training.stage import StageResult
from tasks.nodes import NODE_DEPLOYMENT, run_nodes

GPU_LIMIT = "gpu"


def ensure_limit(name: str, slots: int = 1, needed: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots unless it exists; a limit
    smaller than ``needed`` (a multi-node stage's nodes) is an error now, not a wait forever."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            limit = slots
    if limit < needed:
        raise ValueError(
            f"a stage on {needed} nodes holds {needed} slots of the {name!r} concurrency limit, which has "
            f"{limit}: raise it to the GPU sets (nodes) the pool has (prefect gcl update {name} --limit {needed})"
        )


@task(name="train-stage", task_run_name="train-{stage}", cache_policy=NO_CACHE)
def train_stage(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    init_from: str | None = None,
    parent_run_id: str | None = None,
    nproc_per_node: int | None = None,
    timeout_s: float | None = None,
    gpu_limit: str = GPU_LIMIT,
    nnodes: int = 1,
    node_deployment: str = NODE_DEPLOYMENT,
    rdzv_host: str | None = None,
) -> StageResult:
    """torchrun -m captioning.train --stage STAGE (``captioning.stages.launch_stage``); returns its
    result: best checkpoint and test scores. A finished stage is returned without a launch. With
    ``nnodes`` > 1: ``nnodes`` train-node jobs (``tasks.nodes.run_nodes``)."""
    logger = get_run_logger()
    ensure_limit(gpu_limit, needed=nnodes)
    with concurrency(gpu_limit, occupy=nnodes, strict=True, raise_on_lease_renewal_failure=False):
        if nnodes > 1:
            result: StageResult = run_nodes(
                recipe,
                stage,
                output,
                overrides,
                nnodes=nnodes,
                nproc_per_node=nproc_per_node,
                init_from=init_from,
                parent_run_id=parent_run_id,
                timeout_s=timeout_s,
                deployment=node_deployment,
                rdzv_host=rdzv_host,
                logger=logger,
            )
            return result
        return launch_stage(
            recipe,
            stage,
            output,
            overrides,
            init_from=init_from,
            parent_run_id=parent_run_id,
            tracker="mlflow",
            nproc_per_node=nproc_per_node,
            timeout_s=timeout_s,
            on_line=logger.info,
        )
