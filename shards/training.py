"""Sliced SISA training of one shard's sub-model, with a checkpoint after every slice.

A shard's records are split into R slices. Slice r trains on the cumulative set
``D_0 ∪ … ∪ D_r`` for ``E_r`` epochs, then writes checkpoint r. With equal slices
of size n/R, the paper's schedule ``E_r = 2e/(R+1)`` makes the samples processed

    Σ_r E_r · (r+1)·n/R = 2e/(R+1) · n/R · R(R+1)/2 = e·n,

the same as e epochs over the whole shard (``SliceSchedule.paper``; a fractional
E ends with a partial pass, so only the rounding of that pass's length remains).

Exactness rests on one rule: nothing that slice r does depends on records of a
later slice. The initial weights depend on (seed, shard), the batch order of
epoch t of slice r is ``randperm(|D_0..r|)`` from a generator seeded with
(seed, shard, r, t), applied to the cumulative set in training order. So
removing a record of slice k leaves checkpoints 0..k-1 bitwise unchanged, and
training k..R-1 from checkpoint k-1 is training from scratch without the record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from shards.checkpoints import CheckpointRef, CheckpointStore, chain_next, chain_root
from shards.device import Runtime, deterministic_mode, resolve_runtime
from shards.families import ModelFamily, family_named
from shards.model import ModelSpec, build_model

from shards.schedule import (  # noqa: F401  (re-exported: their home before shards.schedule)
    DEFAULT_SCHEDULE, OPTIMIZERS, SCHEDULE_KINDS, TRAINING_ALGORITHM, SliceSchedule, TrainConfig,
)


class EmptyShardError(ValueError):
    """A shard with no trainable records has no sub-model; the ensemble drops it (see ``shards.retrain``)."""


class UnknownRecordIdsError(ValueError):
    """Record ids asked to be removed are not in the shard."""

    def __init__(self, shard_id: str, missing: Sequence[str]) -> None:
        self.shard_id = shard_id
        self.missing = tuple(missing)
        shown = ", ".join(self.missing[:10]) + (", …" if len(self.missing) > 10 else "")
        super().__init__(
            f"{len(self.missing)} record id(s) are not in shard {shard_id}: {shown}; "
            "locate the records' shard first, or pass only ids read from this shard version"
        )




@dataclass(frozen=True, eq=False)
class ShardData:
    """One shard version's training columns, rows in training order (any order is kept as given).

    ``untrained_ids`` are records of the shard version that carry no label: they
    are part of the shard (removing them is valid) but no sub-model sees them.
    """

    shard_id: str
    record_ids: tuple[str, ...]
    slices: np.ndarray  # int32 (n,)
    features: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int64 (n,)
    untrained_ids: tuple[str, ...] = field(default=())
    texts: tuple[str, ...] = field(default=())  # one per record when a text family trains on it, else empty

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_id", str(self.shard_id))
        object.__setattr__(self, "record_ids", tuple(str(r) for r in self.record_ids))
        object.__setattr__(self, "untrained_ids", tuple(str(r) for r in self.untrained_ids))
        object.__setattr__(self, "texts", tuple(str(t) for t in self.texts))
        n = len(self.record_ids)
        if self.texts and len(self.texts) != n:
            raise ValueError(f"shard {self.shard_id}: {n} record ids but {len(self.texts)} texts; give one per record")
        slices = np.array(self.slices, dtype=np.int32, copy=True).reshape(-1)
        labels = np.array(self.labels, dtype=np.int64, copy=True).reshape(-1)
        features = np.array(self.features, dtype=np.float32, copy=True, order="C")
        if features.ndim == 1 and n == 0:
            features = features.reshape(0, 0)
        if features.ndim != 2 or features.shape[0] != n or slices.shape[0] != n or labels.shape[0] != n:
            raise ValueError(
                f"shard {self.shard_id}: {n} record ids but slices {slices.shape}, labels {labels.shape}, "
                f"features {features.shape}; give one row per record and a (n, d) feature matrix"
            )
        if len(set(self.record_ids) | set(self.untrained_ids)) != n + len(self.untrained_ids):
            raise ValueError(f"shard {self.shard_id}: record ids must be unique; deduplicate the shard version")
        object.__setattr__(self, "slices", slices)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "features", features)

    @property
    def num_records(self) -> int:
        return len(self.record_ids)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def all_ids(self) -> frozenset[str]:
        return frozenset(self.record_ids) | frozenset(self.untrained_ids)

    def without(self, removed_ids: Iterable[str]) -> ShardData:
        """The same shard with ``removed_ids`` filtered out, order of the rest kept (what erasure writes)."""
        removed = set(removed_ids)
        missing = sorted(removed - self.all_ids())
        if missing:
            raise UnknownRecordIdsError(self.shard_id, missing)
        keep = np.fromiter((rid not in removed for rid in self.record_ids), dtype=bool, count=self.num_records)
        return ShardData(
            shard_id=self.shard_id,
            record_ids=tuple(rid for rid, k in zip(self.record_ids, keep) if k),
            slices=self.slices[keep],
            features=self.features[keep],
            labels=self.labels[keep],
            untrained_ids=tuple(rid for rid in self.untrained_ids if rid not in removed),
            texts=tuple(t for t, k in zip(self.texts, keep) if k) if self.texts else (),
        )

    def training_order(self) -> np.ndarray:
        """Row indices sorted by slice, ties in row order: the cumulative set D_0..r is a prefix of it."""
        return np.argsort(self.slices, kind="stable")

    def cumulative_sizes(self, num_slices: int) -> list[int]:
        counts = np.bincount(self.slices, minlength=num_slices)[:num_slices]
        return [int(c) for c in np.cumsum(counts)]


def shard_from_table(table: pa.Table, shard_id: str | int, *, unlabeled: str = "error",
                     texts: bool = False) -> ShardData:
    """Adapter from a shard version table (``record_id, slice, label, features`` columns).

    Rows with a null label fail by default; ``unlabeled="skip"`` keeps them as
    untrained records of the shard instead, ``unlabeled="zero"`` trains them with
    label 0 (for a family that ignores labels, such as ``lm``). ``texts`` also reads
    the ``text`` column (for a family with ``uses_texts``).
    """
    needed = ("record_id", "slice", "label", "features")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"shard table lacks column(s) {missing}; write it with shards.store.build_shard_table")
    if unlabeled not in ("error", "skip", "zero"):
        raise ValueError(f"unlabeled must be 'error', 'skip' or 'zero', got {unlabeled!r}")
    if texts and "text" not in table.column_names:
        raise ValueError("shard table lacks the text column a text family trains on; read it with texts=True")
    null_labels = table["label"].null_count
    untrained: tuple[str, ...] = ()
    if null_labels and unlabeled == "zero":
        table = table.set_column(table.column_names.index("label"), "label", pc.fill_null(table["label"], 0))
    elif null_labels:
        if unlabeled == "error":
            raise ValueError(
                f"shard {shard_id}: {null_labels} record(s) have no label; label them or pass unlabeled='skip'"
            )
        is_null = pc.is_null(table["label"])
        untrained = tuple(pc.filter(table["record_id"], is_null).to_pylist())
        table = table.filter(pc.invert(is_null))
    features_type = table.schema.field("features").type
    if not pa.types.is_fixed_size_list(features_type):
        raise ValueError(f"features must be fixed_size_list<float32>[d], got {features_type}")
    dim = features_type.list_size
    flat = table["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ShardData(
        shard_id=str(shard_id),
        record_ids=tuple(table["record_id"].to_pylist()),
        slices=table["slice"].to_numpy(),
        features=np.asarray(flat, dtype=np.float32).reshape(table.num_rows, dim),
        labels=table["label"].to_numpy(),
        untrained_ids=untrained,
        texts=tuple(table["text"].to_pylist()) if texts else (),
    )


def shard_for_config(path: Path | str, shard_id: str | int, config: TrainConfig) -> ShardData:
    """A shard version read with the columns its family trains on: texts for a text family, unlabelled
    records kept as untrained (or, for a family that ignores labels, trained with label 0)."""
    family = family_named(config.model.family)
    return shard_from_parquet(path, shard_id, unlabeled="skip" if family.uses_labels else "zero",
                              texts=family.uses_texts)


def shard_from_parquet(path: Path | str, shard_id: str | int, *, unlabeled: str = "error",
                       texts: bool = False) -> ShardData:
    columns = ["record_id", "slice", "label", "features"] + (["text"] if texts else [])
    table = pq.read_table(path, columns=columns)
    return shard_from_table(table, shard_id, unlabeled=unlabeled, texts=texts)


@dataclass(frozen=True)
class CostReport:
    """What one training or retraining of a shard cost.

    ``full_training_samples`` is what training this shard's current data from
    scratch costs, so ``measured_fraction`` = samples_processed / that.
    """

    shard_id: str
    device: str
    samples_processed: int
    epochs_run: float
    slices_trained: tuple[int, ...]
    wall_seconds: float
    full_training_samples: int
    slice_seconds: tuple[float, ...] = ()  # wall time of each trained slice, in ``slices_trained`` order

    @property
    def measured_fraction(self) -> float:
        return self.samples_processed / self.full_training_samples if self.full_training_samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "device": self.device,
            "samples_processed": self.samples_processed,
            "epochs_run": self.epochs_run,
            "slices_trained": list(self.slices_trained),
            "wall_seconds": self.wall_seconds,
            "full_training_samples": self.full_training_samples,
            "measured_fraction": self.measured_fraction,
            "slice_seconds": list(self.slice_seconds),
        }


@dataclass(frozen=True)
class TrainResult:
    """The checkpoints a training wrote (and the one it resumed from), and its cost."""

    shard_id: str
    final: CheckpointRef
    written: tuple[CheckpointRef, ...]
    restored_from: CheckpointRef | None
    cost: CostReport
    runtime: Runtime


def checkpoint_chain(shard: ShardData, config: TrainConfig) -> list[str]:
    """The content addresses ``key_0..key_{R-1}`` of the shard's checkpoints (see ``shards.checkpoints``)."""
    order = shard.training_order()
    key = chain_root(config.digest, shard.shard_id)
    with_texts = family_named(config.model.family).uses_texts
    keys = []
    for r in range(config.num_slices):
        rows = order[shard.slices[order] == r]
        key = chain_next(key, r, _slice_digest(shard, rows, with_texts))
        keys.append(key)
    return keys


def latest_stored(keys: Sequence[str], store: CheckpointStore) -> int:
    """The highest r whose checkpoint ``keys[r]`` is stored, or -1 (start from the initial weights)."""
    for r in range(len(keys) - 1, -1, -1):
        if store.exists(keys[r]):
            return r
    return -1


def check_compatible(shard: ShardData, config: TrainConfig) -> None:
    """Fail early, with the fix, when the shard cannot train under ``config`` (then the family's own checks)."""
    if shard.num_records:
        bad_slice = (shard.slices < 0) | (shard.slices >= config.num_slices)
        if bad_slice.any():
            raise ValueError(
                f"shard {shard.shard_id} has slice numbers outside 0..{config.num_slices - 1} "
                f"(e.g. {int(shard.slices[bad_slice][0])}); give the schedule one entry per slice"
            )
    family_named(config.model.family).check(shard, config.model)


def train_shard(
    shard: ShardData,
    config: TrainConfig,
    store: CheckpointStore,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    resume: bool = True,
    on_checkpoint: Callable[[CheckpointRef], None] | None = None,
) -> TrainResult:
    """Train the shard's sub-model slice by slice, writing checkpoint r after slice r.

    With ``resume`` (the default) training starts after the latest checkpoint
    already stored for this exact data and config, so a crashed run or a
    retraining without some records redoes only what changed. ``on_checkpoint``
    is called after each checkpoint is durably written.
    """
    check_compatible(shard, config)
    if shard.num_records == 0:
        raise EmptyShardError(
            f"shard {shard.shard_id} has no trainable records, so it has no sub-model; drop it from the ensemble"
        )
    keys = checkpoint_chain(shard, config)
    start = latest_stored(keys, store) + 1 if resume else 0
    return train_slices(
        shard, config, store, keys, start, device=device, threads=threads, on_checkpoint=on_checkpoint
    )


def train_slices(
    shard: ShardData,
    config: TrainConfig,
    store: CheckpointStore,
    keys: Sequence[str],
    start: int,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    on_checkpoint: Callable[[CheckpointRef], None] | None = None,
) -> TrainResult:
    """Train slices ``start..R-1`` from checkpoint ``keys[start-1]`` (the initial weights when start = 0).

    ``keys`` must be ``checkpoint_chain(shard, config)``; ``train_shard`` is the checked entry point.
    """
    runtime = resolve_runtime(device, threads)
    restored = store.ref(keys[start - 1]) if start > 0 else None
    sizes = shard.cumulative_sizes(config.num_slices)
    full_samples = config.schedule.samples(sizes)
    began = time.perf_counter()
    written: list[CheckpointRef] = []
    slice_seconds: list[float] = []
    samples = 0
    with deterministic_mode(runtime) as dev, torch.random.fork_rng(devices=_cuda_devices(dev)):
        family = family_named(config.model.family)
        model, optimizer = _initial_state(config, shard.shard_id, dev)
        if restored is not None:
            _restore_state(family, store.load(restored), model, optimizer)
        order = shard.training_order()
        columns = family.columns(shard, config.model, dev)
        for r in range(start, config.num_slices):
            rows = torch.from_numpy(order[: sizes[r]].astype(np.int64))
            slice_began = time.perf_counter()
            passes = config.schedule.passes(r, sizes[r])
            model.train()
            family.train_slice(model, optimizer, _slice_batches(columns, rows, passes, config, shard.shard_id, r, dev))
            slice_samples = sum(passes)
            samples += slice_samples
            _synchronize(dev)
            slice_seconds.append(time.perf_counter() - slice_began)
            payload = {
                "shard_id": shard.shard_id,
                "slice_index": r,
                "num_slices": config.num_slices,
                "parent": keys[r - 1] if r else chain_root(config.digest, shard.shard_id),
                "config": config.to_dict(),
                "config_digest": config.digest,
                "seen_ids": [shard.record_ids[i] for i in order[: sizes[r]]],
                "slice_sizes": [sizes[0]] + [sizes[j] - sizes[j - 1] for j in range(1, r + 1)],
                **family.state(model, optimizer),
                "rng_state": _rng_state(dev),
                "runtime": runtime.to_dict(),
                "cost": {
                    "samples_processed": slice_samples,
                    "epochs": config.schedule.epochs[r],
                    "wall_seconds": slice_seconds[-1],
                },
            }
            ref = store.save(keys[r], payload)
            written.append(ref)
            if on_checkpoint is not None:
                on_checkpoint(ref)
    cost = CostReport(
        shard_id=shard.shard_id,
        device=runtime.device,
        samples_processed=samples,
        epochs_run=sum(config.schedule.epochs[start:]),
        slices_trained=tuple(range(start, config.num_slices)),
        wall_seconds=time.perf_counter() - began,
        full_training_samples=full_samples,
        slice_seconds=tuple(slice_seconds),
    )
    final = written[-1] if written else restored
    assert final is not None
    return TrainResult(shard.shard_id, final, tuple(written), restored, cost, runtime)


def load_submodel(
    store: CheckpointStore, checkpoint: CheckpointRef | str, device: str | torch.device = "cpu"
) -> tuple[nn.Module, TrainConfig]:
    """The sub-model stored in a checkpoint, in eval mode, with the config that trained it."""
    payload = store.load(checkpoint)
    config = TrainConfig.from_dict(payload["config"])
    model = build_model(config.model, 0, device)
    family_named(config.model.family).load_state(payload, model)
    model.eval()
    return model, config


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts (e.g. seed, shard, 'shuffle', slice, epoch); no global RNG involved."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _initial_state(config: TrainConfig, shard_id: str, device: torch.device):
    model = build_model(config.model, derive_seed(config.seed, shard_id, "init"), device)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay
        )
    return model, optimizer


def _restore_state(family: ModelFamily, payload: dict[str, Any], model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> None:
    family.load_state(payload, model, optimizer)
    torch.set_rng_state(payload["rng_state"]["cpu"])
    if payload["rng_state"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(payload["rng_state"]["cuda"])


def _slice_batches(
    columns: dict[str, torch.Tensor], rows: torch.Tensor, passes: list[int], config: TrainConfig, shard_id: str,
    r: int, device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of slice r: pass t visits the first ``passes[t]`` of the cumulative set ``rows`` in an order
    fixed by (seed, shard, slice, t) and |rows| alone. Layers' RNG is seeded when a pass begins (lazily, so the
    family's step for the pass's first batch runs after it, as in one loop)."""
    for epoch, visits in enumerate(passes):
        shuffle = torch.Generator().manual_seed(derive_seed(config.seed, shard_id, "shuffle", r, epoch))
        order = rows[torch.randperm(len(rows), generator=shuffle)[:visits]].to(device)
        _seed_layers(device, derive_seed(config.seed, shard_id, "layers", r, epoch))  # dropout and similar layers
        for begin in range(0, len(order), config.batch_size):
            batch = order[begin : begin + config.batch_size]
            yield {name: column[batch] for name, column in columns.items()}


def _slice_digest(shard: ShardData, rows: np.ndarray, with_texts: bool = False) -> str:
    """sha256 over the slice's ids (length-prefixed), labels and feature bytes, in training order
    (and the texts, length-prefixed, for a family that trains on them)."""
    encoded = [shard.record_ids[i].encode() for i in rows]
    digest = hashlib.sha256()
    digest.update(len(rows).to_bytes(8, "little"))
    digest.update(np.array([len(e) for e in encoded], dtype="<u4").tobytes())
    digest.update(b"".join(encoded))
    digest.update(np.ascontiguousarray(shard.labels[rows], dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(shard.features[rows], dtype="<f4").tobytes())
    if with_texts:
        if not shard.texts:
            raise ValueError(f"shard {shard.shard_id} was read without texts; a text family needs them (texts=True)")
        texts = [shard.texts[i].encode() for i in rows]
        digest.update(np.array([len(t) for t in texts], dtype="<u8").tobytes())
        digest.update(b"".join(texts))
    return digest.hexdigest()


def _seed_layers(device: torch.device, seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
