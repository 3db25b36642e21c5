"""The SISA ensemble: one sub-model per shard, aggregated at prediction time.

An ``EnsembleVersion`` is an immutable manifest naming, for every shard, the
checkpoint its sub-model came from (key and sha256). Retraining a shard makes a
new version with that one member replaced; the old manifest and its
checkpoints stay usable, so a crash during retraining never breaks serving.

Aggregation, for sub-model probabilities ``p_s(y|x)``, s = 1..S:

* ``mean_prob`` (default): ``argmax_y (1/S) Σ_s p_s(y|x)``. It uses each
  sub-model's confidence and does not tie (a vote of 8 sub-models over 6
  labels can); on 100k demo records the two agree within 0.1 point, mean_prob
  marginally ahead (``benchmarks/bench_sisa.py`` reports both).
* ``vote``: ``argmax_y #{s : argmax p_s = y}``, the label aggregation of
  Bourtoule et al.; use it when only labels may leave the sub-models or their
  probabilities are badly calibrated. Ties go to the label with the higher
  mean probability, then the lower label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.checkpoints import CheckpointRef, CheckpointStore
from shards.device import choose_device
from shards.files import write_atomically
from shards.training import TrainConfig, TrainResult, load_submodel

AGGREGATIONS = ("mean_prob", "vote")
DEFAULT_AGGREGATION = "mean_prob"
MANIFEST_FORMAT = "sisa-ensemble/1"


@dataclass(frozen=True)
class EnsembleMember:
    shard_id: str
    checkpoint: CheckpointRef


@dataclass(frozen=True)
class EnsembleVersion:
    """Which checkpoint each shard's sub-model is; ``version_id`` hashes exactly that."""

    members: tuple[EnsembleMember, ...]
    aggregation: str = DEFAULT_AGGREGATION
    parent: str | None = None
    notes: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        ordered = tuple(sorted(self.members, key=lambda m: m.shard_id))
        ids = [m.shard_id for m in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError(f"an ensemble holds one sub-model per shard; shard ids repeat in {ids}")
        object.__setattr__(self, "members", ordered)

    @classmethod
    def from_results(cls, results: Iterable[TrainResult], aggregation: str = DEFAULT_AGGREGATION) -> EnsembleVersion:
        return cls(tuple(EnsembleMember(r.shard_id, r.final) for r in results), aggregation)

    @property
    def version_id(self) -> str:
        body = {
            "aggregation": self.aggregation,
            "members": [[m.shard_id, m.checkpoint.key, m.checkpoint.sha256] for m in self.members],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(m.shard_id for m in self.members)

    def with_member(self, shard_id: str, checkpoint: CheckpointRef | None) -> EnsembleVersion:
        """A new version with shard ``shard_id``'s sub-model replaced (``None``: dropped, the shard was emptied)."""
        shard_id = str(shard_id)
        if checkpoint is not None and checkpoint.shard_id != shard_id:
            raise ValueError(f"checkpoint {checkpoint.key} is of shard {checkpoint.shard_id}, not {shard_id}")
        kept = [m for m in self.members if m.shard_id != shard_id]
        if checkpoint is not None:
            kept.append(EnsembleMember(shard_id, checkpoint))
        return EnsembleVersion(tuple(kept), self.aggregation, parent=self.version_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version_id": self.version_id,
            "parent": self.parent,
            "aggregation": self.aggregation,
            "members": [{"shard_id": m.shard_id, "checkpoint": m.checkpoint.to_dict()} for m in self.members],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleVersion:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest (format {data.get('format')!r})")
        version = cls(
            tuple(
                EnsembleMember(str(m["shard_id"]), CheckpointRef.from_dict(m["checkpoint"])) for m in data["members"]
            ),
            data["aggregation"],
            data.get("parent"),
            dict(data.get("notes", {})),
        )
        if data.get("version_id") not in (None, version.version_id):
            raise ValueError("manifest version_id does not match its members: the file was edited or corrupted")
        return version

    def write(self, path: Path | str) -> Path:
        """Write the manifest atomically (temp file, fsync, ``os.replace``)."""
        return write_atomically(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())

    @classmethod
    def read(cls, path: Path | str) -> EnsembleVersion:
        return cls.from_dict(json.loads(Path(path).read_text()))


def training_ids(version: EnsembleVersion, store: CheckpointStore) -> frozenset[str]:
    """Every record id any sub-model of ``version`` was trained on (the verification manifest)."""
    seen: set[str] = set()
    for member in version.members:
        seen.update(store.load(member.checkpoint)["seen_ids"])
    return frozenset(seen)


def aggregate(probabilities: np.ndarray, method: str = DEFAULT_AGGREGATION) -> np.ndarray:
    """Labels from stacked sub-model probabilities ``(S, n, C)`` by ``mean_prob`` or ``vote``."""
    if probabilities.ndim != 3 or probabilities.shape[0] == 0:
        raise ValueError(f"expected probabilities of shape (S, n, C) with S >= 1, got {probabilities.shape}")
    mean = probabilities.mean(axis=0)
    if method == "mean_prob":
        return mean.argmax(axis=1)
    if method == "vote":
        num_classes = probabilities.shape[2]
        votes = probabilities.argmax(axis=2)  # (S, n)
        counts = np.stack([(votes == c).sum(axis=0) for c in range(num_classes)], axis=1)  # (n, C)
        tied = counts == counts.max(axis=1, keepdims=True)
        return np.where(tied, mean, -np.inf).argmax(axis=1)
    raise ValueError(f"unknown aggregation {method!r}; use one of {AGGREGATIONS}")


@dataclass(frozen=True)
class EnsembleEvaluation:
    records: int
    accuracy: dict[str, float]  # by aggregation method
    member_accuracy: dict[str, float]  # by shard id
    default: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "accuracy": self.accuracy,
            "member_accuracy": self.member_accuracy,
            "default": self.default,
        }


class Ensemble:
    """The loaded sub-models of one ``EnsembleVersion``, ready to predict."""

    def __init__(self, version: EnsembleVersion, store: CheckpointStore, device: str | torch.device | None = None):
        if not version.members:
            raise ValueError("the ensemble version has no sub-models (every shard was emptied); train on new data")
        self.version = version
        self.device = choose_device(device)
        loaded = [load_submodel(store, m.checkpoint, self.device) for m in version.members]
        self.models = [model for model, _ in loaded]
        configs: Sequence[TrainConfig] = [config for _, config in loaded]
        dims = {(c.model.input_dim, c.model.num_classes) for c in configs}
        if len(dims) != 1:
            raise ValueError(f"sub-models disagree on (input_dim, num_classes): {sorted(dims)}; train them alike")
        self.input_dim, self.num_classes = dims.pop()

    def predict_proba(self, features: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Sub-model probabilities, shape ``(S, n, C)``."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(
                f"features must be (n, {self.input_dim}), got {features.shape}; embed with the ingest embedder"
            )
        out = np.empty((len(self.models), features.shape[0], self.num_classes), dtype=np.float32)
        with torch.inference_mode():
            for begin in range(0, features.shape[0], batch_size):
                batch = torch.from_numpy(features[begin : begin + batch_size]).to(self.device)
                for s, model in enumerate(self.models):
                    out[s, begin : begin + batch_size] = torch.softmax(model(batch), dim=1).cpu().numpy()
        return out

    def predict(self, features: np.ndarray, method: str | None = None) -> np.ndarray:
        return aggregate(self.predict_proba(features), method or self.version.aggregation)

    def evaluate(self, features: np.ndarray, labels: np.ndarray) -> EnsembleEvaluation:
        """Accuracy of every aggregation method and of each sub-model alone."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("nothing to evaluate: give at least one held-out record")
        probabilities = self.predict_proba(features)
        if labels.shape != (probabilities.shape[1],):
            raise ValueError(f"need one label per feature row, got {labels.shape} for {probabilities.shape[1]} rows")
        accuracy = {m: float((aggregate(probabilities, m) == labels).mean()) for m in AGGREGATIONS}
        members = {
            shard: float((probabilities[s].argmax(axis=1) == labels).mean())
            for s, shard in enumerate(self.version.shard_ids)
        }
        return EnsembleEvaluation(len(labels), accuracy, members, self.version.aggregation)
