"""The child process of ``metrics.score_captions``: pycocoevalcap's tokenizer and scorers, in-process.

    python -m captioning.evaluation.scorers REQUEST.json RESPONSE.json

reads ``{"captions": {id: str}, "references": {id: [str]}, "spice": bool}`` and writes
``{"result": {"overall": ..., "per_image": ...}}`` or ``{"error": {"scorer", "message"}}``; before
each scorer it prints ``STAGE_PREFIX + name`` on stderr, so the caller can say where a run hung.
It is only ever run as a child (``score_captions`` kills it, JVMs included, on timeout), and exits
without interpreter teardown: pycocoevalcap's finalizers (``Meteor.__del__``) can block at exit.

The tokenizer is pycocoevalcap's command line (same jar, flags and punctuation filter) run once
over candidates and references together (``-preserveLines`` tokenizes each line on its own), with
its exit status and line count checked, and its input in a temp folder instead of site-packages.
Java failures become a ``_ScorerFailed`` naming the scorer, with the tail of Java's stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from captioning.evaluation.metrics import JAVA_HINT, SPICE, STAGE_PREFIX, TAIL_CHARS

_MODULE = "captioning.evaluation.scorers"


class _ScorerFailed(Exception):
    def __init__(self, scorer: str, message: str) -> None:
        super().__init__(f"{scorer}: {message}")
        self.scorer, self.message = scorer, message


def _stage(name: str) -> None:
    print(f"{STAGE_PREFIX}{name}", file=sys.stderr, flush=True)


def _decode_tail(data: bytes | None) -> str:
    text = (data or b"").decode("utf-8", "replace").strip()
    return text[-TAIL_CHARS:]


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer on a list of sentences, one JVM for all, exit status checked.

    Every line break Python knows (``\\r``, ``\\v``, ``\\f``, ``\\u2028``, ...) becomes a space
    first: with ``-preserveLines`` the JVM splits lines on them too, and one extra line would shift
    every later caption onto the wrong image (pycocoevalcap only replaces ``\\n``).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(
        os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    )
    with tempfile.TemporaryDirectory(prefix="captioning-ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "wb") as f:
            f.write("\n".join(" ".join(s.splitlines()) for s in sentences).encode())
        cmd = [
            "java",
            "-cp",
            jar,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            path,
        ]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        except OSError as e:
            raise _ScorerFailed("PTBTokenizer", f"cannot start java ({e}); {JAVA_HINT}") from None
    if proc.returncode != 0:
        raise _ScorerFailed(
            "PTBTokenizer",
            f"java exited with status {proc.returncode}:\n{_decode_tail(proc.stderr)}",
        )
    lines = proc.stdout.decode().split("\n")
    if len(lines) == len(sentences) + 1 and not lines[-1]:
        lines.pop()  # the newline after the last line
    if len(lines) != len(sentences):
        raise _ScorerFailed(
            "PTBTokenizer",
            f"{len(lines)} lines back for {len(sentences)} sentences:\n{_decode_tail(proc.stderr)}",
        )
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punctuation)
        for line in lines[: len(sentences)]
    ]


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        meteor = Meteor()
    except OSError as e:
        raise _ScorerFailed("METEOR", f"cannot start java ({e}); {JAVA_HINT}") from None
    process = meteor.meteor_p
    try:
        score, scores = meteor.compute_score(gts, res)
        return float(score), [float(s) for s in scores]
    except Exception as e:
        process.kill()
        process.wait()
        stderr = _decode_tail(process.stderr.read() if process.stderr else None)
        status = process.returncode
        raise _ScorerFailed("METEOR", f"{type(e).__name__}: {e} (java status {status}):\n{stderr}") from None
    finally:
        process.kill()
        process.wait()
        # Meteor.__del__ takes the lock that compute_score leaves held when it raises; a fresh lock
        # lets it finish instead of deadlocking the interpreter's exit.
        meteor.lock = threading.Lock()


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    try:
        score, per_image = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as e:
        raise _ScorerFailed("SPICE", f"java exited with status {e.returncode}") from None
    return float(score), [float(s["All"]["f"]) for s in per_image]


def _score_in_process(
    captions: dict[int, str], references: dict[int, list[str]], spice: bool
) -> dict[str, Any]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = sorted(captions)  # every scorer lists per-image values in the order of gts' keys
    _stage("PTBTokenizer")
    sentences = [captions[i] for i in ids] + [r for i in ids for r in references[i]]
    tokens = iter(ptb_tokenize(sentences))
    res = {i: [next(tokens)] for i in ids}
    gts = {i: [next(tokens) for _ in references[i]] for i in ids}

    overall: dict[str, float] = {}
    per_image: dict[int, dict[str, float]] = {i: {} for i in ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        overall[name] = float(score)
        for i, s in zip(ids, scores, strict=True):
            per_image[i][name] = float(s)

    scorers: list[tuple[str, Callable[[], None]]] = []

    def bleu() -> None:
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            record(f"BLEU-{n + 1}", score[n], scores[n])

    scorers.append(("BLEU", bleu))
    scorers.append(("METEOR", lambda: record("METEOR", *_meteor(gts, res))))
    scorers.append(("ROUGE-L", lambda: record("ROUGE-L", *Rouge().compute_score(gts, res))))
    scorers.append(("CIDEr", lambda: record("CIDEr", *Cider().compute_score(gts, res))))
    if spice:
        scorers.append((SPICE, lambda: record(SPICE, *_spice(gts, res))))
    for name, run in scorers:
        _stage(name)
        try:
            run()
        except _ScorerFailed:
            raise
        except Exception as e:
            raise _ScorerFailed(name, f"{type(e).__name__}: {e}") from e
    return {"overall": overall, "per_image": {str(i): v for i, v in per_image.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """The child: read the request JSON, score, write ``{"result": ...}`` or ``{"error": ...}``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(f"usage: python -m {_MODULE} REQUEST.json RESPONSE.json", file=sys.stderr)
        return 2
    in_path, out_path = args
    with open(in_path, encoding="utf-8") as f:
        request = json.load(f)
    captions = {int(k): v for k, v in request["captions"].items()}
    references = {int(k): v for k, v in request["references"].items()}
    response: dict[str, Any]
    try:
        response = {"result": _score_in_process(captions, references, bool(request.get("spice")))}
        code = 0
    except _ScorerFailed as e:
        response = {"error": {"scorer": e.scorer, "message": e.message}}
        code = 1
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(response, f, allow_nan=True)
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: pycocoevalcap's finalizers (Meteor.__del__) can block at exit.
    os._exit(exit_code)
