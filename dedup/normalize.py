"""Text normalisation, words and word shingles: a reference and a batch path.

The canonical definition (the reference, used for exact Jaccard and for
building a ``datasketch.MinHash`` the ordinary way):

* normalise: Unicode NFKC, then ``str.casefold``;
* words: the maximal runs of letters and digits (``[^\\W_]+``), so every run of
  punctuation, symbols, underscores and whitespace separates words and vanishes;
* shingles: the space-joined windows of ``k`` consecutive words; a text with
  fewer than ``k`` words is one shingle of all its words, an empty text none.

:func:`tokenize_batch` finds the same words for many texts at once without one
Python object per word: the texts are joined into one UTF-8 buffer and the word
boundaries are found with numpy, as byte spans of that buffer.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_SHINGLE_SIZE = 5

_WORD = re.compile(r"[^\W_]+")
_SPACE = 0x20
# Bytes of an ASCII text: capitals are lowered, small letters and digits stay,
# the rest becomes a space. Bytes >= 0x80 (non-ASCII characters) stay for
# _blank_non_alnum.
_TABLE = bytes(
    b + 0x20 if 0x41 <= b <= 0x5A else b if (0x30 <= b <= 0x39 or 0x61 <= b <= 0x7A or b >= 0x80) else _SPACE
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
class WordBatch:
    """The words of a batch of texts as byte spans of one buffer.

    Word ``w`` is ``buffer[start[w]:stop[w]]`` (its normalised UTF-8 bytes);
    ``doc_offsets[d]:doc_offsets[d+1]`` are the words of text ``d`` in order.
    """

    buffer: np.ndarray  # uint8
    start: np.ndarray  # int64
    stop: np.ndarray  # int64
    doc_offsets: np.ndarray  # int64, len = n_docs + 1

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def words_of(self, d: int) -> list[str]:
        """Text ``d``'s words as strings (for tests and debugging)."""
        raw = self.buffer.tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip(self.start[self.doc_offsets[d] : self.doc_offsets[d + 1]],
                                                          self.stop[self.doc_offsets[d] : self.doc_offsets[d + 1]])]


@functools.lru_cache(maxsize=1)
def _bmp_alnum() -> np.ndarray:
    """str.isalnum for every code point of the Basic Multilingual Plane (built once, 64 KiB)."""
    return np.fromiter((chr(c).isalnum() for c in range(0x10000)), dtype=bool, count=0x10000)


def _blank_non_alnum(buffer: np.ndarray) -> np.ndarray:
    """Overwrite with spaces the UTF-8 sequences of non-ASCII characters that are not alphanumeric."""
    lead = np.flatnonzero(buffer >= 0xC0)
    if not len(lead):
        return buffer
    b = buffer.astype(np.uint32)
    first = b[lead]
    size = np.where(first >= 0xF0, 4, np.where(first >= 0xE0, 3, 2))
    cp = np.zeros(len(lead), dtype=np.uint32)
    for s, mask in ((2, 0x1F), (3, 0x0F), (4, 0x07)):
        sel = size == s
        if sel.any():
            v = first[sel] & np.uint32(mask)
            for j in range(1, s):
                v = (v << np.uint32(6)) | (b[lead[sel] + j] & np.uint32(0x3F))
            cp[sel] = v
    bmp = cp < 0x10000
    alnum = np.empty(len(lead), dtype=bool)
    alnum[bmp] = _bmp_alnum()[cp[bmp]]
    alnum[~bmp] = [chr(int(c)).isalnum() for c in cp[~bmp]]
    out = buffer.copy()
    blank, blank_size = lead[~alnum], size[~alnum]
    for j in range(4):
        out[blank[blank_size > j] + j] = _SPACE
    return out


def tokenize_batch(texts: Sequence[str]) -> WordBatch:
    """The words of many texts at once; the same words as :func:`words`, text by text.

    An ASCII text needs no Unicode work (NFKC leaves ASCII alone and casefold is
    ``lower``), so ASCII texts are joined as they are and folded byte-wise by one
    ``bytes.translate`` (capitals lowered, every other non-alphanumeric byte a
    space); other texts are normalised first, and the UTF-8 sequences of their
    non-alphanumeric characters are blanked by a code-point table lookup.
    """
    n_docs = len(texts)
    try:
        all_ascii = all(map(str.isascii, texts))
    except TypeError:
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise ValueError(f"texts must be strings; item {bad} is {type(texts[bad]).__name__}") from None
    if all_ascii:
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n_docs)
        joined = (" " + " ".join(texts) + " ").encode("ascii")
    else:
        encoded = [(t if t.isascii() else normalize_text(t)).encode("utf-8", "surrogatepass") for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n_docs)
        joined = b" " + b" ".join(encoded) + b" "
    # A space before the first text and after every text, so no word spans two texts.
    buffer = np.frombuffer(joined.translate(_TABLE), dtype=np.uint8)
    if not all_ascii:
        buffer = _blank_non_alnum(buffer)
    doc_start = np.ones(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=doc_start[1:])
    doc_start[1:] += 1
    # The buffer starts and ends with a space, so the changes between space and
    # non-space alternate: start, stop, start, stop, ...
    is_space = buffer == _SPACE
    changes = np.flatnonzero(is_space[1:] != is_space[:-1]) + 1
    start, stop = changes[0::2], changes[1::2]
    doc_offsets = np.searchsorted(start, doc_start, side="left")
    doc_offsets[-1] = len(start)
    return WordBatch(buffer, start, stop, doc_offsets)
