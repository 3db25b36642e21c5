"""MinHash signatures of word shingles, vectorised across documents.

For a shingle set S and permutation k (datasketch 2.0, scheme ``affine32``)::

    sig[k] = min over s in S of  (a_k * fmix32(h(s)) + b_k)  mod 2^32

with ``fmix32`` the MurmurHash3 finalizer and ``(a_k, b_k)`` the permutations
datasketch draws from ``numpy.random.RandomState(seed)`` (``a_k`` odd, so each map
is a bijection). ``P[sig_A[k] == sig_B[k]] = J(A, B)``, so the fraction of equal
entries estimates the Jaccard similarity with standard error
``sqrt(J (1 - J) / num_perm)``.

The hash of a shingle of words ``w_1 .. w_m`` is a polynomial of the words'
xxh32 hashes (Horner's rule, ``M`` odd, all modulo 2^32)::

    h(s) = sum_j xxh32(w_j) * M^(m - j)

so each word of a batch is hashed once (:func:`dedup.span_hash.xxh32_spans`)
and a shingle costs ``k`` multiply-adds of contiguous arrays. Each permutation
is then one multiply, one add and one segmented minimum over the whole batch.
A signature equals ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash)``
updated with the same shingles (see :func:`datasketch_minhash`). Empty texts get
datasketch's empty signature (every entry 2^32 - 1).

**Keyed parameters** (:meth:`MinHashParams.keyed`): the permutations ``(a_k, b_k)``
and the seed of the word hash are derived from a secret key (HMAC-SHA256 in
counter mode), not from a public seed. Anyone can compute the signature of a
guessed text under seeded parameters and compare it with a stored one; under
keyed parameters nobody without the key can, so stored signatures (tombstones of
erased records) confirm nothing to whoever copies them. Signatures of the same
key stay comparable with each other (screening, LSH). A keyed signature still
equals ``datasketch.MinHash(num_perm, scheme="affine32", permutations=(a, b),
hashfunc=shingle_hash with the keyed word seed)``. The key itself is never part of
:meth:`MinHashParams.to_dict`; files record only its fingerprint (``key_id``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import xxhash

from dedup.normalize import DEFAULT_SHINGLE_SIZE, WordBatch, shingles, tokenize_batch
from dedup.span_hash import xxh32_spans

EMPTY_VALUE = np.uint32(0xFFFFFFFF)
_SCHEME = "affine32"
WORD_MULTIPLIER = 0x9E3779B1  # odd: every power is invertible modulo 2^32
# Shingles per permutation pass: the temporary row stays in the CPU's L2 cache.
_CHUNK_SHINGLES = 1 << 16


class MinHashKeyMismatch(ValueError):
    """Signatures made under another key (or none) than the one given: they are not comparable."""


def minhash_key_id(key: bytes) -> str:
    """A non-secret fingerprint of a MinHash key, stored with every keyed signature file."""
    return hmac.new(key, b"minhash-key-id", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class MinHashParams:
    """What makes two signatures comparable; stored with every signature file.

    Unkeyed (``key_id`` None): datasketch's permutations of ``seed`` and the word
    hash seed ``hash_seed``, both public. Keyed (:meth:`keyed`): both derived from
    ``key``, which is never stored or printed; ``key_id`` is its fingerprint. Two
    parameter sets are equal when their numbers and key fingerprints are.
    """

    num_perm: int = 128
    seed: int = 1
    shingle_size: int = DEFAULT_SHINGLE_SIZE
    hash_seed: int = 0
    key_id: str | None = None
    key: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_perm, int) or not 16 <= self.num_perm <= 1024:
            raise ValueError(f"num_perm must be an integer in 16..1024, got {self.num_perm!r}; 128 is the default")
        if not isinstance(self.shingle_size, int) or self.shingle_size < 1:
            raise ValueError(f"shingle_size must be a positive integer, got {self.shingle_size!r}; 5 is the default")
        if not 0 <= self.seed < 2**32 or not 0 <= self.hash_seed < 2**32:
            raise ValueError("seed and hash_seed must be in 0..2**32-1")
        if self.key is not None:
            if not isinstance(self.key, bytes) or len(self.key) < 16:
                raise ValueError("a MinHash key must be at least 16 bytes")
            if self.key_id != minhash_key_id(self.key):
                raise MinHashKeyMismatch(f"the key given has fingerprint {minhash_key_id(self.key)}, "
                                         f"the parameters say {self.key_id}")
        if self.key_id is not None and (self.seed or self.hash_seed):
            raise ValueError("keyed parameters derive their permutations and word seed from the key; "
                             "seed and hash_seed must be 0")

    @classmethod
    def keyed(cls, key: bytes, num_perm: int = 128, shingle_size: int = DEFAULT_SHINGLE_SIZE) -> MinHashParams:
        """Parameters whose permutations and word hash seed are derived from ``key``."""
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError("a MinHash key must be at least 16 bytes")
        return cls(num_perm, 0, shingle_size, 0, minhash_key_id(key), key)

    @property
    def is_keyed(self) -> bool:
        return self.key_id is not None

    def with_key(self, key: bytes) -> MinHashParams:
        """These (keyed) parameters, able to compute signatures again; the key must match ``key_id``."""
        if not self.is_keyed:
            raise MinHashKeyMismatch("these signatures were made without a key (seeded permutations); "
                                     "rebuild them under the keyed parameters")
        if minhash_key_id(key) != self.key_id:
            raise MinHashKeyMismatch(f"these signatures were made under the MinHash key {self.key_id}, "
                                     f"the key given is {minhash_key_id(key)}: restore the original secret key")
        return replace(self, key=key)

    def _secret(self) -> bytes:
        if self.key is None:
            raise MinHashKeyMismatch(f"these parameters are keyed (key id {self.key_id}) but hold no key; "
                                     "signatures cannot be computed without it: attach it with with_key(key)")
        return self.key

    @property
    def word_seed(self) -> int:
        """The seed of the words' xxh32 hashes (derived from the key when keyed)."""
        if not self.is_keyed:
            return self.hash_seed
        return int.from_bytes(hmac.new(self._secret(), b"minhash-word-seed", hashlib.sha256).digest()[:4], "little")

    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``(a, b)`` uint32 arrays of the affine permutations (``a`` odd)."""
        if not self.is_keyed:
            return permutations(self.num_perm, self.seed)
        return keyed_permutations(self.num_perm, self._secret())

    def to_dict(self) -> dict:
        data = {"num_perm": self.num_perm, "seed": self.seed, "shingle_size": self.shingle_size,
                "hash_seed": self.hash_seed, "scheme": _SCHEME, "hash": "xxh32-words-poly"}
        if self.is_keyed:
            data["key_id"] = self.key_id  # the fingerprint only, never the key
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MinHashParams:
        """The parameters a file was written with; keyed ones come back without the key (see :meth:`with_key`)."""
        if data.get("scheme", _SCHEME) != _SCHEME or data.get("hash") != "xxh32-words-poly":
            raise ValueError(f"signatures use scheme {data.get('scheme')!r}/{data.get('hash')!r}; "
                             f"this version reads only {_SCHEME}/xxh32-words-poly: rebuild the index")
        return cls(int(data["num_perm"]), int(data["seed"]), int(data["shingle_size"]), int(data["hash_seed"]),
                   data.get("key_id"))


def shingle_hash(shingle: bytes, hash_seed: int = 0) -> int:
    """The hash function given to datasketch: a polynomial of the words' xxh32 hashes."""
    h = 0
    for word in shingle.split(b" "):
        h = (h * WORD_MULTIPLIER + xxhash.xxh32_intdigest(word, seed=hash_seed)) & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own ``(a, b)`` for this ``num_perm`` and ``seed`` (uint32 arrays)."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
    a, b = np.ascontiguousarray(a, dtype=np.uint32), np.ascontiguousarray(b, dtype=np.uint32)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


@functools.lru_cache(maxsize=8)
def keyed_permutations(num_perm: int, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` from HMAC-SHA256(key, counter): 32 independent secret bits per entry (``a`` forced odd)."""
    needed = 8 * num_perm
    blocks = [hmac.new(key, b"minhash-permutations/%d/%d" % (num_perm, i), hashlib.sha256).digest()
              for i in range(-(-needed // 32))]
    words = np.frombuffer(b"".join(blocks)[:needed], dtype="<u4").astype(np.uint32)
    a = np.ascontiguousarray(words[:num_perm] | np.uint32(1))
    b = np.ascontiguousarray(words[num_perm:])
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, in place on a uint32 array (returned)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _min_per_doc(hv: np.ndarray, doc_offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm, n_docs) minima of a_k * hv + b_k over each document's segment."""
    n_docs = len(doc_offsets) - 1
    out = np.full((len(a), n_docs), EMPTY_VALUE, dtype=np.uint32)
    nonempty = np.flatnonzero(doc_offsets[1:] > doc_offsets[:-1])
    if not len(nonempty):
        return out
    starts = doc_offsets[nonempty]
    # Cut the non-empty documents into groups of about _CHUNK_SHINGLES shingles.
    cuts = np.searchsorted(starts, np.arange(0, int(doc_offsets[-1]), _CHUNK_SHINGLES), side="left")
    cuts = np.unique(np.concatenate((cuts, [len(nonempty)])))
    a_list, b_list = a.tolist(), b.tolist()
    for g0, g1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        if g0 == g1:
            continue
        docs = nonempty[g0:g1]
        lo, hi = int(doc_offsets[docs[0]]), int(doc_offsets[docs[-1] + 1])
        seg = hv[lo:hi]
        seg_starts = doc_offsets[docs] - lo
        tmp = np.empty(hi - lo, dtype=np.uint32)
        block = out[:, docs[0] : docs[-1] + 1]
        rel = docs - docs[0]
        contiguous = len(docs) == docs[-1] - docs[0] + 1
        for k, (ak, bk) in enumerate(zip(a_list, b_list)):
            np.multiply(seg, ak, out=tmp)
            tmp += bk
            if contiguous:
                np.minimum.reduceat(tmp, seg_starts, out=block[k])
            else:
                block[k, rel] = np.minimum.reduceat(tmp, seg_starts)
    return out


def shingle_hashes(batch: WordBatch, k: int, hash_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint32 :func:`shingle_hash` of every shingle of a batch, and the per-text offsets."""
    wh = xxh32_spans(batch.buffer, batch.start, batch.stop, hash_seed)
    word_offsets = batch.doc_offsets
    per_doc = np.diff(word_offsets)
    n_sh = np.where(per_doc >= k, per_doc - k + 1, np.minimum(per_doc, 1))
    offsets = np.zeros(len(per_doc) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=offsets[1:])
    total, n_words = int(offsets[-1]), len(wh)
    out = np.empty(total, dtype=np.uint32)
    if total == 0:
        return out, offsets
    first = np.arange(total, dtype=np.int64)
    first += np.repeat(word_offsets[:-1] - offsets[:-1], n_sh)
    if n_words >= k:
        # Window hash at every word position (windows across texts are dropped below).
        width = n_words - k + 1
        window = wh[:width] * np.uint32(pow(WORD_MULTIPLIER, k - 1, 1 << 32))
        for j in range(1, k):
            window += wh[j : j + width] * np.uint32(pow(WORD_MULTIPLIER, k - 1 - j, 1 << 32))
        full = np.flatnonzero(np.repeat(per_doc >= k, n_sh))
        out[full] = window[first[full]] if len(full) < total else window[first]
    short_docs = np.flatnonzero((per_doc > 0) & (per_doc < k))
    if len(short_docs):  # one shingle of all m < k words, by Horner's rule
        h = np.zeros(len(short_docs), dtype=np.uint32)
        base, m = word_offsets[short_docs], per_doc[short_docs]
        for j in range(k - 1):
            live = m > j
            h[live] = h[live] * np.uint32(WORD_MULTIPLIER) + wh[base[live] + j]
        out[offsets[short_docs]] = h
    return out, offsets


def _signatures_batch(texts: Sequence[str], params: MinHashParams) -> np.ndarray:
    a, b = params.permutations()  # first: keyed parameters without their key fail before any work
    hv, offsets = shingle_hashes(tokenize_batch(texts), params.shingle_size, params.word_seed)
    return _min_per_doc(fmix32(hv), offsets, a, b).T


def minhash_signatures(
    texts: Sequence[str], params: MinHashParams = MinHashParams(), *, batch_size: int = 1024, workers: int = 1
) -> np.ndarray:
    """uint32 (len(texts), num_perm) signatures; ``workers`` threads share the numpy work."""
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of strings, not one string; wrap it in a list")
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    n = len(texts)
    out = np.empty((n, params.num_perm), dtype=np.uint32)
    ranges = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]

    def run(r: tuple[int, int]) -> None:
        out[r[0] : r[1]] = _signatures_batch(texts[r[0] : r[1]], params)

    if workers == 1 or len(ranges) < 2:
        for r in ranges:
            run(r)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, ranges))
    return out


def datasketch_minhash(text: str, params: MinHashParams = MinHashParams()):
    """The same signature built the ordinary way, with ``datasketch.MinHash`` (the reference):
    the parameters' permutations (keyed or seeded) and the word hash under their word seed."""
    from datasketch import MinHash

    m = MinHash(num_perm=params.num_perm, seed=params.seed, scheme=_SCHEME, permutations=params.permutations(),
                hashfunc=functools.partial(shingle_hash, hash_seed=params.word_seed))
    m.update_batch([s.encode("utf-8") for s in shingles(text, params.shingle_size)])
    return m


def estimate_jaccard(sig: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Fraction of equal entries between one signature and each row of ``others``."""
    return (np.asarray(others) == np.asarray(sig)[None, :]).mean(axis=1)


def is_empty_signature(sig: np.ndarray) -> np.ndarray:
    return np.all(np.asarray(sig) == EMPTY_VALUE, axis=-1)
