"""Pretrained word embeddings (GloVe text format) aligned to the caption vocabulary.

    emb = load_glove("glove.6B.300d.txt", vocab.words, dim=300)   # local path or s3://
    emb.vectors      # (V, dim) float32: the file's vector where found, zeros elsewhere
    emb.found        # (V,) bool
    emb.missing      # the vocabulary words the file lacks (they keep the model's random init)
    decoder.load_pretrained_embeddings(emb.vectors, emb.found)

The format is one ``word v1 v2 ... v_dim`` per line, space separated (an optional word2vec header
line ``count dim`` is skipped). Words may contain spaces (glove.840B has a few): the last ``dim``
fields are the vector. The file is streamed; only vocabulary words are kept.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedEmbeddings:
    """Vectors for a vocabulary, row i for word i."""

    vectors: torch.Tensor  # (V, dim) float32, zeros where not found
    found: torch.Tensor  # (V,) bool
    missing: tuple[str, ...]  # vocabulary words without a vector, in id order
    source: str

    @property
    def num_found(self) -> int:
        return int(self.found.sum())

    @property
    def num_missing(self) -> int:
        return len(self.missing)


def load_glove(uri: str, words: Sequence[str], dim: int) -> PretrainedEmbeddings:
    """Read the vectors of ``words`` from a GloVe text file; ``dim`` must be the file's dimension."""
    from captioning import storage  # lazy: boto3 only for s3 locations

    index = {word: i for i, word in enumerate(words)}
    vectors = torch.zeros(len(words), dim)
    found = torch.zeros(len(words), dtype=torch.bool)
    first_vector = True
    with io.TextIOWrapper(storage.open_read(uri), encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").rstrip(" ").split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                if int(parts[1]) != dim:
                    raise ValueError(f"{uri}: vectors have dimension {parts[1]}, but model.emb_dim is {dim}")
                continue  # word2vec-style header "count dim"
            if first_vector and len(parts) - 1 != dim:
                # The first vector fixes the dimension: a clear error beats a shape mismatch later.
                raise ValueError(
                    f"{uri}: vectors have dimension {len(parts) - 1}, but model.emb_dim is {dim} "
                    "(set model.emb_dim to the file's dimension)"
                )
            first_vector = False
            if len(parts) < dim + 1:
                raise ValueError(
                    f"{uri}:{line_no}: expected a word and {dim} numbers, got {len(parts)} fields"
                )
            word = " ".join(parts[:-dim])
            i = index.get(word)
            if i is None or found[i]:
                continue  # not in the vocabulary, or a duplicate (the first one wins)
            try:
                vectors[i] = torch.tensor([float(x) for x in parts[-dim:]])
            except ValueError:
                raise ValueError(f"{uri}:{line_no}: the vector of {word!r} is not numeric") from None
            found[i] = True
    missing = tuple(w for w, ok in zip(words, found.tolist(), strict=True) if not ok)
    log.info(
        "%s: %d of %d vocabulary words have a pretrained vector; %d keep their random init (%s%s)",
        uri,
        len(words) - len(missing),
        len(words),
        len(missing),
        ", ".join(missing[:10]),
        " ..." if len(missing) > 10 else "",
    )
    return PretrainedEmbeddings(vectors=vectors, found=found, missing=missing, source=uri)
