"""Text normalisation and word shingles, as one reference and one vectorised path.

The canonical definition (the reference, used for exact Jaccard and for
building a ``datasketch.MinHash`` the ordinary way):

* normalise: Unicode NFKC, then ``str.casefold``;
* words: the maximal runs of letters and digits (``[^\\W_]+``), so every run of
  punctuation, symbols, underscores and whitespace separates words and vanishes;
* shingles: the space-joined windows of ``k`` consecutive words; a text with
  fewer than ``k`` words is one shingle of all its words, an empty text none.

:func:`tokenize_batch` produces the same words for many texts at once without
one Python object per word: the texts are joined into one UTF-8 buffer in which
every separator is a single space, and word and shingle boundaries are found
with numpy. A shingle is then a contiguous byte span of that buffer whose bytes
equal ``" ".join(words[i:i+k]).encode()``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_SHINGLE_SIZE = 5

_WORD = re.compile(r"[^\W_]+")
_NONWORD = re.compile(r"[\W_]+")
_SPACE = 0x20
# Bytes of an ASCII-only normalised text: letters and digits stay, the rest
# becomes a space. Bytes >= 0x80 only occur in texts that took the slow path,
# where every non-word character is already a space, so they stay too.
_TABLE = bytes(
    b if (0x30 <= b <= 0x39 or 0x61 <= b <= 0x7A or 0x41 <= b <= 0x5A or b >= 0x80) else _SPACE
    for b in range(256)
)


def normalize_text(text: str) -> str:
    """NFKC then casefold: the form in which words are compared."""
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str) -> list[str]:
    """The words of ``text`` after normalisation (runs of letters and digits)."""
    return _WORD.findall(normalize_text(text))


def shingles(text: str, k: int = DEFAULT_SHINGLE_SIZE) -> list[str]:
    """Word ``k``-gram shingles in text order (duplicates kept); see the module doc."""
    _check_k(k)
    w = words(text)
    if not w:
        return []
    if len(w) < k:
        return [" ".join(w)]
    return [" ".join(w[i : i + k]) for i in range(len(w) - k + 1)]


def shingle_set(text: str, k: int = DEFAULT_SHINGLE_SIZE) -> frozenset[str]:
    return frozenset(shingles(text, k))


def exact_jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """|a & b| / |a | b|; two empty sets have no evidence of a copy, so 0.0."""
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"shingle size must be a positive integer, got {k!r}; 5 (word 5-grams) is the default")


@dataclass(frozen=True)
class ShingleSpans:
    """Shingles of a batch of texts as byte spans of one normalised buffer.

    ``buffer`` holds the normalised texts, words separated by single spaces;
    shingle ``j`` is ``buffer[start[j]:stop[j]]`` and belongs to text
    ``doc[j]``; ``doc_offsets[d]:doc_offsets[d+1]`` are the shingles of text
    ``d`` (possibly none), in text order.
    """

    buffer: np.ndarray  # uint8
    start: np.ndarray  # int64
    stop: np.ndarray  # int64
    doc_offsets: np.ndarray  # int64, len = n_docs + 1

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def text_of(self, j: int) -> str:
        """One shingle as a string (for tests and debugging)."""
        return self.buffer[self.start[j] : self.stop[j]].tobytes().decode("utf-8")


def _fold(text: str) -> bytes:
    s = normalize_text(text)
    if not s.isascii():
        s = _NONWORD.sub(" ", s)
    return s.encode("utf-8")


def tokenize_batch(texts: Sequence[str], k: int = DEFAULT_SHINGLE_SIZE) -> ShingleSpans:
    """Word ``k``-gram shingles of many texts at once; same shingles as :func:`shingles`."""
    _check_k(k)
    folded = [_fold(t) for t in texts]
    n_docs = len(folded)
    # One leading space and one space after every text: each text starts after
    # a separator, so no word spans two texts.
    raw = np.frombuffer(b" " + b" ".join(folded) + b" ", dtype=np.uint8)
    lengths = np.fromiter(map(len, folded), dtype=np.int64, count=n_docs)
    doc_start = np.empty(n_docs + 1, dtype=np.int64)
    doc_start[0] = 1
    np.cumsum(lengths + 1, out=doc_start[1:])
    doc_start[1:] += 1
    # Fold ASCII punctuation to spaces and lower ASCII capitals already folded
    # by casefold; then keep one space of every run of spaces.
    mapped = np.frombuffer(raw.tobytes().translate(_TABLE), dtype=np.uint8)
    is_space = mapped == _SPACE
    keep = np.ones(len(mapped), dtype=bool)
    keep[1:] = ~(is_space[1:] & is_space[:-1])
    buffer = mapped[keep]
    new_pos = np.cumsum(keep) - 1
    # Word starts and stops in the compacted buffer (it begins and ends with a space).
    sp = buffer == _SPACE
    word_start = np.flatnonzero(sp[:-1] & ~sp[1:]) + 1
    word_stop = np.flatnonzero(~sp[:-1] & sp[1:]) + 1
    # Which text each word is in: texts start at new_pos[doc_start[d]] (or later
    # if they begin with spaces, which does not matter for the ordering).
    doc_first_byte = new_pos[np.minimum(doc_start, len(new_pos) - 1)]
    doc_first_byte[-1] = len(buffer)
    word_doc = np.searchsorted(doc_first_byte, word_start, side="right") - 1
    words_per_doc = np.bincount(word_doc, minlength=n_docs)[:n_docs]
    word_offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(words_per_doc, out=word_offsets[1:])
    # Shingle j of a text with m >= k words starts at word i and stops at word i+k-1;
    # a text with 0 < m < k has one shingle from its first to its last word.
    n_sh = np.where(words_per_doc >= k, words_per_doc - k + 1, np.minimum(words_per_doc, 1))
    doc_offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(n_sh, out=doc_offsets[1:])
    total = int(doc_offsets[-1])
    sh_doc = np.repeat(np.arange(n_docs), n_sh)
    first_word = word_offsets[sh_doc] + (np.arange(total) - doc_offsets[sh_doc])
    last_word = np.minimum(first_word + (k - 1), word_offsets[sh_doc + 1] - 1)
    return ShingleSpans(buffer, word_start[first_word], word_stop[last_word], doc_offsets)
