"""Shard workers die with their parent (SIGKILL included); a re-run over finished shards changes nothing.

The process tests start real process trees (a killed build, a Dask cluster) and request
``subprocess_tree``; the re-run tests build in this process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from captioning import storage
from captioning.data.format import write_stable_json
from captioning.data.records import ImageRecord, read_karpathy
from captioning.data.shard_build import ShardError, plan_shard_build, write_shards
from captioning.data.shard_executors import die_with_parent, local_cluster
from captioning.data.sources import DirSource
from captioning.data.synthetic import generate_synthetic
from captioning.data.vocab import Vocab, build_vocab

PLAN: dict[str, Any] = dict(
    image_size=32,
    resize_mode="squash",
    jpeg_quality=90,
    samples_per_shard=4,
    max_image_pixels=178_956_970,
    max_caption_len=30,
    overlong="drop",
)
IN_PROCESS: dict[str, Any] = dict(num_procs=1, executor="process", dask_address=None, progress=False)
METADATA = ("sizes.json", "references.json", "vocab.json", "manifest.json")
_PR_GET_PDEATHSIG = 2


@dataclass(frozen=True)
class Data:
    root: Path
    json_path: Path
    records: list[ImageRecord]
    vocab: Vocab


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("raw")
    synth = generate_synthetic(root, num_train=8, num_val=4, num_test=4, image_size=32, make_archives=False)
    records = list(read_karpathy(synth.json_path).records)
    return Data(root, synth.json_path, records, build_vocab(records, min_word_freq=1))


@pytest.fixture
def umask_022() -> Iterator[int]:
    """A known umask, so "the usual mode" is 0644 whatever the test runner's is."""
    old = os.umask(0o022)
    try:
        yield 0o644
    finally:
        os.umask(old)


def _build(data: Data, out: Path, key: str = "key-1") -> Any:
    return write_shards(
        data.records, data.vocab, DirSource(data.root), str(out), config_hash=key, **PLAN, **IN_PROCESS
    )


def _snapshot(out: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (mtime ns, inode, size): an unchanged snapshot means no file was written or replaced."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size) for p in sorted(out.iterdir())}


# ------------------------------------------------------------------------------------ processes

_KILL_SCRIPT = """
import sys, time
from captioning.data.records import read_karpathy
from captioning.data.shard_build import write_shards
from captioning.data.sources import DirSource
from captioning.data.vocab import build_vocab


class SlowSource:
    # DirSource's bytes, slowly: the build is still writing shards when the test kills it.
    def __init__(self, root):
        self.inner = DirSource(root)

    def read(self, path):
        time.sleep(0.2)
        return self.inner.read(path)


if __name__ == "__main__":
    json_path, root, out, executor = sys.argv[1:5]
    records = read_karpathy(json_path).records
    write_shards(records, build_vocab(records, min_word_freq=1), SlowSource(root), out, image_size=32,
                 resize_mode="squash", jpeg_quality=90, samples_per_shard=1, max_image_pixels=178_956_970,
                 max_caption_len=30, overlong="drop", num_procs=2, executor=executor, dask_address=None,
                 progress=False)
"""


def _dead(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_dead(processes: list[psutil.Process], limit_s: float = 60.0) -> list[psutil.Process]:
    """Poll until every process is dead; return the survivors (the limit guards a hung test only)."""
    deadline = time.monotonic() + limit_s
    while (alive := [p for p in processes if not _dead(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("executor", ["process", "dask"])
def test_a_killed_build_leaves_no_worker_and_no_later_write(
    data: Data, tmp_path: Path, executor: str, subprocess_tree: None
) -> None:
    script = tmp_path / "build.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "out"
    args = [sys.executable, str(script), str(data.json_path), str(data.root), str(out), executor]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.stats.json")):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the build never finished a shard"
            time.sleep(0.02)
        tree = psutil.Process(process.pid).children(recursive=True)
        workers = [p for p in tree if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) >= 2, [p.cmdline() for p in tree]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        # The kernel sends the workers their death signal as the parent exits, before it can be
        # reaped: from here on nothing may change in the output, not even while they die.
        after_kill = _snapshot(out)
        survivors = _wait_dead(tree)
        assert not survivors, f"outlived their SIGKILLed parent: {[p.cmdline() for p in survivors]}"
        time.sleep(1.0)  # the workers had ~1.5 s of shards still queued: a survivor would write now
        assert _snapshot(out) == after_kill
        assert not (out / "manifest.json").exists()
        assert len(list(out.glob("*.stats.json"))) < len(data.records)  # the kill left work undone
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for p in tree:
            if not _dead(p):
                p.kill()


class PdeathsigProbe:
    """An image source that reports, as each image's "missing" detail, its process's death signal.

    Its first read in a process waits until ``expected`` processes have read (a rendezvous through
    files in ``meet``): a worker that started first cannot take every job before the other starts.
    """

    def __init__(self, meet: str, expected: int) -> None:
        self.meet, self.expected = meet, expected

    def read(self, rel_path: str) -> bytes:
        mark = Path(self.meet, str(os.getpid()))
        if not mark.exists():
            mark.touch()
            deadline = time.monotonic() + 60  # a hang guard: the assertion below then says what is wrong
            while len(list(Path(self.meet).iterdir())) < self.expected and time.monotonic() < deadline:
                time.sleep(0.02)
        raise FileNotFoundError(f"pid={os.getpid()} pdeathsig={_pdeathsig()}")


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


@LINUX_ONLY
def test_every_pool_worker_is_armed(data: Data, tmp_path: Path, subprocess_tree: None) -> None:
    run = {**IN_PROCESS, "num_procs": 2}
    meet = tmp_path / "meet"
    meet.mkdir()
    probe = PdeathsigProbe(str(meet), expected=2)
    manifest = write_shards(data.records, data.vocab, probe, str(tmp_path / "out"), **PLAN, **run)
    details = {f["detail"] for shard in manifest.stats.values() for f in shard.failed}
    assert len({detail.split()[0] for detail in details}) == 2  # both workers
    for detail in details:
        pid, signum = detail.split()
        assert pid != f"pid={os.getpid()}" and signum == f"pdeathsig={int(signal.SIGKILL)}", detail


@LINUX_ONLY
def test_every_local_cluster_worker_is_armed(subprocess_tree: None) -> None:
    """Asked on the thread the preload ran on (the kernel signals a process when any of its threads
    asked; Dask's task threads, started later, read 0 for themselves)."""
    from distributed import Client

    with local_cluster(2) as cluster, Client(cluster) as client:
        assert list(client.run(_pdeathsig).values()) == [int(signal.SIGKILL)] * 2


def test_a_child_whose_parent_is_already_gone_ends_itself(subprocess_tree: None) -> None:
    code = (
        "import multiprocessing\n"
        "class Gone:\n"
        "    pid = 1\n"
        "    def is_alive(self):\n"
        "        return False\n"
        "multiprocessing.parent_process = Gone\n"
        "from captioning.data.shard_executors import die_with_parent, local_cluster\n"
        "die_with_parent()\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout, done.stderr


def _pdeathsig() -> int:
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


def test_the_main_process_is_never_armed() -> None:
    before = _pdeathsig()
    assert die_with_parent() is False  # pytest has no multiprocessing parent: nothing to die with
    assert _pdeathsig() == before


class _CrashingSource(DirSource):
    """DirSource whose worker process dies (no exception, no cleanup) when it reads one image."""

    def __init__(self, root: Path, crash_on: str) -> None:
        super().__init__(root)
        self.crash_on = crash_on

    def read(self, rel_path: str) -> bytes:
        if rel_path == self.crash_on:
            os._exit(3)
        return super().read(rel_path)


def test_a_crashed_worker_fails_its_shards_by_name(data: Data, tmp_path: Path, subprocess_tree: None) -> None:
    first_train = next(r for r in data.records if r.split == "train")  # in train-000000
    source = _CrashingSource(data.root, first_train.path)
    run = {**IN_PROCESS, "num_procs": 2}
    with pytest.raises(ShardError, match=r"train-000000\.tar: BrokenProcessPool") as raised:
        write_shards(data.records, data.vocab, source, str(tmp_path), config_hash="k", **PLAN, **run)
    assert "re-run to resume" in str(raised.value)
    assert not (tmp_path / "manifest.json").exists()
    resumed = _build(data, tmp_path, key="k")
    assert resumed.num_built >= 1 and (tmp_path / "manifest.json").exists()


def test_bad_build_settings_are_refused_by_name(data: Data, tmp_path: Path) -> None:
    source = DirSource(data.root)
    for run, message in [
        ({**IN_PROCESS, "executor": "threads"}, "unknown executor 'threads'; valid: process, dask"),
        ({**IN_PROCESS, "num_procs": -1}, r"num_procs must be >= 0 \(0 = all cores\), got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_shards(data.records, data.vocab, source, str(tmp_path), **PLAN, **run)
    with pytest.raises(ValueError, match="samples_per_shard must be >= 1, got 0"):
        write_shards(
            data.records, data.vocab, source, str(tmp_path), **{**PLAN, "samples_per_shard": 0}, **IN_PROCESS
        )
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- re-runs


def test_a_rerun_over_finished_shards_touches_no_file(data: Data, tmp_path: Path) -> None:
    _build(data, tmp_path)
    before = _snapshot(tmp_path)
    again = _build(data, tmp_path)
    assert (again.num_built, again.num_skipped) == (0, 4)
    assert _snapshot(tmp_path) == before


def test_a_rerun_to_s3_writes_and_removes_nothing(
    data: Data, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"{s3_env}/rerun"
    write_shards(data.records, data.vocab, DirSource(data.root), out, config_hash="k", **PLAN, **IN_PROCESS)
    calls: list[str] = []
    for name in ("write_bytes", "upload_file", "remove"):
        monkeypatch.setattr(storage, name, lambda uri, *a, _name=name, **kw: calls.append(f"{_name} {uri}"))
    again = write_shards(
        data.records, data.vocab, DirSource(data.root), out, config_hash="k", **PLAN, **IN_PROCESS
    )
    assert again.num_built == 0 and calls == []


class _ManifestWatch:
    """DirSource that records, at each image read, whether the build's manifest.json is there."""

    def __init__(self, root: Path, out: Path) -> None:
        self.inner, self.out, self.seen = DirSource(root), out, set[bool]()

    def read(self, rel_path: str) -> bytes:
        self.seen.add((self.out / "manifest.json").exists())
        return self.inner.read(rel_path)


def test_a_missing_shard_is_rebuilt_under_the_kept_metadata(
    data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build(data, tmp_path)
    reference = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").unlink()
    before = _snapshot(tmp_path)
    removed: list[str] = []
    remove = storage.remove

    def spy(uri: str, **kwargs: Any) -> None:
        removed.append(str(uri))
        remove(uri, **kwargs)

    monkeypatch.setattr(storage, "remove", spy)
    watch = _ManifestWatch(data.root, tmp_path)
    manifest = write_shards(
        data.records, data.vocab, watch, str(tmp_path), config_hash="key-1", **PLAN, **IN_PROCESS
    )
    assert (manifest.num_built, manifest.num_skipped) == (1, 3)
    assert removed == [] and watch.seen == {True}  # a reader during the rebuild finds the manifest
    after = _snapshot(tmp_path)
    rebuilt = {"train-000001.tar", "train-000001.stats.json"}
    assert {k: v for k, v in after.items() if k not in rebuilt} == {
        k: v for k, v in before.items() if k not in rebuilt
    }  # every metadata file and every other shard: same inode, same mtime
    assert (tmp_path / "train-000001.tar").read_bytes() == reference


def test_a_build_of_another_key_removes_the_old_manifest_first(data: Data, tmp_path: Path) -> None:
    _build(data, tmp_path)
    source = DirSource(data.root)
    plan_shard_build(data.records, data.vocab, source, str(tmp_path), config_hash="key-1", **PLAN)
    assert (tmp_path / "manifest.json").exists()  # the same build: kept
    changed = {**PLAN, "jpeg_quality": 70}
    plan_shard_build(data.records, data.vocab, source, str(tmp_path), config_hash="key-1", **changed)
    assert not (tmp_path / "manifest.json").exists()  # other settings under the same key: removed
    for key in ("key-2", ""):  # another build, or one without a key (nothing says it is the same)
        _build(data, tmp_path)
        plan_shard_build(data.records, data.vocab, source, str(tmp_path), config_hash=key, **PLAN)
        assert not (tmp_path / "manifest.json").exists()


def test_metadata_is_replaced_atomically_only_when_its_bytes_change(tmp_path: Path, umask_022: int) -> None:
    path = tmp_path / "sizes.json"
    assert write_stable_json(str(path), {"train": {"a.tar": 1}}) is True
    first = path.stat()
    assert write_stable_json(str(path), {"train": {"a.tar": 1}}) is False
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (first.st_mtime_ns, first.st_ino)
    assert write_stable_json(str(path), {"train": {"a.tar": 2}}) is True
    assert path.stat().st_ino != first.st_ino  # a new file renamed over the old one
    assert path.read_text() == '{\n "train": {\n  "a.tar": 2\n }\n}\n'
    path.chmod(0o600)  # written by an older build: the mode is fixed, the bytes left alone
    mtime = path.stat().st_mtime_ns
    assert write_stable_json(str(path), {"train": {"a.tar": 2}}) is False
    assert stat.S_IMODE(path.stat().st_mode) == umask_022 and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.json"]


def test_every_output_has_the_same_mode(data: Data, tmp_path: Path, umask_022: int) -> None:
    out = tmp_path / "out"
    _build(data, out)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {umask_022}, modes  # vocab.json was 0600 (Vocab.save's mkstemp)
    data.vocab.save(tmp_path / "saved.json")
    assert stat.S_IMODE((tmp_path / "saved.json").stat().st_mode) == umask_022
    assert (tmp_path / "saved.json").read_bytes() == (out / "vocab.json").read_bytes()
    (out / "vocab.json").chmod(0o600)  # as an older build left it: a re-run fixes the mode only
    before = _snapshot(out)
    _build(data, out)
    assert stat.S_IMODE((out / "vocab.json").stat().st_mode) == umask_022 and _snapshot(out) == before
