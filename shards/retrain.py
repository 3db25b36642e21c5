"""Exact unlearning: retrain a shard's sub-model from the slice its removed records were in.

Removing records whose earliest slice is k leaves checkpoints 0..k-1 unchanged
(their content addresses do not mention later slices), so retraining restores
checkpoint k-1 (or the initial weights when k = 0) and trains slices k..R-1 on
what remains. The result is bitwise the sub-model trained from scratch without
the records (same seed, same runtime; see ``shards.device``). Several removals
in one shard share one retraining from the earliest of their slices; records
of the last slice, however few, retrain the last slice.

Retraining runs on the device type and CPU thread count recorded in the
checkpoint it restores, unless told otherwise. A retraining that would run in
another runtime (another device kind, torch version or CPU thread count, or
without deterministic mode: ``Runtime.differences``) is refused with
``RuntimeMismatchError`` before anything trains, unless ``allow_cross_runtime``:
then it yields a correctly unlearned model (trained without the records) but
not the bitwise equality with a from-scratch run, and
``RetrainResult.environment_matches`` is False. It is True only when every
checkpoint of the new chain was trained in the recorded runtime, and
``config_matches`` when each was trained under the config used (the content
addresses already imply it; this re-reads it). To retrain on GPU workers,
train on GPU too.

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
        (--config C.json | --checkpoint KEY) [--shard-id S] [--device cuda] [--threads N] \\
        [--allow-cross-runtime]

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
from shards.device import Runtime, resolve_runtime
from shards.training import (
    CostReport,
    ShardData,
    SliceSchedule,
    TrainConfig,
    UnknownRecordIdsError,
    check_compatible,
    checkpoint_chain,
    latest_stored,
    shard_from_parquet,
    train_slices,
)

from shards.schedule import (  # noqa: F401,E402  (re-exported: their home before shards.schedule)
    RetrainEstimate, ShardEstimate, expected_retrain_fraction, expected_shard_fraction, retrain_estimate,
)

OUTCOMES = ("retrain", "up_to_date", "emptied")


class RuntimeMismatchError(ValueError):
    """A retraining would run in a runtime other than the one recorded in the checkpoints it restores."""

    def __init__(self, shard_id: str, recorded: Runtime, actual: Runtime) -> None:
        self.shard_id, self.recorded, self.actual = shard_id, recorded, actual
        self.differences = actual.differences(recorded)
        super().__init__(
            f"refusing to retrain shard {shard_id} in another runtime: its checkpoints were trained with "
            f"{_describe(recorded)}, this run would use {_describe(actual)} (differs in "
            f"{', '.join(self.differences)}). Retrain where the recorded runtime is available, or allow a "
            "cross-runtime retraining: the sub-model is then trained without the records but is not bitwise "
            "comparable with one trained from scratch"
        )


def _describe(runtime: Runtime) -> str:
    return (f"device {runtime.device}, torch {runtime.torch_version}, {runtime.threads} CPU thread(s), "
            f"deterministic {'on' if runtime.deterministic else 'off'}")


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
    ``cost.measured_fraction``. ``runtime`` is the runtime this run used (or would
    have used: nothing trains for ``up_to_date``/``emptied``); ``recorded_runtime``
    the one recorded in the checkpoint restored (None when there was none).
    """

    plan: RetrainPlan
    final: CheckpointRef | None
    written: tuple[CheckpointRef, ...]
    cost: CostReport
    expected_fraction: float
    environment_matches: bool
    runtime: Runtime | None = None
    recorded_runtime: Runtime | None = None
    config_matches: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "final": self.final.to_dict() if self.final else None,
            "written": [ref.to_dict() for ref in self.written],
            "cost": self.cost.to_dict(),
            "expected_fraction": self.expected_fraction,
            "environment_matches": self.environment_matches,
            "config_matches": self.config_matches,
            "runtime": self.runtime.to_dict() if self.runtime else None,
            "recorded_runtime": self.recorded_runtime.to_dict() if self.recorded_runtime else None,
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
    allow_cross_runtime: bool = False,
    on_checkpoint: Callable[[CheckpointRef], None] | None = None,
) -> RetrainResult:
    """Retrain the shard's sub-model without ``removed_ids`` from the earliest affected slice.

    ``device``/``threads`` default to those recorded in the restored checkpoint
    (when that device type is available), which is what keeps the result
    bitwise equal to training from scratch. A run that would train in another
    runtime raises ``RuntimeMismatchError`` before training, unless
    ``allow_cross_runtime``. Interrupted, it leaves every earlier checkpoint
    intact; calling it again resumes after the last checkpoint written.
    """
    plan, remaining = _plan(shard, removed_ids, config, store)
    recorded = _recorded_runtime(store, plan.restore_from, shard, config)
    runtime = retrain_runtime(recorded, device, threads)
    # paper's expectation for this many uniform deletions in one shard, beside the measured cost.measured_fraction
    expected = expected_shard_fraction(config.num_slices, plan.trained_records_removed)
    if plan.outcome == "emptied":
        cost = CostReport(shard.shard_id, runtime.device, 0, 0, (), 0.0, plan.full_training_samples)
        return RetrainResult(plan, None, (), cost, expected, True, runtime, recorded, True)
    if plan.outcome == "retrain":
        if recorded is not None and not runtime.matches(recorded) and not allow_cross_runtime:
            raise RuntimeMismatchError(shard.shard_id, recorded, runtime)
        result = train_slices(remaining, config, store, plan.chain_keys, plan.restore_slice + 1,
                              device=runtime.device, threads=runtime.threads, on_checkpoint=on_checkpoint)
        final, written, cost = result.final, result.written, result.cost
    else:  # up_to_date: the final checkpoint is stored already (possibly written by another runtime)
        final, written = plan.restore_from, ()
        cost = CostReport(shard.shard_id, runtime.device, 0, 0, (), 0.0, plan.full_training_samples)
    runtime_ok, config_ok = chain_facts(store, plan.chain_keys, recorded or runtime, config)
    return RetrainResult(plan, final, written, cost, expected, runtime_ok, runtime, recorded, config_ok)


def retrain_runtime(recorded: Runtime | None, device: str | torch.device | None = None,
                    threads: int | None = None) -> Runtime:
    """The runtime a retraining runs in: ``device``/``threads`` when given, else the recorded
    device kind (when this machine has it) and thread count, else this machine's defaults."""
    if device is None and recorded is not None and _available(recorded.device):
        device = recorded.device_kind
    if threads is None and recorded is not None:
        threads = recorded.threads
    return resolve_runtime(device, threads)


def chain_facts(store: CheckpointStore, keys: Iterable[str], reference: Runtime,
                 config: TrainConfig) -> tuple[bool, bool]:
    """Whether every checkpoint of the chain was trained in ``reference``'s runtime, and under ``config``."""
    runtime_ok = config_ok = True
    for key in keys:
        payload = store.load(key)
        runtime_ok = runtime_ok and Runtime.from_dict(payload["runtime"]).matches(reference)
        config_ok = config_ok and payload["config_digest"] == config.digest
    return runtime_ok, config_ok


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
    allow_cross_runtime: bool = False,
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
    return retrain_from_slice(shard, removed, config, store, device=device, threads=threads,
                              allow_cross_runtime=allow_cross_runtime)


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
    parser.add_argument("--allow-cross-runtime", action="store_true",
                        help="retrain even where the recorded runtime is not available (not bitwise comparable)")
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
            allow_cross_runtime=args.allow_cross_runtime,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(result.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
