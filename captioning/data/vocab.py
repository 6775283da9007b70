"""The caption vocabulary: the caption-length policy, word counting over train, encode/decode, JSON I/O.

Usage::

    records, stats = apply_length_policy(dataset.records, max_caption_len=50, overlong="drop")
    vocab = build_vocab(records, min_word_freq=5)
    vocab.save("vocab.json")
    ids = vocab.encode(["a", "man", "rides"])      # [START_ID, ..., END_ID]

Defaults (min word frequency 5, at most 50 tokens) follow the Show, Attend and Tell tutorial
(sgrvinod). Plain Python on purpose: no torch, so data preparation imports fast.
"""

from __future__ import annotations

import json
import operator
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from captioning import storage
from captioning.data.records import ImageRecord

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)  # index = id
OVERLONG_POLICIES: tuple[str, ...] = ("drop", "truncate")
FORMAT_VERSION = 1


class VocabError(ValueError):
    """A vocabulary (usually a vocab file) is inconsistent: specials misplaced, duplicates, bad fields."""


@dataclass(frozen=True)
class LengthStats:
    """What ``apply_length_policy`` did, for logging."""

    num_captions: int  # captions seen
    num_kept: int  # captions kept, truncated ones included
    num_dropped: int  # overlong captions dropped
    num_truncated: int  # overlong captions cut to max_caption_len
    num_images_dropped: int  # images left with no caption after dropping


def apply_length_policy(
    records: Iterable[ImageRecord], *, max_caption_len: int, overlong: str
) -> tuple[list[ImageRecord], LengthStats]:
    """Drop or truncate captions longer than ``max_caption_len`` tokens, in every split.

    ``overlong="drop"`` removes such captions (and any image left without captions);
    ``"truncate"`` cuts them to ``max_caption_len`` tokens. Returns the new records, in input
    order, and the counts.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong policy {overlong!r}; valid: {', '.join(OVERLONG_POLICIES)}")
    if max_caption_len < 1:
        raise ValueError(f"max_caption_len must be >= 1, got {max_caption_len}")
    kept_records: list[ImageRecord] = []
    num_captions = num_dropped = num_truncated = num_images_dropped = 0
    for record in records:
        captions = []
        for caption in record.captions:
            num_captions += 1
            if len(caption.tokens) <= max_caption_len:
                captions.append(caption)
            elif overlong == "drop":
                num_dropped += 1
            else:
                num_truncated += 1
                captions.append(replace(caption, tokens=caption.tokens[:max_caption_len]))
        if not captions:
            num_images_dropped += 1
            continue
        kept_records.append(replace(record, captions=tuple(captions)))
    stats = LengthStats(
        num_captions=num_captions,
        num_kept=num_captions - num_dropped,
        num_dropped=num_dropped,
        num_truncated=num_truncated,
        num_images_dropped=num_images_dropped,
    )
    return kept_records, stats


@dataclass(frozen=True, repr=False)
class Vocab:
    """An immutable word <-> id mapping; ids 0..3 are PAD, START, END, UNK.

    ``words[i]`` is the word with id ``i``; ``counts[i]`` its frequency in the train captions
    (0 for the specials); ``min_word_freq`` the threshold it was built with. Frozen because shards
    and checkpoints refer to its ids. Lists passed in are stored as tuples.
    """

    words: tuple[str, ...]
    counts: tuple[int, ...]
    min_word_freq: int
    _index: dict[str, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        words, counts, min_word_freq = tuple(self.words), tuple(self.counts), self.min_word_freq
        if words[: len(SPECIALS)] != SPECIALS:
            raise VocabError(
                f"the first words must be the special tokens {list(SPECIALS)} at ids 0..3, "
                f"got {list(words[: len(SPECIALS)])}"
            )
        if not all(isinstance(w, str) and w for w in words):
            raise VocabError("every word must be a non-empty string")
        index: dict[str, int] = {}
        for i, word in enumerate(words):
            if word in index:
                raise VocabError(f"duplicate word {word!r} at ids {index[word]} and {i}")
            index[word] = i
        if len(counts) != len(words):
            raise VocabError(f"{len(counts)} counts for {len(words)} words")
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise VocabError("every count must be a non-negative integer")
        if not _is_int(min_word_freq) or min_word_freq < 1:
            raise VocabError(f"min_word_freq must be an integer >= 1, got {min_word_freq!r}")
        # object.__setattr__ because the dataclass is frozen; this is still construction.
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, min_word_freq={self.min_word_freq})"

    def id_of(self, word: str) -> int:
        """Return the id of ``word``, or UNK_ID when it is not in the vocabulary."""
        return self._index.get(word, UNK_ID)

    def word_of(self, id_: int) -> str:
        """Return the word with id ``id_``; raises ValueError when out of range."""
        i = operator.index(id_)
        if not 0 <= i < len(self.words):
            raise ValueError(f"token id {i} out of range for a vocabulary of {len(self.words)} words")
        return self.words[i]

    def encode(self, tokens: Iterable[str], max_len: int | None = None) -> list[int]:
        """Return ``[START_ID, *ids, END_ID]``; unknown words become UNK_ID.

        With ``max_len`` the word part is cut to ``max_len`` ids (START and END are always added).
        """
        ids = [self.id_of(token) for token in tokens]
        if max_len is not None:
            if max_len < 0:
                raise ValueError(f"max_len must be >= 0, got {max_len}")
            ids = ids[:max_len]
        return [START_ID, *ids, END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Turn ids back into words: drop a leading START, stop at the first END, skip PAD.

        Accepts anything with ``__index__`` (ints, numpy or 0-d torch integers); ids out of range
        raise ValueError.
        """
        words: list[str] = []
        for position, id_ in enumerate(ids):
            i = operator.index(id_)
            word = self.word_of(i)  # validates the range even for ids we then skip
            if i == START_ID and position == 0:
                continue
            if i == END_ID:
                break
            if i == PAD_ID:
                continue
            words.append(word)
        return words

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict; ``Vocab.from_json`` inverts it."""
        return {
            "version": FORMAT_VERSION,
            "words": list(self.words),
            "counts": list(self.counts),
            "min_word_freq": self.min_word_freq,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Vocab:
        """Build a vocab from ``to_json`` output; raises VocabError when fields are missing or wrong."""
        if not isinstance(data, Mapping):
            raise VocabError(f"vocab must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("version", "words", "counts", "min_word_freq") if key not in data]
        if missing:
            raise VocabError(f"vocab is missing field(s) {', '.join(map(repr, missing))}")
        if data["version"] != FORMAT_VERSION:
            raise VocabError(f"unsupported vocab version {data['version']!r}; expected {FORMAT_VERSION}")
        if not isinstance(data["words"], list) or not isinstance(data["counts"], list):
            raise VocabError("vocab fields 'words' and 'counts' must be lists")
        return cls(tuple(data["words"]), tuple(data["counts"]), data["min_word_freq"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocab as JSON atomically; the same vocab always gives byte-identical files."""
        text = json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        # storage writes next to the target, then renames (readers never see a half-written vocab),
        # and gives the file the usual mode (0666 less the umask): a bare mkstemp file stays 0600.
        storage.write_text(os.fspath(path), text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        """Read and validate a vocab file written by ``save``; raises VocabError naming the file."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        try:
            return cls.from_json(data)
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from None


def build_vocab(records: Iterable[ImageRecord], *, min_word_freq: int) -> Vocab:
    """Count words over the captions of "train" records only and keep those seen >= min_word_freq times.

    Val and test words never enter, so evaluation cannot leak into the vocabulary. Order after the
    specials: descending count, then alphabetical, so the same records always give the same ids.
    The caller applies ``apply_length_policy`` first, so dropped captions do not count.
    """
    if min_word_freq < 1:
        raise ValueError(f"min_word_freq must be >= 1, got {min_word_freq}")
    counter: Counter[str] = Counter()
    for record in records:
        if record.split == "train":
            for caption in record.captions:
                counter.update(caption.tokens)
    specials = set(SPECIALS)
    kept = sorted(
        ((word, count) for word, count in counter.items() if count >= min_word_freq and word not in specials),
        key=lambda item: (-item[1], item[0]),
    )
    return Vocab(
        words=SPECIALS + tuple(word for word, _ in kept),
        counts=(0,) * len(SPECIALS) + tuple(count for _, count in kept),
        min_word_freq=min_word_freq,
    )


def _is_int(value: Any) -> bool:
    """True for integers but not bools (JSON true/false must not pass as a count)."""
    return isinstance(value, int) and not isinstance(value, bool)
