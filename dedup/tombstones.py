"""Tombstones: the MinHash signatures of erased records, to keep their content from coming back.

An erased record leaves no text behind, only its signature (``num_perm`` uint32
minima of hashed shingles, from which the text cannot be read back) and an
opaque key chosen by the caller (e.g. the erasure request id). A new text is
screened by its own signature: candidates share an LSH band with a tombstone,
and the fraction of equal signature entries estimates the Jaccard similarity
(standard error ``sqrt(J (1 - J) / num_perm)``, about 0.035 at J = 0.8 with 128
permutations). Without the erased text there is no exact check, so the default
``min_jaccard`` of 0.7 sits about three standard errors below the erase
threshold: a re-ingested copy at J >= 0.8 is flagged, and the caller decides
with the estimate.

Tombstones are kept only under **keyed** MinHash parameters
(:meth:`dedup.minhash.MinHashParams.keyed`): with seeded permutations anyone
holding the file could hash a guessed text and confirm that it was erased.
Under a key, only the key holder can screen; the file stores the key's
fingerprint, never the key. What stays visible without the key: how many
tombstones there are and how similar they are to each other (equal entries),
not what any of them said.

File format 2 (``.npz``): ``signatures``, ``keys``, ``meta`` (format, keyed
MinHash parameters). Format 1 files were unkeyed; they are refused
(:class:`UnkeyedTombstones`), never read as if they were keyed: their signatures
cannot be re-keyed because the erased texts are gone.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedup.lsh import DEFAULT_MAX_MISS, BandIndex, choose_params
from dedup.minhash import (
    MinHashKeyMismatch,
    MinHashParams,
    estimate_jaccard,
    is_empty_signature,
    minhash_signatures,
)
from dedup.policy import DEFAULT_SCREEN_JACCARD  # noqa: F401  (re-exported: defined with the other thresholds)

_FORMAT = 2
_UNKEYED_FORMAT = 1


class UnkeyedTombstones(ValueError):
    """A tombstone file of format 1: seeded (unkeyed) signatures, which confirm guessed texts."""

    def __init__(self, path: str | Path, count: int) -> None:
        self.path, self.count = Path(path), count
        super().__init__(f"{path} holds {count} unkeyed tombstones (format {_UNKEYED_FORMAT}): anyone with the file "
                         "can confirm a guessed erased text. They cannot be re-keyed (the texts are gone); "
                         "drop them explicitly to continue")


def _require_keyed(minhash: MinHashParams) -> None:
    if not minhash.is_keyed:
        raise ValueError("tombstones are kept only under keyed MinHash parameters (MinHashParams.keyed(key)): "
                         "seeded signatures would confirm a guessed erased text to anyone holding the file")


@dataclass(frozen=True)
class TombstoneHit:
    text_index: int  # position of the screened text
    key: str  # the tombstone's key
    estimated_jaccard: float

    def to_dict(self) -> dict:
        return {"text_index": self.text_index, "key": self.key,
                "estimated_jaccard": round(float(self.estimated_jaccard), 4)}


@dataclass(frozen=True, eq=False)
class TombstoneSet:
    """Signatures of erased records; ``added`` returns a new set, files are replaced atomically."""

    minhash: MinHashParams
    signatures: np.ndarray  # uint32 (m, num_perm)
    keys: tuple[str, ...]

    def __post_init__(self) -> None:
        _require_keyed(self.minhash)

    @classmethod
    def empty(cls, minhash: MinHashParams) -> TombstoneSet:
        """No tombstones yet, under the keyed parameters ``minhash``."""
        return cls(minhash, np.zeros((0, minhash.num_perm), dtype=np.uint32), ())

    def __len__(self) -> int:
        return len(self.keys)

    def added(self, signatures: np.ndarray, keys: Sequence[str], minhash: MinHashParams) -> TombstoneSet:
        """This set plus ``signatures`` (empty signatures, of texts without words, are skipped)."""
        if minhash != self.minhash:
            raise ValueError(f"tombstones use {self.minhash}, the new signatures {minhash}; "
                             "signatures are comparable only under the same parameters")
        sig = np.asarray(signatures, dtype=np.uint32).reshape(-1, self.minhash.num_perm)
        if len(sig) != len(keys):
            raise ValueError(f"{len(sig)} signatures but {len(keys)} keys")
        if any(not isinstance(k, str) or not k for k in keys):
            raise ValueError("tombstone keys must be non-empty strings (e.g. the erasure request id)")
        live = ~is_empty_signature(sig)
        return TombstoneSet(self.minhash, np.concatenate((self.signatures, sig[live])),
                            self.keys + tuple(k for k, ok in zip(keys, live.tolist()) if ok))

    def screen(self, texts: Sequence[str], min_jaccard: float = DEFAULT_SCREEN_JACCARD,
               max_miss: float = DEFAULT_MAX_MISS) -> list[TombstoneHit]:
        """Texts whose estimated Jaccard with a tombstone is at least ``min_jaccard``, best first per text."""
        if isinstance(texts, str):
            raise ValueError("screen takes a sequence of texts; wrap a single text in a list")
        if not 0.0 < min_jaccard < 1.0:
            raise ValueError(f"min_jaccard must be in (0, 1), got {min_jaccard}")
        if len(self) == 0 or len(texts) == 0:
            return []
        return self.screen_signatures(minhash_signatures(texts, self.minhash), min_jaccard, max_miss)

    def screen_signatures(self, signatures: np.ndarray, min_jaccard: float = DEFAULT_SCREEN_JACCARD,
                          max_miss: float = DEFAULT_MAX_MISS) -> list[TombstoneHit]:
        """Like :meth:`screen`, for signatures computed already (e.g. at ingest)."""
        if len(self) == 0:
            return []
        index = self._band_index(min_jaccard, max_miss)
        hits = []
        for i, rows in enumerate(index.candidates(signatures)):
            if not len(rows):
                continue
            est = estimate_jaccard(signatures[i], self.signatures[rows])
            for r, j in sorted(zip(rows.tolist(), est.tolist()), key=lambda p: -p[1]):
                if j >= min_jaccard:
                    hits.append(TombstoneHit(i, self.keys[r], j))
        return hits

    def _band_index(self, min_jaccard: float, max_miss: float) -> BandIndex:
        cache = self.__dict__.setdefault("_bands", {})
        key = (min_jaccard, max_miss)
        if key not in cache:
            cache[key] = BandIndex.build(self.signatures, choose_params(min_jaccard, self.minhash.num_perm, max_miss))
        return cache[key]

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        """One ``.npz`` document (signatures, keys, parameters); the caller writes it atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, signatures=self.signatures, keys=np.array(self.keys, dtype=str),
                 meta=np.array(json.dumps({"format": _FORMAT, "minhash": self.minhash.to_dict()})))
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path, minhash: MinHashParams) -> TombstoneSet:
        """The file's tombstones, screened under ``minhash`` (keyed, holding the key the file was written under).

        :class:`UnkeyedTombstones` for a format 1 file; :class:`MinHashKeyMismatch`
        when the file was written under another key."""
        _require_keyed(minhash)
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") == _UNKEYED_FORMAT:
                raise UnkeyedTombstones(path, int(data["keys"].size))
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} has tombstone format {meta.get('format')}, this version reads {_FORMAT}")
            stored = MinHashParams.from_dict(meta["minhash"])
            if stored != minhash:
                raise MinHashKeyMismatch(f"{path} was written under MinHash key {stored.key_id} ({stored.num_perm} "
                                         f"permutations), not {minhash.key_id} ({minhash.num_perm}): "
                                         "restore the original secret key")
            keys = tuple(data["keys"].tolist()) if data["keys"].size else ()
            return cls(minhash, np.array(data["signatures"], dtype=np.uint32), keys)
