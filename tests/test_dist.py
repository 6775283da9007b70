"""DistInfo from torchrun's environment, and the collectives at world size 1 and 2 (gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from s3server import free_port

from captioning.training import dist as D
from captioning.training.dist import DistInfo


def test_from_env_without_launcher_is_world_one() -> None:
    info = DistInfo.from_env({})
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0)
    assert info.is_main and not info.is_distributed


def test_from_env_reads_torchrun_variables() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    info = DistInfo.from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (
        5,
        8,
        1,
        4,
        1,
    )
    assert not info.is_main and info.is_distributed


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in D.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert DistInfo.from_env() == DistInfo()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DistInfo.from_env() == DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK not set"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank must be in"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "must be integers"),
    ],
)
def test_from_env_rejects_broken_environments(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistInfo.from_env(env)


def test_helpers_work_at_world_one_without_a_process_group() -> None:
    info = DistInfo()
    D.init_process_group(info)  # no-op
    assert not D.is_initialized()
    D.barrier(info)
    assert D.all_gather_object(info, {"a": 1}) == [{"a": 1}]
    assert D.broadcast_object(info, 3) == 3
    D.destroy_process_group(info)
    assert str(info.device) in ("cpu", "cuda:0")


def test_collectives_without_a_group_at_world_two_fail_clearly() -> None:
    with pytest.raises(RuntimeError, match="call init_process_group"):
        D.all_gather_object(DistInfo(rank=0, world_size=2, local_world_size=2), 1)


def gather_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    info = DistInfo.from_env()
    D.init_process_group(info, backend="gloo")
    try:
        gathered = D.all_gather_object(info, {"rank": info.rank, "square": info.rank**2})
        decision = D.broadcast_object(info, "stop" if info.is_main else "ignored")
        D.barrier(info)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"gathered": gathered, "decision": decision}))
    finally:
        D.destroy_process_group(info)


def test_two_process_gloo_all_gather(tmp_path: Path) -> None:
    mp.spawn(gather_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["gathered"] == [{"rank": 0, "square": 0}, {"rank": 1, "square": 1}]
        assert result["decision"] == "stop"
