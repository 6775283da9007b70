"""score_captions against hand-checked values and pycocoevalcap's own scorers run in-process, its
input checks, and what it does when Java is missing, crashes or hangs (fake ``java`` scripts on PATH).

A real scoring call costs about 5.5 s on 2 cores (METEOR's JVM loads its paraphrase table), so the
real scores are computed once per module.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest

from captioning import storage
from captioning.evaluation import metrics, scorers
from captioning.evaluation.metrics import (
    METRICS,
    Scores,
    ScoringError,
    read_coco_results,
    score_captions,
    write_coco_results,
)

CAPTIONS = {
    1: "A man riding a horse.",  # the first reference, up to case and punctuation
    2: "",  # empty: legal, scores 0
    3: "a red circle",  # 2 of 3 words right, same length as its only reference
    4: "Two dogs, playing in the snow!",
    5: "a cat sitting on a wooden table",
}
REFERENCES = {
    1: ["a man riding a horse", "A person, on a brown horse."],
    2: ["two dogs play"],
    3: ["a red square"],
    4: ["two dogs play in the snow", "Dogs running through snow.", "a pair of dogs in the snow"],
    5: ["a cat on a table", "a cat sits on a wooden table", "the cat is lying on the table"],
}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, java: str) -> Scores:
    """One real scoring call, SPICE asked for but its jars pointed at an empty folder."""
    no_jars = tmp_path_factory.mktemp("no-spice-jars")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "_spice_lib_dir", lambda: str(no_jars))
        return score_captions(CAPTIONS, REFERENCES, spice=True, timeout_s=120)


def test_keys_and_hand_checked_values(scored: Scores) -> None:
    assert tuple(scored.overall) == METRICS
    assert set(scored.per_image) == set(CAPTIONS)
    for values in scored.per_image.values():
        assert tuple(values) == METRICS
    same = scored.per_image[1]  # identical after tokenisation
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert same[name] == pytest.approx(1.0, abs=1e-6), name
    assert all(v == 0.0 for v in scored.per_image[2].values())  # the empty caption
    partial = scored.per_image[3]  # "a red circle" vs "a red square"
    assert partial["BLEU-1"] == pytest.approx(2 / 3, abs=1e-6)  # 2 of 3 unigrams, no brevity penalty
    assert partial["BLEU-2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5, abs=1e-6)  # "a red" of 2 bigrams
    assert partial["ROUGE-L"] == pytest.approx(2 / 3)  # LCS 2 of 3 both ways
    assert scored.overall["CIDEr"] > 0 and 0 < scored.overall["METEOR"] < 1


def test_spice_without_jars_is_skipped_with_a_reason(scored: Scores) -> None:
    assert "SPICE" not in scored.overall
    reason = scored.skipped["SPICE"]
    assert "stanford-corenlp-3.6.0.jar" in reason and "not attempted" in reason


def test_agrees_with_pycocoevalcap_run_in_process(scored: Scores) -> None:
    """The COCO recipe as pycocoevalcap's eval.py runs it: tokenise, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in CAPTIONS.items()})
    ids = list(gts)
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    try:
        meteor, meteor_per_image = meteor_scorer.compute_score(gts, res)
    finally:
        del meteor_scorer  # its __del__ stops the JVM
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    cider, cider_per_image = Cider().compute_score(gts, res)

    expected = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    expected |= {"METEOR": meteor, "ROUGE-L": rouge, "CIDEr": cider}
    assert scored.overall == pytest.approx(expected, rel=1e-9)
    per_image = {f"BLEU-{n + 1}": bleu_per_image[n] for n in range(4)}
    per_image |= {"METEOR": meteor_per_image, "ROUGE-L": rouge_per_image, "CIDEr": cider_per_image}
    for name, values in per_image.items():
        assert [scored.per_image[i][name] for i in ids] == pytest.approx(list(values), rel=1e-9), name


def test_ptb_tokenize_matches_pycocoevalcap(java: str) -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A man, riding a horse.", "", 'Dogs -- in the "snow"!', "it's 3:30 p.m."]
    theirs = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert scorers.ptb_tokenize(sentences) == [theirs[i][0] for i in range(len(sentences))]


def test_ptb_tokenize_keeps_one_line_per_caption(java: str) -> None:
    """The JVM also breaks lines at \\r, \\v, \\f and \\u2028: those must not shift captions."""
    sentences = ["a\rb", "c\u2028d\x0be\x0c", "f\r\ng\n", "", "h"]
    assert scorers.ptb_tokenize(sentences) == ["a b", "c d e", "f g", "", "h"]


@pytest.mark.parametrize(
    ("captions", "references", "message"),
    [
        (
            {1: "a", 2: "b"},
            {1: ["a"], 3: ["c"]},
            r"no caption for 1 image id\(s\) with references: 3.*"
            r"no references for 1 captioned image id\(s\): 2",
        ),
        ({1: "a"}, {1: ["a"], 2: ["b"], 4: ["d"]}, r"no caption for 2 image id\(s\) with references: 2, 4"),
        ({}, {}, "nothing to score"),
        ({1: "a"}, {1: []}, "image 1 has no references"),
        ({1: "a"}, {1: "a"}, "must be a list of strings"),
        ({"1": "a"}, {"1": ["a"]}, "image ids must be integers"),
    ],
)
def test_bad_inputs_are_value_errors(captions: dict, references: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_captions(captions, references)


# --------------------------------------------------------------------------------------------------
# Java missing, crashing, hanging
# --------------------------------------------------------------------------------------------------


def fake_java(folder: Path, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    script = folder / "java"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed, waiting to be reaped
    except psutil.NoSuchProcess:
        return True


def test_missing_java_says_to_install_a_jre(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ScoringError, match=r"no `java` on PATH.*install a Java runtime.*make setup"):
        score_captions({1: "a cat"}, {1: ["a cat"]})


def test_java_crash_is_an_error_with_its_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = fake_java(
        tmp_path / "bin", "echo 'Error: Could not create the Java Virtual Machine.' >&2\nexit 1\n"
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ScoringError) as info:
        score_captions({1: "a cat"}, {1: ["a cat"]}, timeout_s=60)
    message = str(info.value)
    assert message.startswith("PTBTokenizer failed: java exited with status 1")
    assert "Could not create the Java Virtual Machine" in message


def test_meteor_crash_is_an_error_with_its_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, java: str
) -> None:
    """The tokenizer runs on the real JVM; METEOR's JVM dies at once (pycocoevalcap would read '')."""
    real_java = shutil.which("java")
    assert real_java is not None
    body = f'case "$*" in *PTBTokenizer*) exec {real_java} "$@";; esac\necho "meteor exploded" >&2\nexit 3\n'
    bin_dir = fake_java(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ScoringError, match=r"(?s)^METEOR failed: .*java status 3.*meteor exploded"):
        score_captions({1: "a cat"}, {1: ["a cat"]}, timeout_s=60)


def test_hanging_java_times_out_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    bin_dir = fake_java(tmp_path / "bin", f"echo $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    with pytest.raises(ScoringError, match=r"timed out after 5 s during PTBTokenizer"):
        score_captions({1: "a cat"}, {1: ["a cat"]}, timeout_s=5)
    assert time.monotonic() - started < 20
    started_pids = [int(line) for line in pids.read_text().split()]
    assert len(started_pids) == 2  # the fake java and its sleep
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in started_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in started_pids)
    after = {p.pid for p in psutil.Process().children(recursive=True) if not gone(p.pid)}
    assert after <= before


def test_child_that_dies_without_a_result_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_MODULE", "captioning.no_such_module")
    with pytest.raises(
        ScoringError, match=r"(?s)scoring process exited with status 1 during start-up.*No module named"
    ):
        score_captions({1: "a cat"}, {1: ["a cat"]}, timeout_s=60)


# --------------------------------------------------------------------------------------------------
# COCO results files
# --------------------------------------------------------------------------------------------------


def test_results_file_is_coco_format_sorted_by_id(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    write_coco_results(str(path), {7: "a dog", 2: "", 10: "ünïcode caption"})
    assert storage.read_json(str(path)) == [
        {"caption": "", "image_id": 2},
        {"caption": "a dog", "image_id": 7},
        {"caption": "ünïcode caption", "image_id": 10},
    ]
    assert read_coco_results(str(path)) == {2: "", 7: "a dog", 10: "ünïcode caption"}


def test_results_file_round_trips_through_s3(s3_env: str) -> None:
    uri = f"{s3_env}/run/val-results.json"
    write_coco_results(uri, {3: "b", 1: "a"})
    assert read_coco_results(uri) == {1: "a", 3: "b"}


@pytest.mark.parametrize(
    "content",
    [
        '{"image_id": 1}',
        '[{"image_id": "1", "caption": "a"}]',
        '[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]',
    ],
)
def test_bad_results_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        read_coco_results(str(path))


def test_module_runs_as_a_child_without_torch() -> None:
    """The child (scorers.py, and metrics.py it imports) loads no torch: no torch start-up per call."""
    import subprocess

    code = "import sys, captioning.evaluation.scorers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
