"""Training schedules and configurations, and retraining estimates: plain data and arithmetic,
no torch, so that commands which only estimate (``erasure locate``) start fast.
``shards.training`` and ``shards.retrain`` re-export these names."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shards.model import ModelSpec

TRAINING_ALGORITHM = "sisa-train/1"  # bump when the loop changes: it is part of every checkpoint address
OPTIMIZERS = ("adam", "sgd")
SCHEDULE_KINDS = ("equal-samples", "paper")  # how a sub-model's epochs are spread over its slices
DEFAULT_SCHEDULE = "equal-samples"  # the pipeline's default (pipeline.training.TrainingOptions)


@dataclass(frozen=True)
class SliceSchedule:
    """Epochs to train at each slice: ``epochs[r]`` passes over slices 0..r (may be fractional).

    A fractional ``E`` runs ``floor(E)`` full passes and then one pass over the
    first ``round(frac(E)·n)`` records of that pass's shuffled order.
    """

    epochs: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", tuple(float(e) for e in self.epochs))
        if not self.epochs:
            raise ValueError("a schedule needs at least one slice; use SliceSchedule.paper(num_slices, total_epochs)")
        if any(not e >= 0 or math.isinf(e) for e in self.epochs):
            raise ValueError(f"epochs per slice must be finite and >= 0, got {self.epochs}")

    @classmethod
    def paper(cls, num_slices: int, total_epochs: float) -> SliceSchedule:
        """Bourtoule et al.: ``E_r = 2e/(R+1)`` epochs at every slice, e epochs' worth of samples in total."""
        if num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        if not total_epochs > 0:
            raise ValueError(f"total_epochs must be positive, got {total_epochs}")
        return cls(epochs=(2 * total_epochs / (num_slices + 1),) * num_slices)

    @classmethod
    def equal_samples(cls, num_slices: int, total_epochs: float) -> SliceSchedule:
        """Every slice processes the same number of samples, ``E_r = e/(r+1)`` on ``(r+1)·n/R`` records:
        e epochs' worth in total, like the paper's, but retraining from slice i costs ``(R-i)/R`` of the
        shard instead of ``(R-i)(R+i+1)/(R(R+1))``, so a late slice is cheap to retrain. Slice r's records
        are visited ``Σ_{j>=r} E_j`` times: the last slice's least (the accuracy cost, see the README)."""
        if num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        if not total_epochs > 0:
            raise ValueError(f"total_epochs must be positive, got {total_epochs}")
        return cls(epochs=tuple(total_epochs / (r + 1) for r in range(num_slices)))

    @classmethod
    def named(cls, kind: str, num_slices: int, total_epochs: float) -> SliceSchedule:
        """The schedule called ``kind`` (one of ``SCHEDULE_KINDS``)."""
        if kind == "paper":
            return cls.paper(num_slices, total_epochs)
        if kind == "equal-samples":
            return cls.equal_samples(num_slices, total_epochs)
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")

    @property
    def num_slices(self) -> int:
        return len(self.epochs)

    def passes(self, r: int, size: int) -> list[int]:
        """Records visited by each pass of slice r over a cumulative set of ``size`` records."""
        full = math.floor(self.epochs[r])
        partial = round((self.epochs[r] - full) * size)
        return [size] * full + ([partial] if partial else [])

    def samples(self, cumulative_sizes: Sequence[int], first_slice: int = 0) -> int:
        """Samples processed training slices ``first_slice..R-1``: ``Σ_r E_r · |D_0..r|``."""
        return sum(sum(self.passes(r, int(cumulative_sizes[r]))) for r in range(first_slice, self.num_slices))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a sub-model's weights besides its data; hashed into checkpoint addresses."""

    model: ModelSpec
    schedule: SliceSchedule
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def num_slices(self) -> int:
        return self.schedule.num_slices

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": TRAINING_ALGORITHM,
            "model": self.model.to_dict(),
            "epochs_per_slice": list(self.schedule.epochs),  # floats: JSON keeps them exactly
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if data.get("algorithm", TRAINING_ALGORITHM) != TRAINING_ALGORITHM:
            raise ValueError(
                f"config was written for {data['algorithm']}, this code runs {TRAINING_ALGORITHM}; "
                "retrain from scratch with this version"
            )
        from shards.model import ModelSpec  # torch: only where a stored config is read back

        return cls(
            model=ModelSpec.from_dict(data["model"]),
            schedule=SliceSchedule(tuple(data["epochs_per_slice"])),
            batch_size=int(data["batch_size"]),
            learning_rate=float(data["learning_rate"]),
            weight_decay=float(data["weight_decay"]),
            optimizer=str(data["optimizer"]),
            seed=int(data["seed"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def expected_shard_fraction(num_slices: int, deletions: int = 1) -> float:
    """Expected fraction of a shard's training redone for ``deletions`` uniform deletions in it.

    The earliest affected slice i (1-based) has ``P(i' >= i) = ((R-i+1)/R)^m``; retraining
    from it costs ``Σ_{j=i..R} j / (R(R+1)/2)`` of the shard. For m = 1 this is 2/3 + 1/(3R).
    """
    if num_slices < 1 or deletions < 0:
        raise ValueError(f"need num_slices >= 1 and deletions >= 0, got {num_slices}, {deletions}")
    if deletions == 0:
        return 0.0
    total = num_slices * (num_slices + 1) / 2
    expected = 0.0
    for i in range(1, num_slices + 1):
        p_min_is_i = ((num_slices - i + 1) / num_slices) ** deletions - ((num_slices - i) / num_slices) ** deletions
        expected += p_min_is_i * sum(range(i, num_slices + 1)) / total
    return expected


def expected_retrain_fraction(num_shards: int, num_slices: int, deletions: int = 1) -> float:
    """Expected fraction of a full ensemble training redone for K uniform deletions retrained together.

    Each shard receives m ~ Binomial(K, 1/S) of them; for K = 1 this is the paper's ``(2/3 + 1/(3R))/S``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    p = 1 / num_shards
    return sum(
        comb(deletions, m) * p**m * (1 - p) ** (deletions - m) * expected_shard_fraction(num_slices, m)
        for m in range(1, deletions + 1)
    )


@dataclass(frozen=True)
class ShardEstimate:
    shard: int
    earliest_slice: int
    records: int  # records of this shard the request removes
    samples: int  # samples retraining it processes
    shard_training_samples: int  # samples of training this shard from scratch (after the removal)


@dataclass(frozen=True)
class RetrainEstimate:
    """What a removal will cost, before anything is erased: the planner's own sums on per-slice counts."""

    shards: tuple[ShardEstimate, ...]
    samples: int
    full_training_samples: int  # training every shard of the ensemble from scratch (after the removal)

    @property
    def fraction(self) -> float:
        return self.samples / self.full_training_samples if self.full_training_samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"shards_touched": len(self.shards),
                "earliest_slice": {str(s.shard): s.earliest_slice for s in self.shards},
                "shards": [{"shard": s.shard, "earliest_slice": s.earliest_slice, "records": s.records,
                            "samples": s.samples, "shard_training_samples": s.shard_training_samples}
                           for s in self.shards],
                "samples": self.samples, "full_training_samples": self.full_training_samples,
                "fraction": round(self.fraction, 6)}


def retrain_estimate(slice_counts: Mapping[int, Iterable[int]], removals: Iterable[tuple[int, int]],
                     schedule: SliceSchedule) -> RetrainEstimate:
    """Cost of removing records at ``removals`` ((shard, slice) each) from shards holding ``slice_counts``
    (shard -> records per slice), retraining each touched shard from its earliest affected slice.

    The same sums as :func:`plan_retrain`: ``schedule.samples`` of the remaining cumulative slice
    sizes from the earliest affected slice (samples), and from slice 0 summed over every shard
    (full training). A shard whose records all go is counted as emptied (nothing to retrain)."""
    R = schedule.num_slices
    counts = {int(s): [int(c) for c in v] for s, v in slice_counts.items()}
    for shard, per in counts.items():
        if len(per) != R or min(per, default=0) < 0:
            raise ValueError(f"shard {shard}: need {R} non-negative slice counts, got {per}")
    removed: dict[int, list[int]] = {}
    for shard, slc in removals:
        if shard not in counts or not 0 <= slc < R:
            raise ValueError(f"removal at shard {shard}, slice {slc} is outside the counts given")
        removed.setdefault(shard, [0] * R)[slc] += 1
    shards, total, full = [], 0, 0
    for shard in sorted(counts):
        remaining = [c - r for c, r in zip(counts[shard], removed.get(shard, [0] * R))]
        if min(remaining) < 0:
            raise ValueError(f"shard {shard}: more removals than records in a slice")
        cumulative, running = [], 0
        for c in remaining:
            running += c
            cumulative.append(running)
        shard_full = schedule.samples(cumulative) if running else 0
        full += shard_full
        if shard in removed:
            earliest = next(r for r, n in enumerate(removed[shard]) if n)
            samples = schedule.samples(cumulative, earliest) if running else 0
            total += samples
            shards.append(ShardEstimate(shard, earliest, sum(removed[shard]), samples, shard_full))
    return RetrainEstimate(tuple(shards), total, full)
