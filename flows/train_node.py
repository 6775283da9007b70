"""One node of a multi-node training stage: this machine's torchrun agent, joined to the others at the
rendezvous the orchestrating train-sat run hosts.

train-sat with ``nnodes=N`` places N runs of this flow on the ``captioning-nodes`` work pool (one
worker per machine, each taking one job at a time: ``prefect worker start --pool captioning-nodes
--type process --limit 1``) and waits for them (``tasks.nodes``). Each runs
``torchrun --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID --rdzv-conf=is_host=0
--max-restarts=R -m captioning.train --stage STAGE ...``; torchrun gives the ranks, restarts the whole
group (every node) when a worker process fails, and training resumes from the stage's last
checkpoint; a node lost whole is replaced by the orchestrating task with a new run of this flow. Output streams into this run's logs; cancelling it (or its parent) stops the agent's
whole process tree. The stage's output folder must be one every node reaches (``s3://`` or a shared
file system): rank 0 writes checkpoints and the result there, and every rank resumes from it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger

from captioning.stages import Rendezvous, launch_stage
from flows import supervision


@flow(name="train-node", log_prints=False)
def train_node(
    recipe: str,
    stage: str,
    output: str,
    rendezvous: dict[str, Any],
    node: int = 0,
    overrides: Sequence[str] = (),
    init_from: str | None = None,
    parent_run_id: str | None = None,
    nproc_per_node: int | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run this node's torchrun agent for one stage launch; what it ran on and the stage's test scores."""
    supervision.stop_when_worker_dies()
    logger = get_run_logger()
    meeting = Rendezvous(**rendezvous)
    host = socket.gethostname()
    logger.info(
        "node %d of %d on %s: stage %s, rendezvous %s (id %s)",
        node,
        meeting.nnodes,
        host,
        stage,
        meeting.endpoint,
        meeting.run_id,
    )
    result = launch_stage(
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
        rendezvous=meeting,
    )
    return {"node": node, "host": host, "stage": stage, "test_scores": result.test_scores}
