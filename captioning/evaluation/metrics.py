"""The COCO caption metrics (pycocoevalcap), scored in a child process that cannot hang the caller.

    scores = score_captions({1: "a red circle"}, {1: ["a red circle", "one red circle on grey"]})
    scores.overall["CIDEr"], scores.per_image[1]["BLEU-4"], scores.skipped   # skipped: metric -> why
    write_coco_results("s3://bucket/run/val-results.json", captions)        # or a local path

The recipe is the COCO caption evaluation's (pycocoevalcap ``eval.py``): the Stanford PTBTokenizer
(Java; lower-cases, splits punctuation, which is then dropped) on candidates and references, then
BLEU-1..4, METEOR 1.5 (Java), ROUGE-L and CIDEr, and SPICE (Java) when asked for and installed.
``overall`` holds the corpus scores under the names in ``METRICS``; ``per_image`` each image's
sentence-level values of the same metrics.

Why a child process: the Java pieces can hang or die. METEOR is a long-lived JVM fed through pipes
(a dead one leaves ``readline`` waiting or gives ``float('')``), and pycocoevalcap ignores the
tokenizer's exit status (a crashed JVM would score empty strings: a silent zero). So
``score_captions`` runs ``python -m captioning.evaluation.scorers IN OUT`` (``scorers.py``: the
tokenizer and the scorers) in a session of its own with a wall-clock limit; on timeout the whole
process group, JVMs included, is killed (``captioning.launch.stop_process_group``). Every failure
is a ``ScoringError`` naming the scorer, with the tail of Java's and the child's stderr.

Cost on 2 CPU cores: about 5.5 s per call whatever the size of a small split, nearly all of it
METEOR's JVM loading its paraphrase table; the tokenizer's JVM starts in about 0.2 s.

SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use; this module
never downloads. Without them SPICE is reported in ``skipped`` and a warning is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

from captioning import storage
from captioning.launch import stop_process_group

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE = "SPICE"
# The Stanford CoreNLP jars pycocoevalcap's get_stanford_models() would download for SPICE.
SPICE_CORENLP_JARS: tuple[str, ...] = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_HINT = (
    "pycocoevalcap's PTB tokenizer, METEOR and SPICE run on the JVM: install a Java runtime (8 or "
    "newer), e.g. `apt-get install default-jre-headless` (`make setup` does this)"
)
_MODULE = "captioning.evaluation.scorers"  # what the child runs (``python -m``)
TAIL_CHARS = 4000  # stderr kept in an error message
STAGE_PREFIX = "captioning.evaluation.scorers: running "  # the child's progress lines on stderr


class ScoringError(RuntimeError):
    """A scorer could not produce scores: Java missing, crashed or timed out. The message names the
    scorer and carries the tail of its stderr."""


@dataclass
class Scores:
    """What ``score_captions`` returns."""

    overall: dict[str, float]  # METRICS (+ "SPICE") -> corpus score
    per_image: dict[int, dict[str, float]] = field(default_factory=dict)  # image id -> metric -> score
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed


def score_captions(
    captions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    *,
    spice: bool = False,
    timeout_s: float = 600.0,
) -> Scores:
    """Score ``captions`` (image id -> one caption) against ``references`` (image id -> strings).

    The two must have exactly the same image ids (ValueError names the missing and extra ones);
    empty captions are legal and score 0. Runs the scorers in a child process killed, Java
    included, after ``timeout_s`` seconds; raises ScoringError on timeout or any scorer failure.
    """
    captions, references = _validated(captions, references)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if shutil.which("java") is None:
        raise ScoringError(f"no `java` on PATH: {JAVA_HINT}")
    skipped: dict[str, str] = {}
    if spice:
        reason = spice_unavailable()
        if reason is not None:
            log.warning("SPICE skipped: %s", reason)
            skipped[SPICE] = reason
    request = {
        "captions": {str(k): v for k, v in captions.items()},
        "references": {str(k): v for k, v in references.items()},
        "spice": spice and SPICE not in skipped,
    }
    result = _run_child(request, timeout_s)
    return Scores(
        overall={k: float(v) for k, v in result["overall"].items()},
        per_image={int(k): {m: float(s) for m, s in v.items()} for k, v in result["per_image"].items()},
        skipped=skipped,
    )


def _validated(
    captions: Mapping[int, str], references: Mapping[int, Sequence[str]]
) -> tuple[dict[int, str], dict[int, list[str]]]:
    for name, mapping in (("captions", captions), ("references", references)):
        bad = [k for k in mapping if isinstance(k, bool) or not isinstance(k, int)]
        if bad:
            raise ValueError(f"{name}: image ids must be integers, got {bad[:5]!r}")
    missing = sorted(set(references) - set(captions))
    extra = sorted(set(captions) - set(references))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no caption for {len(missing)} image id(s) with references: {_ids(missing)}")
        if extra:
            parts.append(f"no references for {len(extra)} captioned image id(s): {_ids(extra)}")
        raise ValueError("captions and references must have the same image ids; " + "; ".join(parts))
    if not captions:
        raise ValueError("nothing to score: no captions")
    out_captions: dict[int, str] = {}
    out_references: dict[int, list[str]] = {}
    for image_id in sorted(captions):
        caption, refs = captions[image_id], references[image_id]
        if not isinstance(caption, str):
            raise ValueError(f"caption of image {image_id} must be a string, got {type(caption).__name__}")
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of image {image_id} must be a list of strings, got {refs!r:.80}")
        if not refs:
            raise ValueError(f"image {image_id} has no references")
        out_captions[image_id] = caption
        out_references[image_id] = list(refs)
    return out_captions, out_references


def _ids(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _package_dir(*parts: str) -> str:
    spec = find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ScoringError("pycocoevalcap is not installed (it is a dependency of this project)")
    return os.path.join(next(iter(spec.submodule_search_locations)), *parts)


def _spice_lib_dir() -> str:
    """Where pycocoevalcap's get_stanford_models() puts the CoreNLP jars."""
    return _package_dir("spice", "lib")


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here (its CoreNLP jars are missing), or None when it can."""
    lib = _spice_lib_dir()
    missing = [jar for jar in SPICE_CORENLP_JARS if not os.path.exists(os.path.join(lib, jar))]
    if not missing:
        return None
    return (
        f"Stanford CoreNLP jars missing from {lib}: {', '.join(missing)}; pycocoevalcap would download "
        "them on first use (a few hundred MB from nlp.stanford.edu), which is not attempted here: run "
        "`python -m pycocoevalcap.spice.get_stanford_models` where there is network access"
    )


def _run_child(request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run the scorers in ``python -m captioning.evaluation.scorers`` and return its result."""
    with tempfile.TemporaryDirectory(prefix="captioning-metrics-") as tmp:
        in_path, out_path, log_path = (os.path.join(tmp, n) for n in ("in.json", "out.json", "child.log"))
        with open(in_path, "w", encoding="utf-8") as f:
            json.dump(request, f, ensure_ascii=False)
        env = dict(os.environ)
        # The child imports this package from where the caller found it, installed or not.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        started = time.monotonic()
        with open(log_path, "wb") as child_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", _MODULE, in_path, out_path],
                stdin=subprocess.DEVNULL,
                stdout=child_log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: the stopper reaches every JVM
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stop_process_group(proc.pid, (), reap=proc)  # SIGKILL at once: nothing to save
                tail = _tail(log_path)
                raise ScoringError(
                    f"scoring timed out after {timeout_s:g} s during {_last_stage(tail)}; "
                    f"killed its process group (Java included){_format_tail(tail)}"
                ) from None
            finally:
                stop_process_group(proc.pid, (), reap=proc)  # leftovers (a METEOR JVM), and on Ctrl-C
        tail = _tail(log_path)
        response: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError), open(out_path, encoding="utf-8") as f:
            response = json.load(f)
        if response is not None and "error" in response:
            error = response["error"]
            raise ScoringError(f"{error['scorer']} failed: {error['message']}{_format_tail(tail)}")
        if code != 0 or response is None or "result" not in response:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise ScoringError(
                f"the scoring process {how} during {_last_stage(tail)} without a result{_format_tail(tail)}"
            )
        log.debug("scored %d images in %.1f s", len(request["captions"]), time.monotonic() - started)
        result: dict[str, Any] = response["result"]
        return result


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_CHARS))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _format_tail(tail: str) -> str:
    return f"\n--- stderr (last lines) ---\n{tail}" if tail else ""


def _last_stage(tail: str) -> str:
    stages = [line[len(STAGE_PREFIX) :] for line in tail.splitlines() if line.startswith(STAGE_PREFIX)]
    return stages[-1].strip() if stages else "start-up, before any scorer"


# --------------------------------------------------------------------------------------------------
# COCO results files
# --------------------------------------------------------------------------------------------------


def write_coco_results(path_or_uri: str | os.PathLike[str], captions: Mapping[int, str]) -> None:
    """Write ``[{"image_id": int, "caption": str}, ...]`` sorted by image id (local path or s3://)."""
    results = [{"image_id": int(image_id), "caption": captions[image_id]} for image_id in sorted(captions)]
    storage.write_json(path_or_uri, results)


def read_coco_results(path_or_uri: str | os.PathLike[str]) -> dict[int, str]:
    """Read a COCO results file back into image id -> caption; raises ValueError on a bad file."""
    data = storage.read_json(path_or_uri)
    if not isinstance(data, list):
        raise ValueError(f"{path_or_uri}: a COCO results file is a list, got {type(data).__name__}")
    captions: dict[int, str] = {}
    for i, entry in enumerate(data):
        if (
            not isinstance(entry, dict)
            or isinstance(entry.get("image_id"), bool)
            or not isinstance(entry.get("image_id"), int)
            or not isinstance(entry.get("caption"), str)
        ):
            raise ValueError(
                f"{path_or_uri}: entry {i} is not {{'image_id': int, 'caption': str}}: {entry!r}"
            )
        if entry["image_id"] in captions:
            raise ValueError(f"{path_or_uri}: image {entry['image_id']} appears twice")
        captions[entry["image_id"]] = entry["caption"]
    return captions
