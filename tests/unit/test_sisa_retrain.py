"""Retraining as a unit of work: planning, bad input, crashes and restarts, running in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shards.checkpoints import CheckpointStore
from shards.ensemble import Ensemble, EnsembleVersion
from shards.model import ModelSpec
from shards.retrain import plan_retrain, read_ids_file, retrain_from_slice, retrain_shard_files
from shards.training import (
    ShardData,
    SliceSchedule,
    TrainConfig,
    UnknownRecordIdsError,
    shard_from_parquet,
    train_shard,
)

REPO = Path(__file__).resolve().parents[2]
DIM, CLASSES = 6, 3


def make_shard(shard_id: str = "7", n: int = 40, num_slices: int = 4, seed: int = 0) -> ShardData:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 0.5)
    slices = np.sort(rng.integers(0, num_slices, n))
    return ShardData(shard_id, [f"rec-{i:03d}" for i in range(n)], slices, features, labels)


def make_config(num_slices: int = 4) -> TrainConfig:
    return TrainConfig(ModelSpec(DIM, CLASSES, hidden=(8,)), SliceSchedule.paper(num_slices, 2), batch_size=8)


def ids_in_slice(shard: ShardData, r: int) -> list[str]:
    return [rid for rid, s in zip(shard.record_ids, shard.slices) if s == r]


def weights(store: CheckpointStore, ref) -> dict[str, torch.Tensor]:
    return store.load(ref)["model_state"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_finds_the_earliest_affected_slice_and_shares_one_retraining(tmp_path):
    shard, config = make_shard(), make_config()
    store = CheckpointStore(tmp_path)
    trained = train_shard(shard, config, store, threads=1)
    removed = [ids_in_slice(shard, 3)[0], ids_in_slice(shard, 1)[2], ids_in_slice(shard, 3)[1]]
    plan = plan_retrain(shard, removed, config, store)
    assert plan.outcome == "retrain"
    assert plan.affected_slices == (1, 3) and plan.earliest_affected_slice == 1
    assert plan.restore_slice == 0 and plan.slices_to_retrain == (1, 2, 3)
    assert plan.remaining_records == shard.num_records - 3 and plan.trained_records_removed == 3
    assert plan.removed_ids == tuple(sorted(removed))
    sizes = shard.without(removed).cumulative_sizes(4)
    assert plan.samples_to_process == sum(sum(config.schedule.passes(r, sizes[r])) for r in (1, 2, 3))
    assert trained.final.key not in {plan.restore_from.key}
    result = retrain_from_slice(shard, removed, config, store, threads=1)
    assert result.cost.samples_processed == plan.samples_to_process
    assert result.cost.epochs_run == pytest.approx(3 * 2 * 2 / 5)
    assert len(result.written) == 3  # one retraining for the three removals
    assert 0 < result.expected_fraction <= 1 and result.cost.measured_fraction < 1


def test_removal_in_the_first_slice_restores_the_initial_weights(tmp_path):
    shard, config = make_shard(), make_config()
    store = CheckpointStore(tmp_path)
    train_shard(shard, config, store, threads=1)
    plan = plan_retrain(shard, ids_in_slice(shard, 0)[:1], config, store)
    assert plan.restore_from is None and plan.restore_slice == -1 and plan.slices_to_retrain == (0, 1, 2, 3)


def test_unknown_record_ids_are_rejected_before_any_work(tmp_path):
    shard, config = make_shard(), make_config()
    store = CheckpointStore(tmp_path)
    train_shard(shard, config, store, threads=1)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnknownRecordIdsError, match="not in shard 7") as info:
        retrain_from_slice(shard, ["rec-001", "nope-1", "nope-2"], config, store, threads=1)
    assert info.value.missing == ("nope-1", "nope-2")
    assert sorted(tmp_path.rglob("*")) == before


def test_mismatched_feature_dimension_is_rejected(tmp_path):
    shard = make_shard()
    config = TrainConfig(ModelSpec(DIM + 1, CLASSES), SliceSchedule.paper(4, 2))
    with pytest.raises(ValueError, match="6-dimensional features but the model expects 7"):
        train_shard(shard, config, CheckpointStore(tmp_path))
    with pytest.raises(ValueError, match="expects 7"):
        plan_retrain(shard, ["rec-000"], config, CheckpointStore(tmp_path))


def test_emptied_shard_is_a_clear_outcome_and_leaves_the_ensemble_without_it(tmp_path):
    config = make_config()
    store = CheckpointStore(tmp_path)
    shards = [make_shard("a", 20, seed=1), make_shard("b", 20, seed=2)]
    version = EnsembleVersion.from_results(train_shard(s, config, store, threads=1) for s in shards)
    result = retrain_from_slice(shards[0], shards[0].record_ids, config, store, threads=1)
    assert result.plan.outcome == "emptied" and result.final is None and result.cost.samples_processed == 0
    emptied = version.with_member("a", result.final)
    assert emptied.shard_ids == ("b",) and emptied.parent == version.version_id
    assert Ensemble(emptied, store).predict(shards[1].features).shape == (20,)


def test_removing_only_unlabeled_records_retrains_nothing(tmp_path):
    shard, config = make_shard(), make_config()
    shard = ShardData(shard.shard_id, shard.record_ids, shard.slices, shard.features, shard.labels, ("rec-unl",))
    store = CheckpointStore(tmp_path)
    trained = train_shard(shard, config, store, threads=1)
    result = retrain_from_slice(shard, ["rec-unl"], config, store, threads=1)
    assert result.plan.outcome == "up_to_date" and result.final.key == trained.final.key


class Crash(RuntimeError):
    pass


def test_crash_between_slices_keeps_the_previous_model_and_a_restart_completes(tmp_path):
    shard, config = make_shard(), make_config()
    store = CheckpointStore(tmp_path / "ckpt")
    version = EnsembleVersion.from_results([train_shard(shard, config, store, threads=1)])
    manifest = version.write(tmp_path / "ensemble.json")
    before = Ensemble(EnsembleVersion.read(manifest), store).predict_proba(shard.features)
    removed = ids_in_slice(shard, 1)[:1]

    def crash_after_first(ref):
        raise Crash(f"killed after slice {ref.slice_index}")

    with pytest.raises(Crash, match="after slice 1"):
        retrain_from_slice(shard, removed, config, store, threads=1, on_checkpoint=crash_after_first)
    # the previous ensemble still loads (sha256 verified) and predicts exactly as before
    np.testing.assert_array_equal(Ensemble(EnsembleVersion.read(manifest), store).predict_proba(shard.features), before)
    assert not list(store.root.rglob("*.tmp"))
    # the restart resumes after the checkpoint the crashed run wrote, and ends where a scratch training does
    plan = plan_retrain(shard, removed, config, store)
    assert plan.earliest_affected_slice == 1 and plan.restore_slice == 1 and plan.slices_to_retrain == (2, 3)
    result = retrain_from_slice(shard, removed, config, store, threads=1)
    scratch_store = CheckpointStore(tmp_path / "scratch")
    scratch = train_shard(shard.without(removed), config, scratch_store, threads=1)
    assert result.final.key == scratch.final.key
    assert same_weights(weights(store, result.final), weights(scratch_store, scratch.final))
    updated = version.with_member(shard.shard_id, result.final)
    assert updated.version_id != version.version_id


def write_shard_parquet(shard: ShardData, path: Path) -> Path:
    table = pa.table(
        {
            "record_id": pa.array(shard.record_ids, pa.string()),
            "slice": pa.array(shard.slices, pa.int32()),
            "order_key": pa.array(np.arange(shard.num_records), pa.int64()),
            "text": pa.array([f"text {rid}" for rid in shard.record_ids], pa.string()),
            "label": pa.array(shard.labels, pa.int64()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(shard.features.reshape(-1)), shard.feature_dim),
        }
    )
    pq.write_table(table, path)
    return path


def run_python(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_killed_retraining_process_is_completed_by_a_separate_process(tmp_path):
    shard, config = make_shard(), make_config()
    parquet = write_shard_parquet(shard, tmp_path / "v000001.parquet")
    assert shard_from_parquet(parquet, shard.shard_id).record_ids == shard.record_ids
    store = CheckpointStore(tmp_path / "ckpt")
    original = train_shard(shard_from_parquet(parquet, "7"), config, store, threads=1)
    removed = ids_in_slice(shard, 1)[:2] + ids_in_slice(shard, 3)[:1]
    ids_file = tmp_path / "remove.txt"
    ids_file.write_text("\n".join(removed) + "\n")
    # a worker killed (SIGKILL) right after its first new checkpoint is durable
    killer = textwrap.dedent(
        f"""
        import os, signal
        from shards.checkpoints import CheckpointStore
        from shards.retrain import retrain_from_slice, read_ids_file
        from shards.training import TrainConfig, shard_from_parquet
        store = CheckpointStore({str(store.root)!r})
        config = TrainConfig.from_dict(store.load({original.final.key!r})["config"])
        shard = shard_from_parquet({str(parquet)!r}, "7")
        retrain_from_slice(shard, read_ids_file({str(ids_file)!r}), config, store,
                           on_checkpoint=lambda ref: os.kill(os.getpid(), signal.SIGKILL))
        """
    )
    killed = run_python(["-c", killer])
    assert killed.returncode == -9, killed.stderr
    assert CheckpointStore(store.root).load(original.final)["seen_ids"]  # previous final still valid
    # a fresh process, given only paths, completes the retraining
    done = run_python(
        [
            "-m", "shards.retrain",
            "--shard-parquet", str(parquet),
            "--checkpoint-dir", str(store.root),
            "--remove-ids-file", str(ids_file),
            "--checkpoint", str(original.final.path),  # a key works too
        ]
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["plan"]["earliest_affected_slice"] == 1
    assert report["plan"]["restore_slice"] == 1 and report["plan"]["slices_to_retrain"] == [2, 3]
    assert report["environment_matches"] is True
    scratch_store = CheckpointStore(tmp_path / "scratch")
    scratch = train_shard(shard.without(removed), config, scratch_store, threads=1)
    assert report["final"]["key"] == scratch.final.key
    assert same_weights(weights(store, report["final"]["key"]), weights(scratch_store, scratch.final))


def test_cli_reports_bad_input_as_an_error(tmp_path):
    shard, config = make_shard(), make_config()
    parquet = write_shard_parquet(shard, tmp_path / "v.parquet")
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / "ids.json").write_text(json.dumps(["rec-000", "ghost"]))
    with pytest.raises(UnknownRecordIdsError, match="ghost"):
        retrain_shard_files(
            parquet, tmp_path / "ckpt", tmp_path / "ids.json", config_path=tmp_path / "config.json", shard_id="7"
        )
    with pytest.raises(ValueError, match="exactly one of --config"):
        retrain_shard_files(parquet, tmp_path / "ckpt", tmp_path / "ids.json")
    with pytest.raises(ValueError, match="--shard-id is needed"):
        retrain_shard_files(parquet, tmp_path / "ckpt", tmp_path / "ids.json", config_path=tmp_path / "config.json")
    assert read_ids_file(tmp_path / "ids.json") == ["rec-000", "ghost"]
