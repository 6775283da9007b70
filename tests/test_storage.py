"""captioning.storage behaves the same on local paths and on s3:// (a real rclone S3 server on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Server, free_port

from captioning import storage
from captioning.storage import _s3

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3_env"])  # a parameter named after a fixture counts as using it (conftest)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder to work under: a local path, or `s3://<fresh bucket>` on the test server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return str(request.getfixturevalue(request.param))


@contextlib.contextmanager
def count_calls(client: Any, *operations: str) -> Iterator[Counter[str]]:
    """Count the S3 API calls `client` makes, per operation name, inside the `with` block."""
    counter: Counter[str] = Counter()

    def handler(model: Any, **_: Any) -> None:
        counter[model.name] += 1

    for op in operations:
        client.meta.events.register(f"before-call.s3.{op}", handler)
    try:
        yield counter
    finally:
        for op in operations:
            client.meta.events.unregister(f"before-call.s3.{op}", handler)


@pytest.fixture
def s3_calls(s3_env: str) -> Iterator[Counter[str]]:
    """Counter of the S3 operations made through the current client during the test."""
    operations = ("ListObjectsV2", "GetObject", "PutObject", "CreateMultipartUpload", "UploadPart")
    with count_calls(storage.s3_client(), *operations) as counter:
        yield counter


# --- URIs ------------------------------------------------------------------------------------------


def test_is_s3_and_split() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/data/x") and not storage.is_s3(Path("s3:/x"))
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.split_s3("s3://bucket/") == ("bucket", "")
    assert storage.split_s3("s3://bucket/dir/") == ("bucket", "dir/")
    for bad in ("s3://", "s3:///key", "s3:/bucket/key", "bucket/key", "/local/path", "s3:// b/k"):
        with pytest.raises(ValueError, match="s3"):
            storage.split_s3(bad)


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b", ("x",), "s3://b/x"),
        ("s3://b/", ("x", "y.json"), "s3://b/x/y.json"),
        ("s3://b/run/", ("/ckpt/", "last.pt"), "s3://b/run/ckpt/last.pt"),
        ("s3://b/run", ("a//b", "", "c"), "s3://b/run/a/b/c"),
        ("s3://b//odd//", ("k",), "s3://b/odd/k"),
        ("s3://b", ("dir/",), "s3://b/dir/"),
        ("s3://b/p", (), "s3://b/p"),
        ("/data", ("shards", "x.tar"), "/data/shards/x.tar"),
        ("/data/", ("/abs-looking", "x"), "/data/abs-looking/x"),
        ("rel", ("dir/",), "rel/dir/"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


def test_join_rejects_malformed_s3_base() -> None:
    with pytest.raises(ValueError):
        storage.join("s3://", "k")


def test_import_is_cheap() -> None:
    code = "import sys, captioning.storage; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    for heavy in ("boto3", "botocore", "webdataset", "torch", "prefect", "mlflow"):
        assert heavy not in loaded


# --- The same behaviour on both kinds ---------------------------------------------------------------


def test_bytes_text_json_roundtrip(root: str) -> None:
    uri = storage.join(root, "a", "b", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01hello")
    assert storage.exists(uri) and storage.exists(storage.join(root, "a"))
    assert storage.read_bytes(uri) == b"\x00\x01hello"
    assert storage.size(uri) == 7
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"

    text_uri = storage.join(root, "note.txt")
    storage.write_text(text_uri, "légende\n")
    assert storage.read_text(text_uri) == "légende\n"

    json_uri = storage.join(root, "meta.json")
    storage.write_json(json_uri, {"b": [1, 2], "a": {"z": 1, "y": "é"}})
    assert storage.read_json(json_uri) == {"a": {"y": "é", "z": 1}, "b": [1, 2]}
    # Stable bytes: sorted keys, fixed indent, trailing newline.
    expected = json.dumps({"a": {"y": "é", "z": 1}, "b": [1, 2]}, indent=2, ensure_ascii=False) + "\n"
    assert storage.read_text(json_uri) == expected


def test_missing_raises_file_not_found_naming_the_uri(root: str, tmp_path: Path) -> None:
    uri = storage.join(root, "nothing", "here.bin")
    assert not storage.exists(uri)
    calls = [
        lambda: storage.read_bytes(uri),
        lambda: storage.size(uri),
        lambda: storage.open_read(uri),
        lambda: storage.download_file(uri, tmp_path / "dl" / "x.bin"),
        lambda: storage.copy(uri, storage.join(root, "copy.bin")),
    ]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError, match=r"No such file|no such object") as info:
            call()
        assert uri in str(info.value)
        assert time.monotonic() - t0 < 5.0, "a missing key is not transient: no retries"
    assert not (tmp_path / "dl" / "x.bin").exists()
    assert not storage.exists(storage.join(root, "copy.bin"))
    storage.remove(uri)  # already gone: not an error


def test_list_remove_copy(root: str) -> None:
    names = [f"list/part-{i // 10}/item-{i:03d}.txt" for i in range(30)]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    storage.write_bytes(storage.join(root, "list", "other.json"), b"{}")
    storage.write_bytes(storage.join(root, "list2", "sibling.txt"), b"not under list/")

    listed = storage.list_files(storage.join(root, "list"), ".txt", _page_size=7)
    assert listed == sorted(storage.join(root, n) for n in names)
    assert storage.list_files(storage.join(root, "list/"), _page_size=7) == sorted(
        [*listed, storage.join(root, "list", "other.json")]
    )
    assert storage.list_files(storage.join(root, "absent")) == []

    src, dst = storage.join(root, names[0]), storage.join(root, "copies", "first.txt")
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == names[0].encode()
    storage.remove(src)
    assert not storage.exists(src) and storage.exists(dst)
    storage.remove(src)
    assert len(storage.list_files(storage.join(root, "list"), ".txt")) == 29


def test_s3_listing_paginates(s3_env: str, s3_calls: Counter[str]) -> None:
    for i in range(30):
        storage.write_bytes(storage.join(s3_env, "p", f"{i:02d}.bin"), b"x")
    s3_calls.clear()
    assert len(storage.list_files(storage.join(s3_env, "p"), _page_size=7)) == 30
    assert s3_calls["ListObjectsV2"] == 5  # 7 + 7 + 7 + 7 + 2


def test_upload_download_multipart(root: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data = os.urandom(12 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = storage.join(root, "up", "big.bin")
    calls: Counter[str] | None = request.getfixturevalue("s3_calls") if storage.is_s3(root) else None

    storage.upload_file(src, uri, chunk_mb=5)
    assert storage.size(uri) == len(data)
    if calls is not None:
        assert calls["CreateMultipartUpload"] == 1 and calls["UploadPart"] == 3  # 5 + 5 + 2 MiB

    dst = tmp_path / "dl" / "big.bin"
    storage.download_file(uri, dst, chunk_mb=5)
    assert dst.read_bytes() == data
    assert os.listdir(dst.parent) == ["big.bin"], "no temporary files left behind"


def test_open_read_streams_in_chunks(root: str, request: pytest.FixtureRequest) -> None:
    data = os.urandom(3 * MiB + 123)
    uri = storage.join(root, "stream.bin")
    storage.write_bytes(uri, data)
    calls: Counter[str] | None = request.getfixturevalue("s3_calls") if storage.is_s3(root) else None
    chunks = []
    with storage.open_read(uri) as f:
        while chunk := f.read(64 * 1024):
            assert len(chunk) <= 64 * 1024
            chunks.append(chunk)
    assert b"".join(chunks) == data
    if calls is not None:
        assert calls["GetObject"] == 1  # one streamed GET, no ranged downloads


def test_open_write_commits_on_close_only(root: str) -> None:
    uri = storage.join(root, "w", "out.bin")
    with storage.open_write(uri) as f:
        f.write(b"abc")
        f.write(b"def")
        assert not storage.exists(uri), "nothing is visible before close"
    assert storage.read_bytes(uri) == b"abcdef"

    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"partial")
        raise RuntimeError("writer failed")
    assert storage.read_bytes(uri) == b"abcdef", "a failed write leaves the old content"
    if not storage.is_s3(root):
        assert os.listdir(os.path.dirname(uri)) == ["out.bin"]


# --- s3 specifics -----------------------------------------------------------------------------------


def test_client_comes_from_environment_and_is_cached_per_pid(
    s3_env: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_server.endpoint_url  # boto3 read AWS_ENDPOINT_URL_S3
    assert storage.s3_client() is client
    explicit = storage.s3_client(endpoint_url="http://127.0.0.1:1")
    assert explicit is not client and explicit.meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.setattr(os, "getpid", lambda: -12345)  # as in a forked DataLoader worker
    assert storage.s3_client() is not client


def test_forked_worker_gets_its_own_client(s3_env: str) -> None:
    uri = storage.join(s3_env, "fork.bin")
    storage.write_bytes(uri, b"from the parent")  # the parent now holds a cached client
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as in a DataLoader worker: report, then leave without pytest's cleanup
        status = 1
        try:
            fresh = not _s3._clients
            os.write(write_fd, b"fresh:" + str(fresh).encode() + b":" + storage.read_bytes(uri))
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == b"fresh:True:from the parent"


def test_copy_between_local_and_s3(s3_env: str, tmp_path: Path) -> None:
    local = tmp_path / "a.bin"
    local.write_bytes(b"payload")
    storage.copy(local, storage.join(s3_env, "a.bin"))
    storage.copy(storage.join(s3_env, "a.bin"), storage.join(s3_env, "b.bin"))
    storage.copy(storage.join(s3_env, "b.bin"), tmp_path / "back" / "b.bin")
    assert (tmp_path / "back" / "b.bin").read_bytes() == b"payload"


def test_errors_that_retrying_cannot_fix_raise_at_once(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "s3://no-such-bucket-here/x.bin"
    for call in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"x")):
        with pytest.raises(FileNotFoundError, match="no such bucket") as info:
            call()
        assert uri in str(info.value)

    storage.write_bytes(storage.join(s3_env, "x.bin"), b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")
    t0 = time.monotonic()
    with pytest.raises(PermissionError) as denied:
        storage.read_bytes(storage.join(s3_env, "x.bin"))
    assert storage.join(s3_env, "x.bin") in str(denied.value)
    assert time.monotonic() - t0 < 5.0  # no retries: the backoff alone would take longer


def test_connection_errors_are_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_s3, "REQUEST_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(_s3, "OPERATION_ATTEMPTS", 3)
    monkeypatch.setattr(_s3, "OPERATION_BACKOFF_S", 0.01)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-for-a-dead-port")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-for-a-dead-port")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        count_calls(storage.s3_client(endpoint_url=endpoint), "PutObject") as attempts,
        pytest.raises(ConnectionError) as info,
    ):
        storage.write_bytes("s3://bucket/k.bin", b"x", endpoint_url=endpoint)
    assert "s3://bucket/k.bin" in str(info.value)
    assert attempts["PutObject"] == 3


def test_open_read_resumes_after_a_dropped_connection(s3_env: str, s3_calls: Counter[str]) -> None:
    data = os.urandom(2 * MiB)
    uri = storage.join(s3_env, "resume.bin")
    storage.write_bytes(uri, data)
    with storage.open_read(uri) as f:
        head = f.read(100_000)
        raw = f.raw  # type: ignore[attr-defined]
        raw._body.close()  # the server's connection goes away mid-object
        rest = f.read()
    assert head + rest == data
    assert s3_calls["GetObject"] == 2  # the first GET, then one ranged GET from the offset


def test_webdataset_streams_an_s3_shard(s3_env: str, tmp_path: Path) -> None:
    import webdataset as wds

    storage.register_webdataset_s3()
    storage.register_webdataset_s3()  # idempotent
    samples = [{"__key__": f"{i:04d}", "txt": f"caption {i}", "cls": str(i)} for i in range(5)]
    local = str(tmp_path / "x-000000.tar")
    with wds.TarWriter(local) as sink:
        for sample in samples:
            sink.write(sample)
    uploaded = storage.join(s3_env, "shards", "x-000000.tar")
    storage.upload_file(local, uploaded)
    # Writing through the handler too: TarWriter("s3://...") uploads when closed.
    written = storage.join(s3_env, "shards", "x-000001.tar")
    with wds.TarWriter(written) as sink:
        for sample in samples:
            sink.write(sample)

    dataset = wds.WebDataset([uploaded, written], shardshuffle=False).decode()
    got = [(s["__key__"], s["txt"], s["__url__"]) for s in dataset]
    assert got == [(s["__key__"], s["txt"], url) for url in (uploaded, written) for s in samples]


def test_upload_survives_a_server_restart_mid_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subprocess_tree: None
) -> None:
    """The server dies while parts are in flight (forgetting the multipart upload) and comes back
    after 1 s on the same port: the whole-upload retry starts over and the object is byte-identical."""
    data = os.urandom(30 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    with S3Server() as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        uri = storage.join(server.make_bucket("resilience"), "ckpt", "big.bin")
        client = storage.s3_client()
        mid_upload, server_down = threading.Event(), threading.Event()
        stack = contextlib.ExitStack()

        def pause_second_part(params: dict[str, Any], **_: Any) -> None:
            # Hold the upload between parts until the server is gone, so the stop is surely mid-upload.
            if params.get("PartNumber") == 2 and not mid_upload.is_set():
                mid_upload.set()
                server_down.wait(timeout=10)

        client.meta.events.register("provide-client-params.s3.UploadPart", pause_second_part)
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                storage.upload_file(src, uri, chunk_mb=5)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload)
        try:
            calls = stack.enter_context(count_calls(client, "CreateMultipartUpload"))
            thread.start()
            assert mid_upload.wait(timeout=10), "the upload never reached its second part"
            server.stop(kill=True)
            server_down.set()
            time.sleep(1.0)
            server.start()
            thread.join(timeout=60)
        finally:
            server_down.set()
            client.meta.events.unregister("provide-client-params.s3.UploadPart", pause_second_part)
            stack.close()
        assert not thread.is_alive()
        assert not errors, f"upload failed: {errors[0]!r}\n{server.log_text()[-2000:]}"
        assert calls["CreateMultipartUpload"] >= 2, "the restart should have cost a fresh upload"
        with storage.open_read(uri) as f:
            assert f.read() == data


def test_local_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (0600); the published file must be readable like open()'s."""

    target = tmp_path / "sizes.json"
    storage.write_json(str(target), {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


# --- sync_tree ----------------------------------------------------------------------------------------

TREE = {
    "manifest.json": b'{"config_hash": "k"}',
    "sizes.json": b'{"train": {}}',
    "train-000000.tar": b"t" * 3000,
    "train-000001.tar": b"",
    "sub/dir/deep.bin": b"deep",
}


def write_tree(base: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes(storage.join(base, *rel.split("/")), data)


def read_tree(base: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `base`."""
    prefix = base.rstrip("/") + "/"
    return {
        (uri[len(prefix) :] if uri.startswith(prefix) else os.path.relpath(uri, base)): storage.read_bytes(
            uri
        )
        for uri in storage.list_files(base)
    }


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(src, dst) of every storage.copy call, in order; the copies themselves still happen."""
    calls: list[tuple[str, str]] = []
    real_copy = storage.copy

    def spy(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append((str(src), str(dst)))
        real_copy(src, dst, **kwargs)

    monkeypatch.setattr(storage, "copy", spy)
    return calls


def test_sync_tree_copies_all_then_only_what_changed(
    root: str, tmp_path: Path, copies: list[tuple[str, str]]
) -> None:
    src = str(tmp_path / "shards")
    write_tree(src, TREE)
    dst = storage.join(root, "published", "shards")
    counts = storage.sync_tree(src, dst)
    assert counts == {"copied": 5, "skipped": 0, "bytes": sum(len(b) for b in TREE.values())}
    assert read_tree(dst) == TREE

    # Again: every file is there with its size; only the `last` files are copied again.
    copies.clear()
    assert storage.sync_tree(src, dst) == {"copied": 1, "skipped": 4, "bytes": len(TREE["manifest.json"])}
    assert [os.path.basename(s) for s, _ in copies] == ["manifest.json"]

    # A file whose size changed is copied; one of the same size is taken as the finished one.
    (tmp_path / "shards" / "train-000001.tar").write_bytes(b"now longer")
    (tmp_path / "shards" / "sub" / "dir" / "deep.bin").write_bytes(b"DEEP")
    copies.clear()
    assert storage.sync_tree(src, dst)["copied"] == 2
    assert sorted(os.path.basename(s) for s, _ in copies) == ["manifest.json", "train-000001.tar"]
    assert read_tree(dst) == {**TREE, "train-000001.tar": b"now longer"}


def test_sync_tree_copies_the_last_files_after_all_others(
    s3_env: str, tmp_path: Path, copies: list[tuple[str, str]]
) -> None:
    src = str(tmp_path / "out")
    files = {**TREE, "a/manifest.json": b"{}", "zz.tar": b"z", "a/sizes.json": b"{}"}
    write_tree(src, files)
    dst = storage.join(s3_env, "out")
    storage.sync_tree(src, dst, last=("sizes.json", "manifest.json"))
    names = [os.path.relpath(s, src) for s, _ in copies]
    assert sorted(names) == sorted(files)
    firsts = {"train-000000.tar", "train-000001.tar", "sub/dir/deep.bin", "zz.tar"}
    assert set(names[:4]) == firsts and set(names[4:]) == set(files) - firsts
    assert [d for _, d in copies] == [storage.join(dst, *n.split("/")) for n in names]


def test_sync_tree_between_s3_folders_and_back(s3_env: str, tmp_path: Path) -> None:
    write_tree(storage.join(s3_env, "a"), TREE)
    assert storage.sync_tree(storage.join(s3_env, "a") + "/", storage.join(s3_env, "b"))["copied"] == 5
    assert storage.sync_tree(storage.join(s3_env, "b"), str(tmp_path / "local"))["copied"] == 5
    assert read_tree(str(tmp_path / "local")) == TREE


def test_sync_tree_needs_files_to_copy(root: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for src in (str(empty), str(tmp_path / "missing"), storage.join(root, "nothing-here")):
        with pytest.raises(FileNotFoundError, match="nothing to copy"):
            storage.sync_tree(src, storage.join(root, "dst"))
    assert not storage.exists(storage.join(root, "dst"))
