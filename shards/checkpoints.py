"""Content-addressed, atomically written sub-model checkpoints.

A checkpoint's address is a hash chain over everything that determines it:

    key_root = sha256("sisa-chain/1", config_digest, shard_id)
    key_r    = sha256(key_{r-1}, r, digest(records of slice r))

where ``digest`` covers the ids, labels and feature bytes of the slice in
training order. Two trainings reach the same ``key_r`` exactly when they would
compute the same weights after slice r, so a file found under ``key_r`` can be
restored instead of retraining: this is how retraining skips the unaffected
prefix and how a crashed retraining resumes. Files are never overwritten: a
write goes to a temporary file, is fsynced, then ``os.replace``d into place and
the directory fsynced; an existing address is left as it is.

Layout: ``<root>/<key[:2]>/<key>.pt`` (a ``torch.save`` dict, read back with
``weights_only=True``). The ``seen_ids`` list is stored as one UTF-8 JSON byte
tensor: the weights-only unpickler is slow on long lists of strings.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shards.files import sha256_file as _sha256_file
from shards.files import write_atomically

CHECKPOINT_FORMAT = "sisa-checkpoint/1"
CHAIN_FORMAT = "sisa-chain/1"


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint lies and what it holds: the state after ``slice_index`` of a shard."""

    key: str
    path: Path
    sha256: str
    shard_id: str
    slice_index: int
    records_seen: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "path": str(self.path),
            "sha256": self.sha256,
            "shard_id": self.shard_id,
            "slice_index": self.slice_index,
            "records_seen": self.records_seen,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointRef:
        return cls(
            key=str(data["key"]),
            path=Path(data["path"]),
            sha256=str(data["sha256"]),
            shard_id=str(data["shard_id"]),
            slice_index=int(data["slice_index"]),
            records_seen=int(data["records_seen"]),
        )


def chain_root(config_digest: str, shard_id: str) -> str:
    """The address of the untrained initial state of a shard's sub-model (never stored: it is rebuilt from the seed)."""
    return _hash_parts(CHAIN_FORMAT, config_digest, shard_id)


def chain_next(previous_key: str, slice_index: int, slice_digest: str) -> str:
    return _hash_parts(previous_key, str(slice_index), slice_digest)


def _hash_parts(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _encode_ids(ids: list[str]) -> torch.Tensor:
    data = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_ids(tensor: torch.Tensor) -> list[str]:
    return json.loads(tensor.numpy().tobytes().decode())


class CheckpointStore:
    """A directory of checkpoints addressed by their chain key."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"checkpoint key must be 64 lowercase hex digits, got {key!r}")
        return self.root / key[:2] / f"{key}.pt"

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def ref(self, key: str) -> CheckpointRef:
        """The reference of a stored checkpoint (reads it to fill shard, slice and size)."""
        payload = self.load(key)
        return self._ref_of(key, payload, _sha256_file(self.path_for(key)))

    def save(self, key: str, payload: dict[str, Any]) -> CheckpointRef:
        """Store ``payload`` under ``key`` atomically; an existing checkpoint at ``key`` is kept as it is."""
        path = self.path_for(key)
        if path.is_file():
            return self.ref(key)
        payload = {**payload, "format": CHECKPOINT_FORMAT, "key": key}
        stored = dict(payload)
        if "seen_ids" in stored:
            stored["seen_ids"] = _encode_ids(stored["seen_ids"])
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        data = buffer.getvalue()
        write_atomically(path, data)
        return self._ref_of(key, payload, hashlib.sha256(data).hexdigest())

    def load(self, key_or_ref: str | CheckpointRef) -> dict[str, Any]:
        """The stored dict; given a ``CheckpointRef``, the file's sha256 must also match the ref's."""
        key = key_or_ref.key if isinstance(key_or_ref, CheckpointRef) else key_or_ref
        path = self.path_for(key)
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint {key} under {self.root}; train the shard or point at the right store"
            )
        if isinstance(key_or_ref, CheckpointRef):
            actual = _sha256_file(path)
            if actual != key_or_ref.sha256:
                raise ValueError(
                    f"checkpoint {key} has sha256 {actual}, its reference says {key_or_ref.sha256}: "
                    "the file was changed or corrupted; retrain the shard"
                )
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT or payload.get("key") != key:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint for key {key}")
        if isinstance(payload.get("seen_ids"), torch.Tensor):
            payload["seen_ids"] = _decode_ids(payload["seen_ids"])
        return payload

    def _ref_of(self, key: str, payload: dict[str, Any], sha256: str) -> CheckpointRef:
        return CheckpointRef(
            key=key,
            path=self.path_for(key),
            sha256=sha256,
            shard_id=str(payload["shard_id"]),
            slice_index=int(payload["slice_index"]),
            records_seen=len(payload["seen_ids"]),
        )
