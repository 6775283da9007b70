"""The Prefect tasks as plain functions (``.fn()``): each is a few lines around one library call, so
these check the wiring (which call, which settings) without a Prefect server. The flows themselves
run against a real server in test_flows.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_caption_cli import write_tiny_checkpoint

from captioning.config import Config, load_config
from captioning.data.vocab import Vocab
from captioning.training.stage import StageResult
from tasks import data, tracking, training


def small_config(root: Path) -> Config:
    return load_config(
        "demo",
        [
            f"--data.raw_dir={root / 'raw'}",
            f"--data.shard_dir={root / 'shards'}",
            "--data.synthetic.num_train=12",
            "--data.synthetic.num_val=4",
            "--data.synthetic.num_test=4",
            "--data.synthetic.image_size=32",
            "--data.shards.image_size=32",
            "--data.shards.samples_per_shard=6",
            "--data.shards.num_procs=1",
        ],
    )


def test_data_tasks_build_shards_as_the_flow_wires_them(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    raw = data.download_dataset.fn(cfg)
    assert raw.karpathy_json.is_file()
    dataset = data.read_records.fn(raw, cfg)
    assert len(dataset.split("train")) == 12
    vocab = data.build_vocabulary.fn(dataset, cfg)
    key, manifest = data.check_shards.fn(cfg, raw, vocab)
    assert manifest is None and len(key) == 64
    plan = data.plan_shards.fn(dataset, vocab, raw, cfg, key)
    results = [data.write_shards.fn(group, cfg) for group in plan.groups(2)]
    built = data.finish_shards.fn(plan, vocab, results)
    assert built.config_hash == key and built.num_built == len(plan.jobs) == 4  # train 2, val 1, test 1
    assert data.check_shards.fn(cfg, raw, vocab) == (key, built.to_json())
    published = data.publish_shards.fn(cfg.data.shard_dir, str(tmp_path / "published"))
    assert published["copied"] == len(list((tmp_path / "shards").iterdir()))
    assert (tmp_path / "published" / "manifest.json").read_bytes() == (
        tmp_path / "shards" / "manifest.json"
    ).read_bytes()


def test_vocabulary_of_checkpoint(tmp_path: Path) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "model.pt")
    vocab = data.vocabulary_of_checkpoint.fn(checkpoint)
    assert isinstance(vocab, Vocab) and len(vocab) > 4


def test_fetch_model_passes_checkpoint_paths_through(tmp_path: Path) -> None:
    from captioning.registry import RegistryError

    checkpoint = str(tmp_path / "best.pt")
    Path(checkpoint).write_bytes(b"a checkpoint")
    resolved = tracking.fetch_model.fn(checkpoint, None)  # models:/ and runs:/ kinds: test_serving.py
    assert resolved.checkpoint == checkpoint and resolved.label == checkpoint
    assert resolved.name is None and resolved.version is None and resolved.run_id is None
    with pytest.raises(RegistryError, match="no such checkpoint"):
        tracking.fetch_model.fn(str(tmp_path / "gone.pt"), None)


class FakeLogger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)


def test_train_stage_holds_the_gpu_slot_while_the_stage_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Any] = []
    logger = FakeLogger()

    @contextlib.contextmanager
    def concurrency(name: str, **kwargs: Any) -> Iterator[None]:
        events.append(("acquire", name, kwargs["occupy"]))
        yield
        events.append(("release", name))

    def launch_stage(recipe: str, stage: str, output: str, overrides: Any, **kwargs: Any) -> StageResult:
        events.append(("launch", recipe, stage, output, list(overrides), kwargs))
        kwargs["on_line"]("a torchrun line")
        return "result"  # type: ignore[return-value]

    monkeypatch.setattr(training, "get_run_logger", lambda: logger)
    monkeypatch.setattr(
        training, "ensure_limit", lambda name, needed: events.append(("ensure", name, needed))
    )
    monkeypatch.setattr(training, "concurrency", concurrency)
    monkeypatch.setattr(training, "launch_stage", launch_stage)

    def run_nodes(*args: Any, **kwargs: Any) -> str:
        events.append(("nodes", args, kwargs))
        return "nodes"

    monkeypatch.setattr(training, "run_nodes", run_nodes)
    got = training.train_stage.fn(
        "demo",
        "xe",
        "runs/r1",
        ["--train.xe.epochs=1"],
        init_from="a.pt",
        parent_run_id="p",
        gpu_limit="gpu-a",
    )
    assert got == "result"
    assert events[0] == ("ensure", "gpu-a", 1) and events[1] == ("acquire", "gpu-a", 1)
    assert events[-1] == ("release", "gpu-a")
    _, recipe, stage, output, overrides, kwargs = events[2]
    assert (recipe, stage, output, overrides) == ("demo", "xe", "runs/r1", ["--train.xe.epochs=1"])
    assert kwargs["init_from"] == "a.pt" and kwargs["parent_run_id"] == "p" and kwargs["tracker"] == "mlflow"
    assert logger.lines == ["a torchrun line"]  # torchrun's output goes into the task's log

    # Two nodes: node jobs (tasks.nodes) under two slots, no local launch.
    events.clear()
    assert training.train_stage.fn("demo", "xe", "runs/r1", nnodes=2, gpu_limit="gpu-a") == "nodes"
    assert [e[:3] for e in events[:2]] == [("ensure", "gpu-a", 2), ("acquire", "gpu-a", 2)]
    assert events[2][0] == "nodes" and events[2][2]["nnodes"] == 2 and events[-1] == ("release", "gpu-a")


def test_a_gpu_limit_smaller_than_the_nodes_is_an_error_not_a_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read_global_concurrency_limit_by_name(self, name: str) -> Any:
            return type("Limit", (), {"limit": 1})()

    monkeypatch.setattr(training, "get_client", lambda sync_client: Client())
    training.ensure_limit("gpu", needed=1)
    with pytest.raises(ValueError, match=r"holds 2 slots of the 'gpu' concurrency limit, which has 1"):
        training.ensure_limit("gpu", needed=2)


def test_tracking_tasks_against_a_real_server(
    tmp_path: Path, mlflow_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from captioning import storage
    from captioning.registry import RegistryError

    shard_dir = tmp_path / "shards"
    storage.write_json(str(shard_dir / "manifest.json"), {"config_hash": "k"})
    storage.write_json(str(shard_dir / "vocab.json"), {"words": ["<pad>"]})
    name = f"tasks-{tmp_path.name}"
    cfg = load_config(
        "demo",
        [
            f"--data.shard_dir={shard_dir}",
            f"--tracking.tracking_uri={mlflow_server.url}",
            f"--tracking.experiment={name}",
            f"--tracking.registered_model={name}",
        ],
    )
    run_id = tracking.start_tracking_run.fn(cfg, ["xe"], "r1", 2, {"orchestrator": "prefect"})
    evaluation = tracking.log_evaluation.fn(
        {"CIDEr": 1.25}, cfg, "evaluate-test", {"split": "test"}, None, run_id
    )
    tracking.end_tracking_run.fn(
        run_id, "FINISHED", {"test_CIDEr": 1.5}, mlflow_server.url, {"best_stage": "xe"}
    )
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["test_CIDEr"] == 1.5
    assert parent.data.tags["best_stage"] == "xe" and parent.data.tags["orchestrator"] == "prefect"
    child = client.get_run(evaluation)
    assert child.data.tags["mlflow.parentRunId"] == run_id and child.data.metrics["CIDEr"] == 1.25
    with pytest.raises(RegistryError, match="has no champion"):
        tracking.fetch_champion.fn(name, mlflow_server.url)


def test_registry_errors_are_not_retried_other_failures_are() -> None:
    from prefect.states import Failed

    from captioning.registry import RegistryError
    from captioning.tracking import TrackingUnavailable

    for task in (tracking.fetch_champion, tracking.fetch_model, tracking.register_model):
        condition = task.retry_condition_fn
        assert condition is not None and task.retries >= 2
        run: Any = None  # the condition looks at the state only
        assert not condition(task, run, Failed(data=RegistryError("no champion")))
        assert condition(task, run, Failed(data=TrackingUnavailable("server down")))


def test_a_node_is_lost_when_its_run_crashed_or_its_agent_was_killed_not_when_training_failed() -> None:
    from prefect.client.schemas.objects import State, StateType

    from tasks import nodes

    def node(kind: StateType, message: str) -> Any:
        slot = nodes._Node(1)
        slot.run = type("Run", (), {"state": State(type=kind, message=message)})()
        return slot

    killed = "Flow run encountered an exception: LaunchError: training stage xe failed (exit -9); running it"
    used_up = "Flow run encountered an exception: LaunchError: training stage xe failed (exit 1); running it"
    assert nodes._lost(node(StateType.CRASHED, "Flow run infrastructure exited with non-zero status code -9"))
    assert nodes._lost(node(StateType.FAILED, killed))
    assert not nodes._lost(node(StateType.FAILED, used_up))
    assert not nodes._lost(node(StateType.CANCELLED, "cancelled"))
    # torchrun's lines that say why, and not Prefect's own.
    lines = [
        "E1206 19:00:38.154000 11536 api.py:1002] failed (exitcode: -9) local_rank: 0 (pid: 11594) of binary: x",
        "  exitcode  : -9 (pid: 7574)",
        "  traceback : Signal 9 (SIGKILL) received by PID 7574",
        "[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:7058.",
        "Encountered exception during execution: LaunchError('training stage xe failed (exit 1)')",
        "Finished in state Failed('Flow run encountered an exception')",
    ]
    assert [bool(nodes.CAUSE.search(line)) for line in lines] == [True, True, True, True, False, False]
