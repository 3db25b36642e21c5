"""A model-free text embedder: signed feature hashing of words and word bigrams.

Each token t (a normalised word or a pair of adjacent words) adds
``sign(t) * (1 + log tf(t))`` to coordinate ``h(t) mod dim`` (``h`` = xxh3-64,
``sign`` = its top bit), and the vector is L2-normalised, so the inner product
of two embeddings is their cosine similarity. It needs no model file and runs
at tens of thousands of texts per second; it sees shared vocabulary, not
meaning, so it finds reworded copies only where words survive the rewording.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np
import xxhash

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Deterministic hashed bag of words and bigrams; ``embed`` returns unit rows."""

    name = "hashing"

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 8:
            raise ValueError(f"dim must be at least 8, got {dim}; 256 is a good default")
        self.dim = dim
        self.seed = seed

    def _tokens(self, text: str) -> list[str]:
        words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        hasher = xxhash.xxh3_64_intdigest
        for row, text in enumerate(texts):
            counts = Counter(self._tokens(text))
            if not counts:
                continue
            hashes = np.fromiter(
                (hasher(tok.encode(), seed=self.seed) for tok in counts), dtype=np.uint64, count=len(counts)
            )
            weights = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
            signs = np.where((hashes >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
            np.add.at(out[row], (hashes % np.uint64(self.dim)).astype(np.int64), signs * weights)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out
