"""Exact unlearning: retrain a shard's sub-model from the slice its removed records were in.

Removing records whose earliest slice is k leaves checkpoints 0..k-1 unchanged
(their content addresses do not mention later slices), so retraining restores
checkpoint k-1 (or the initial weights when k = 0) and trains slices k..R-1 on
what remains. The result is bitwise the sub-model trained from scratch without
the records (same seed, same runtime; see ``shards.device``). Several removals
in one shard share one retraining from the earliest of their slices; records
of the last slice, however few, retrain the last slice.

Retraining runs on the device type and CPU thread count recorded in the
checkpoint it restores, unless told otherwise; elsewhere it still yields a
correctly unlearned model (trained without the records) but not the bitwise
equality with a from-scratch run, and ``RetrainResult.environment_matches`` is
False. To retrain on GPU workers, train on GPU too.

Outcomes of a plan:
  ``retrain``     slices ``slices_to_retrain`` are trained from ``restore_from``;
  ``up_to_date``  the final checkpoint for the remaining data is already stored
                  (only unlabeled records were removed, or an earlier run finished);
  ``emptied``     no trainable record remains: the shard has no sub-model any
                  more and ``EnsembleVersion.with_member(shard, None)`` drops it.

Cost (Bourtoule et al., §V): with R equal slices and slice r trained for
``E = 2e/(R+1)`` epochs on ``(r+1)·n/R`` points, a deletion in slice i (1-based,
uniform) costs ``E·n/R·Σ_{j=i..R} j``; averaged over i and divided by the full
shard cost ``e·n`` this is ``(2R+1)/(3R) = 2/3 + 1/(3R)``. Over S shards of one
ensemble a single deletion retrains the fraction ``(2/3 + 1/(3R))/S`` of a full
training, a speed-up of ``3SR/(2R+1)`` over retraining everything.

Runnable as a unit of work in its own process or on another machine::

    python -m shards.retrain --shard-parquet P --checkpoint-dir D --remove-ids-file F \\
        (--config C.json | --checkpoint KEY) [--shard-id S] [--device cuda] [--threads N]

It prints one JSON document (the plan, the new final checkpoint, the cost).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

import torch

from shards.checkpoints import CheckpointRef, CheckpointStore
from shards.device import Runtime, choose_device
from shards.training import (
    CostReport,
    ShardData,
    TrainConfig,
    UnknownRecordIdsError,
    check_compatible,
    checkpoint_chain,
    latest_stored,
    shard_from_parquet,
    train_slices,
)

OUTCOMES = ("retrain", "up_to_date", "emptied")


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
class RetrainPlan:
    """What retraining one shard without ``removed_ids`` will do; computed without training anything."""

    shard_id: str
    removed_ids: tuple[str, ...]
    outcome: str
    trained_records_removed: int
    affected_slices: tuple[int, ...]
    earliest_affected_slice: int | None
    restore_from: CheckpointRef | None
    slices_to_retrain: tuple[int, ...]
    remaining_records: int
    samples_to_process: int
    full_training_samples: int
    num_slices: int
    chain_keys: tuple[str, ...] = ()  # checkpoint addresses of the remaining data, slice 0..R-1

    @property
    def restore_slice(self) -> int:
        """The slice whose checkpoint is restored; -1 means the initial weights."""
        return self.restore_from.slice_index if self.restore_from is not None else -1

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "removed_ids": list(self.removed_ids),
            "outcome": self.outcome,
            "trained_records_removed": self.trained_records_removed,
            "affected_slices": list(self.affected_slices),
            "earliest_affected_slice": self.earliest_affected_slice,
            "restore_from": self.restore_from.to_dict() if self.restore_from else None,
            "restore_slice": self.restore_slice,
            "slices_to_retrain": list(self.slices_to_retrain),
            "remaining_records": self.remaining_records,
            "samples_to_process": self.samples_to_process,
            "full_training_samples": self.full_training_samples,
            "num_slices": self.num_slices,
            "chain_keys": list(self.chain_keys),
        }


@dataclass(frozen=True)
class RetrainResult:
    """The plan as carried out: the shard's new final checkpoint (None when emptied) and the cost.

    ``expected_fraction`` is the paper's expected share of the shard's training
    redone for this many uniform deletions (2/3 + 1/(3R) for one), to set beside
    ``cost.measured_fraction``.
    """

    plan: RetrainPlan
    final: CheckpointRef | None
    written: tuple[CheckpointRef, ...]
    cost: CostReport
    expected_fraction: float
    environment_matches: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "final": self.final.to_dict() if self.final else None,
            "written": [ref.to_dict() for ref in self.written],
            "cost": self.cost.to_dict(),
            "expected_fraction": self.expected_fraction,
            "environment_matches": self.environment_matches,
        }


def plan_retrain(
    shard: ShardData, removed_ids: Iterable[str], config: TrainConfig, store: CheckpointStore
) -> RetrainPlan:
    """Find the earliest affected slice and the latest stored checkpoint to restore for the remaining data.

    ``shard`` is the version that still holds the records. The restore point is
    the latest checkpoint whose content address the remaining data reproduces:
    normally slice ``earliest - 1``; later when a crashed retraining already
    wrote some; earlier only if checkpoints were deleted.
    """
    return _plan(shard, removed_ids, config, store)[0]


def _plan(
    shard: ShardData, removed_ids: Iterable[str], config: TrainConfig, store: CheckpointStore
) -> tuple[RetrainPlan, ShardData]:
    removed = tuple(sorted(set(removed_ids)))
    missing = sorted(set(removed) - shard.all_ids())
    if missing:
        raise UnknownRecordIdsError(shard.shard_id, missing)
    check_compatible(shard, config)
    removed_set = set(removed)
    hit_slices = [int(s) for rid, s in zip(shard.record_ids, shard.slices) if rid in removed_set]
    affected = tuple(sorted(set(hit_slices)))
    remaining = shard.without(removed)
    sizes = remaining.cumulative_sizes(config.num_slices)
    common = dict(
        shard_id=shard.shard_id,
        removed_ids=removed,
        trained_records_removed=len(hit_slices),
        affected_slices=affected,
        earliest_affected_slice=affected[0] if affected else None,
        remaining_records=remaining.num_records,
        full_training_samples=config.schedule.samples(sizes),
        num_slices=config.num_slices,
    )
    if remaining.num_records == 0:
        plan = RetrainPlan(**common, outcome="emptied", restore_from=None, slices_to_retrain=(), samples_to_process=0)
        return plan, remaining
    keys = tuple(checkpoint_chain(remaining, config))
    latest = latest_stored(keys, store)
    to_train = tuple(range(latest + 1, config.num_slices))
    plan = RetrainPlan(
        **common,
        outcome="retrain" if to_train else "up_to_date",
        restore_from=store.ref(keys[latest]) if latest >= 0 else None,
        slices_to_retrain=to_train,
        samples_to_process=config.schedule.samples(sizes, latest + 1),
        chain_keys=keys,
    )
    return plan, remaining


def retrain_from_slice(
    shard: ShardData,
    removed_ids: Iterable[str],
    config: TrainConfig,
    store: CheckpointStore,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    on_checkpoint: Callable[[CheckpointRef], None] | None = None,
) -> RetrainResult:
    """Retrain the shard's sub-model without ``removed_ids`` from the earliest affected slice.

    ``device``/``threads`` default to those recorded in the restored checkpoint
    (when that device type is available), which is what keeps the result
    bitwise equal to training from scratch. Interrupted, it leaves every earlier
    checkpoint intact; calling it again resumes after the last checkpoint written.
    """
    plan, remaining = _plan(shard, removed_ids, config, store)
    recorded = _recorded_runtime(store, plan.restore_from, shard, config)
    if device is None and recorded is not None and _available(recorded.device):
        device = torch.device(recorded.device).type
    if threads is None and recorded is not None:
        threads = recorded.threads
    # paper's expectation for this many uniform deletions in one shard, beside the measured cost.measured_fraction
    expected = expected_shard_fraction(config.num_slices, plan.trained_records_removed)
    if plan.outcome != "retrain":
        runtime_device = str(choose_device(device))
        cost = CostReport(shard.shard_id, runtime_device, 0, 0, (), 0.0, plan.full_training_samples)
        return RetrainResult(plan, plan.restore_from, (), cost, expected, True)
    start = plan.restore_slice + 1
    result = train_slices(
        remaining, config, store, plan.chain_keys, start, device=device, threads=threads, on_checkpoint=on_checkpoint
    )
    matches = recorded is None or result.runtime.matches(recorded)
    return RetrainResult(plan, result.final, result.written, result.cost, expected, matches)


def route_removals(shards: Mapping[str, ShardData], removed_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Which removed ids fall in which shard; shards with none are left out (they are not retrained)."""
    owner = {rid: shard_id for shard_id, shard in shards.items() for rid in shard.all_ids()}
    routed: dict[str, list[str]] = {}
    unknown = []
    for rid in sorted(set(removed_ids)):
        if rid in owner:
            routed.setdefault(owner[rid], []).append(rid)
        else:
            unknown.append(rid)
    if unknown:
        raise UnknownRecordIdsError("(any)", unknown)
    return {shard_id: tuple(ids) for shard_id, ids in sorted(routed.items())}


def retrain_shard_files(
    shard_parquet: Path | str,
    checkpoint_dir: Path | str,
    remove_ids_file: Path | str,
    *,
    config_path: Path | str | None = None,
    checkpoint_key: str | None = None,
    shard_id: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    unlabeled: str = "error",
) -> RetrainResult:
    """The process-level unit of work: everything it needs is in files.

    The config comes from ``config_path`` (``TrainConfig.to_json``) or from any
    checkpoint of the shard (``checkpoint_key``: its key or file path), which
    also names the shard.
    """
    store = CheckpointStore(checkpoint_dir)
    if (config_path is None) == (checkpoint_key is None):
        raise ValueError("give exactly one of --config (a TrainConfig JSON file) or --checkpoint (a checkpoint key)")
    if checkpoint_key is not None:
        checkpoint_key = Path(checkpoint_key).name.removesuffix(".pt")  # a key, or the path of its file
        payload = store.load(checkpoint_key)
        config = TrainConfig.from_dict(payload["config"])
        if shard_id is not None and str(shard_id) != payload["shard_id"]:
            raise ValueError(
                f"checkpoint {checkpoint_key} belongs to shard {payload['shard_id']}, not {shard_id}; "
                "pass the shard's own checkpoint"
            )
        shard_id = payload["shard_id"]
    else:
        config = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    if shard_id is None:
        raise ValueError("--shard-id is needed with --config (the shard id is part of the checkpoint addresses)")
    removed = read_ids_file(remove_ids_file)
    shard = shard_from_parquet(shard_parquet, shard_id, unlabeled=unlabeled)
    return retrain_from_slice(shard, removed, config, store, device=device, threads=threads)


def read_ids_file(path: Path | str) -> list[str]:
    """Record ids from a JSON list or from a file with one id per line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        ids = json.loads(text)
        if not all(isinstance(rid, str) for rid in ids):
            raise ValueError(f"{path}: the JSON list must hold record id strings")
        return ids
    return [line.strip() for line in text.splitlines() if line.strip()]


def _recorded_runtime(
    store: CheckpointStore, ref: CheckpointRef | None, shard: ShardData, config: TrainConfig
) -> Runtime | None:
    """The runtime of the checkpoint restored, or (retraining from slice 0) of the previous training's first one."""
    if ref is not None:
        return Runtime.from_dict(store.load(ref)["runtime"])
    if shard.num_records == 0:
        return None
    first = checkpoint_chain(shard, config)[0]
    return Runtime.from_dict(store.load(first)["runtime"]) if store.exists(first) else None


def _available(device: str) -> bool:
    return torch.device(device).type == "cpu" or torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-parquet", required=True, help="shard version that still holds the records")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--remove-ids-file", required=True, help="JSON list or one record id per line")
    parser.add_argument("--config", help="TrainConfig JSON file")
    parser.add_argument(
        "--checkpoint", help="key (or .pt path) of any checkpoint of this shard: gives the config and shard id"
    )
    parser.add_argument("--shard-id")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: as recorded in the checkpoint)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--unlabeled", choices=("error", "skip"), default="error")
    args = parser.parse_args(argv)
    try:
        result = retrain_shard_files(
            args.shard_parquet,
            args.checkpoint_dir,
            args.remove_ids_file,
            config_path=args.config,
            checkpoint_key=args.checkpoint,
            shard_id=args.shard_id,
            device=args.device,
            threads=args.threads,
            unlabeled=args.unlabeled,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(result.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
