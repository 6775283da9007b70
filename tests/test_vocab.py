"""Tests for captioning.data.vocab: length policy, train-only counting, ids, encode/decode, file I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from captioning.data.records import Caption, ImageRecord
from captioning.data.vocab import (
    END,
    END_ID,
    PAD,
    PAD_ID,
    START,
    START_ID,
    UNK,
    UNK_ID,
    LengthStats,
    Vocab,
    VocabError,
    apply_length_policy,
    build_vocab,
)


def record(image_id: int, split: str, *captions: str) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        path=f"{image_id}.jpg",
        split=split,
        source_split=split,
        captions=tuple(
            Caption(raw=c, tokens=tuple(c.split()), sent_id=image_id * 10 + i) for i, c in enumerate(captions)
        ),
    )


def corpus() -> list[ImageRecord]:
    """Train counts: a 6, dog 5, cat 4, runs 3, the 3, zebra 0 (val/test only)."""
    return [
        record(1, "train", "a dog runs", "a dog", "a cat runs the"),
        record(2, "train", "a dog the", "a dog cat", "a dog cat the cat runs"),
        record(3, "val", "zebra zebra zebra zebra zebra zebra a"),
        record(4, "test", "zebra zebra zebra zebra zebra cat"),
    ]


# ---------------------------------------------------------------- length policy


def test_specials_are_fixed() -> None:
    assert (PAD, START, END, UNK) == ("<pad>", "<start>", "<end>", "<unk>")
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)


def _length_corpus() -> list[ImageRecord]:
    return [
        record(1, "train", "a b c", "a b c d e", "a"),  # one overlong of three
        record(2, "test", "a b c d", "a b c d e f"),  # all overlong
        record(3, "val", "a b"),
    ]


def test_length_policy_drop() -> None:
    kept, stats = apply_length_policy(_length_corpus(), max_caption_len=3, overlong="drop")
    assert stats == LengthStats(
        num_captions=6, num_kept=3, num_dropped=3, num_truncated=0, num_images_dropped=1
    )
    assert [r.image_id for r in kept] == [1, 3]
    assert [c.tokens for c in kept[0].captions] == [("a", "b", "c"), ("a",)]


def test_length_policy_truncate() -> None:
    kept, stats = apply_length_policy(_length_corpus(), max_caption_len=3, overlong="truncate")
    assert stats == LengthStats(
        num_captions=6, num_kept=6, num_dropped=0, num_truncated=3, num_images_dropped=0
    )
    assert [r.image_id for r in kept] == [1, 2, 3]
    assert [c.tokens for c in kept[1].captions] == [("a", "b", "c"), ("a", "b", "c")]
    assert kept[1].captions[1].raw == "a b c d e f"  # raw text is kept whole


def test_length_policy_defaults_keep_fifty() -> None:
    from captioning.config import DataConfig

    records = [record(1, "train", " ".join(["w"] * 50), " ".join(["w"] * 51))]
    defaults = DataConfig()  # the defaults live in the config
    kept, stats = apply_length_policy(
        records, max_caption_len=defaults.max_caption_len, overlong=defaults.overlong_captions
    )
    assert (stats.num_kept, stats.num_dropped) == (1, 1)
    assert len(kept[0].captions[0].tokens) == 50


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"overlong": "clip"}, "unknown overlong"), ({"max_caption_len": 0}, ">= 1")]
)
def test_length_policy_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_length_policy(_length_corpus(), **{"max_caption_len": 3, "overlong": "drop", **kwargs})


# ---------------------------------------------------------------- building


def test_threshold_is_inclusive_and_train_only() -> None:
    vocab = build_vocab(corpus(), min_word_freq=5)
    assert "dog" in vocab  # exactly 5
    assert "cat" not in vocab  # 4 in train (+1 in test does not count)
    assert "zebra" not in vocab  # 11 times, but only in val/test
    assert vocab.words == (PAD, START, END, UNK, "a", "dog")
    assert vocab.counts == (0, 0, 0, 0, 6, 5)
    assert vocab.min_word_freq == 5


def test_order_is_count_then_alphabetical() -> None:
    vocab = build_vocab(corpus(), min_word_freq=1)
    assert vocab.words == (PAD, START, END, UNK, "a", "dog", "cat", "runs", "the")
    assert [vocab.id_of(w) for w in vocab.words] == list(range(len(vocab)))
    assert len(vocab) == 9


def test_build_is_deterministic_and_saves_byte_identical(tmp_path: Path) -> None:
    first, second = (
        build_vocab(corpus(), min_word_freq=1),
        build_vocab(list(reversed(corpus())), min_word_freq=1),
    )
    assert first == second
    first.save(tmp_path / "one.json")
    second.save(tmp_path / "two.json")
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] != []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]  # no tmp files left


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = build_vocab(corpus(), min_word_freq=3)
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    assert Vocab.from_json(vocab.to_json()) == vocab
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert list(data) == sorted(data)


def test_special_tokens_in_captions_do_not_duplicate() -> None:
    vocab = build_vocab([record(1, "train", "<unk> <unk> a")], min_word_freq=1)
    assert vocab.words == (PAD, START, END, UNK, "a")


def test_build_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError, match="min_word_freq"):
        build_vocab(corpus(), min_word_freq=0)


# ---------------------------------------------------------------- encode / decode


def test_encode_decode_round_trip_with_unk() -> None:
    vocab = build_vocab(corpus(), min_word_freq=5)
    ids = vocab.encode(["a", "zebra", "dog"])
    assert ids == [START_ID, vocab.id_of("a"), UNK_ID, vocab.id_of("dog"), END_ID]
    assert vocab.decode(ids) == ["a", UNK, "dog"]
    assert vocab.id_of("zebra") == UNK_ID
    assert vocab.word_of(4) == "a"


def test_encode_max_len_cuts_words_only() -> None:
    vocab = build_vocab(corpus(), min_word_freq=1)
    assert vocab.encode(["a", "dog", "runs"], max_len=2) == [START_ID, 4, 5, END_ID]
    assert vocab.encode(["a", "dog"], max_len=5) == [START_ID, 4, 5, END_ID]
    assert vocab.encode([], max_len=0) == [START_ID, END_ID]
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode(["a"], max_len=-1)


def test_decode_stops_at_end_and_skips_pad() -> None:
    vocab = build_vocab(corpus(), min_word_freq=1)
    assert vocab.decode([START_ID, 4, PAD_ID, 5, END_ID, 6, PAD_ID]) == ["a", "dog"]
    assert vocab.decode([4, 5]) == ["a", "dog"]  # no START, no END: all words
    assert vocab.decode([START_ID, START_ID, 4]) == [START, "a"]  # only a leading START is dropped


@pytest.mark.parametrize("bad", [-1, 9, 100])
def test_decode_rejects_out_of_range(bad: int) -> None:
    vocab = build_vocab(corpus(), min_word_freq=1)
    with pytest.raises(ValueError, match=f"token id {bad} out of range"):
        vocab.decode([START_ID, 4, bad, END_ID])
    with pytest.raises(ValueError, match="out of range"):
        vocab.word_of(bad)


# ---------------------------------------------------------------- loading corrupted files


def _good_json() -> dict[str, Any]:
    return build_vocab(corpus(), min_word_freq=1).to_json()


def _swap_specials(d: dict[str, Any]) -> None:
    d["words"][0], d["words"][3] = d["words"][3], d["words"][0]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_swap_specials, "special tokens"),
        (lambda d: d["words"].pop(1), "special tokens"),
        (lambda d: d["words"].__setitem__(6, "a"), "duplicate word 'a' at ids 4 and 6"),
        (lambda d: d["counts"].pop(), "8 counts for 9 words"),
        (lambda d: d["counts"].__setitem__(4, -1), "non-negative integer"),
        (lambda d: d.pop("words"), "missing field"),
        (lambda d: d.__setitem__("version", 99), "unsupported vocab version"),
        (lambda d: d.__setitem__("min_word_freq", 0), "min_word_freq"),
        (lambda d: d.__setitem__("words", "abc"), "must be lists"),
    ],
    ids=[
        "specials-swapped",
        "special-missing",
        "duplicate",
        "counts-length",
        "negative-count",
        "no-words",
        "version",
        "threshold",
        "words-not-list",
    ],
)
def test_load_rejects_corrupted_file(tmp_path: Path, corrupt: Any, match: str) -> None:
    data = _good_json()
    corrupt(data)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(VocabError, match=match) as info:
        Vocab.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text('{"words": [', encoding="utf-8")
    with pytest.raises(VocabError, match=r"invalid JSON at line 1"):
        Vocab.load(path)


def test_vocab_is_immutable() -> None:
    vocab = build_vocab(corpus(), min_word_freq=1)
    with pytest.raises(AttributeError):
        vocab.words = ()  # type: ignore[misc]
