"""Retraining in another runtime than the one recorded in the checkpoints: refused by
default, and when allowed, reported as not bitwise comparable (issue 10, point 5)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from shards.checkpoints import CheckpointStore
from shards.device import Runtime
from shards.model import ModelSpec
from shards.retrain import RuntimeMismatchError, retrain_from_slice
from shards.training import ShardData, SliceSchedule, TrainConfig, checkpoint_chain, train_shard

DIM, CLASSES = 6, 3


def make_shard(n: int = 40, num_slices: int = 4) -> ShardData:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 0.5)
    slices = np.sort(rng.integers(0, num_slices, n))
    return ShardData("3", [f"rec-{i:03d}" for i in range(n)], slices, features, labels)


CONFIG = TrainConfig(ModelSpec(DIM, CLASSES, hidden=(8,)), SliceSchedule.paper(4, 2), batch_size=8)


def _late_record(shard: ShardData) -> str:
    return next(rid for rid, s in zip(shard.record_ids, shard.slices) if s == 3)


def _stored_files(store: CheckpointStore) -> set[str]:
    return {p.name for p in store.root.rglob("*.pt")}


def test_differences_name_each_recorded_field() -> None:
    base = Runtime("cpu", 2, "2.5.0", True)
    assert base.differences(base) == () and base.matches(base)
    assert Runtime("cpu", 3, "2.5.0", True).differences(base) == ("threads",)
    assert Runtime("cuda:0", 2, "2.5.0", True).differences(base) == ("device",)
    assert Runtime("cpu", 2, "2.6.0", False).differences(base) == ("torch_version", "deterministic")
    assert Runtime("cuda", 8, "2.5.0", True).matches(Runtime("cuda:1", 1, "2.5.0", True))  # threads: CPU only


def test_another_thread_count_is_refused_before_anything_trains(tmp_path) -> None:
    shard, store = make_shard(), CheckpointStore(tmp_path / "ckpt")
    train_shard(shard, CONFIG, store, threads=1)
    before = _stored_files(store)
    with pytest.raises(RuntimeMismatchError, match="differs in threads") as refused:
        retrain_from_slice(shard, [_late_record(shard)], CONFIG, store, threads=2)
    assert refused.value.differences == ("threads",)
    assert refused.value.recorded.threads == 1 and refused.value.actual.threads == 2
    assert _stored_files(store) == before  # nothing trained, nothing written


def test_allowed_cross_runtime_retraining_is_unlearned_but_not_called_exact(tmp_path) -> None:
    shard, store = make_shard(), CheckpointStore(tmp_path / "ckpt")
    train_shard(shard, CONFIG, store, threads=1)
    removed = _late_record(shard)
    result = retrain_from_slice(shard, [removed], CONFIG, store, threads=2, allow_cross_runtime=True)
    assert result.plan.outcome == "retrain" and not result.environment_matches and result.config_matches
    assert result.runtime.threads == 2 and result.recorded_runtime.threads == 1
    assert removed not in store.load(result.final)["seen_ids"]  # the model never saw it


def test_retraining_in_the_recorded_runtime_is_exact(tmp_path) -> None:
    shard, store = make_shard(), CheckpointStore(tmp_path / "ckpt")
    train_shard(shard, CONFIG, store, threads=1)
    result = retrain_from_slice(shard, [_late_record(shard)], CONFIG, store)  # threads default: as recorded
    assert result.environment_matches and result.config_matches
    assert result.runtime.matches(result.recorded_runtime)


def _rewrite_runtime(store: CheckpointStore, key: str, **fields: object) -> None:
    """Rewrite a stored checkpoint's runtime record in place (the file is no longer what training wrote)."""
    path = store.path_for(key)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["runtime"] = {**payload["runtime"], **fields}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (the CPU-worker case)")
def test_checkpoints_trained_on_a_gpu_are_not_retrained_on_a_cpu_worker(tmp_path) -> None:
    """Trained on the gpu pool, retrained on a CPU worker. Without a GPU this fault cannot be
    caused for real, so the stored checkpoints' runtime records are rewritten to name a CUDA
    device: retraining then falls back to this machine's CPU, and must refuse."""
    shard, store = make_shard(), CheckpointStore(tmp_path / "ckpt")
    train_shard(shard, CONFIG, store, threads=1)
    for key in checkpoint_chain(shard, CONFIG):
        _rewrite_runtime(store, key, device="cuda:0")
    with pytest.raises(RuntimeMismatchError, match="differs in device") as refused:
        retrain_from_slice(shard, [_late_record(shard)], CONFIG, store)
    assert refused.value.recorded.device_kind == "cuda" and refused.value.actual.device_kind == "cpu"
    allowed = retrain_from_slice(shard, [_late_record(shard)], CONFIG, store, allow_cross_runtime=True)
    assert allowed.runtime.device == "cpu" and not allowed.environment_matches
