"""The SISA library's parts: schedule and cost formulas, checkpoints, models, devices, adapters."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from shards.checkpoints import CheckpointStore, chain_next, chain_root
from shards.device import Runtime, choose_device, deterministic_mode, resolve_runtime
from shards.model import ModelSpec, build_model, model_families, register_model_family
from shards.retrain import expected_retrain_fraction, expected_shard_fraction
from shards.training import (
    EmptyShardError,
    ShardData,
    SliceSchedule,
    TrainConfig,
    UnknownRecordIdsError,
    shard_from_table,
    train_shard,
)


@pytest.mark.parametrize("num_slices,total", [(1, 10), (4, 10), (8, 9), (3, 1), (16, 2)])
def test_paper_schedule_spreads_e_epochs_over_cumulative_slices(num_slices, total):
    schedule = SliceSchedule.paper(num_slices, total)
    assert schedule.epochs == pytest.approx((2 * total / (num_slices + 1),) * num_slices)
    n = 4800  # equal slices: Σ_r E_r (r+1) n/R = e n, up to rounding one partial pass per slice
    sizes = [(r + 1) * n // num_slices for r in range(num_slices)]
    assert abs(schedule.samples(sizes) - total * n) <= num_slices


def test_fractional_epochs_end_with_a_partial_pass():
    schedule = SliceSchedule((2.25, 0.5, 0.0))
    assert schedule.passes(0, 8) == [8, 8, 2]
    assert schedule.passes(1, 7) == [4]  # round(3.5) == 4
    assert schedule.passes(2, 100) == []


def test_schedule_rejects_nonsense():
    with pytest.raises(ValueError, match="at least one slice"):
        SliceSchedule(())
    with pytest.raises(ValueError, match="num_slices"):
        SliceSchedule.paper(0, 3)


@pytest.mark.parametrize("shards,slices", [(1, 1), (4, 4), (8, 4), (16, 8)])
def test_expected_single_deletion_cost_is_the_papers_formula(shards, slices):
    assert expected_retrain_fraction(shards, slices) == pytest.approx((2 / 3 + 1 / (3 * slices)) / shards)
    assert expected_shard_fraction(slices) == pytest.approx((2 * slices + 1) / (3 * slices))


def test_expected_batched_cost_grows_with_k_and_saturates():
    costs = [expected_retrain_fraction(8, 4, k) for k in (0, 1, 4, 16, 64, 1000)]
    assert costs[0] == 0 and all(a < b for a, b in zip(costs, costs[1:]))
    assert costs[-1] == pytest.approx(1.0, abs=1e-6)
    assert costs[2] < 4 * costs[1]  # batching K removals costs less than K retrainings
    # Monte Carlo check of the closed form
    rng = np.random.default_rng(0)
    total = 4 * 5 / 2
    sims = []
    for _ in range(20000):
        shard = rng.integers(0, 8, 4)
        slc = rng.integers(1, 5, 4)
        cost = sum(sum(range(slc[shard == s].min(), 5)) / total for s in set(shard.tolist()))
        sims.append(cost / 8)
    assert np.mean(sims) == pytest.approx(costs[2], rel=0.03)


def test_checkpoint_chain_keys_depend_on_prefix_only():
    root = chain_root("cfg", "shard-1")
    assert chain_root("cfg", "shard-2") != root and chain_root("cfg2", "shard-1") != root
    k0 = chain_next(root, 0, "d0")
    assert chain_next(k0, 1, "d1") != chain_next(chain_next(root, 0, "other"), 1, "d1")


def test_checkpoint_store_is_atomic_and_never_overwrites(tmp_path):
    store = CheckpointStore(tmp_path)
    key = chain_next(chain_root("c", "s"), 0, "d")
    payload = {"shard_id": "s", "slice_index": 0, "seen_ids": ["a", "b"], "w": torch.ones(2)}
    ref = store.save(key, payload)
    assert ref.path == tmp_path / key[:2] / f"{key}.pt" and ref.records_seen == 2
    assert not list(tmp_path.rglob("*.tmp"))
    again = store.save(key, {**payload, "w": torch.zeros(2)})
    assert again == ref and torch.equal(store.load(ref)["w"], torch.ones(2))
    ref.path.write_bytes(ref.path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed or corrupted"):
        store.load(ref)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.path_for("../../etc/passwd")
    with pytest.raises(FileNotFoundError, match="train the shard"):
        store.load("0" * 64)


def test_checkpoint_records_everything_needed_to_resume(tmp_path):
    rng = np.random.default_rng(0)
    ids, slices = [f"r{i}" for i in range(9)], [0, 0, 0, 1, 1, 1, 2, 2, 2]
    shard = ShardData("s", ids, slices, rng.normal(size=(9, 4)), [0, 1] * 4 + [0])
    config = TrainConfig(ModelSpec(4, 2, hidden=(3,)), SliceSchedule((1, 2, 1.5)), batch_size=4)
    store = CheckpointStore(tmp_path)
    result = train_shard(shard, config, store, threads=1)
    assert [ref.slice_index for ref in result.written] == [0, 1, 2]
    payload = store.load(result.written[1])
    assert payload["seen_ids"] == [f"r{i}" for i in range(6)] and payload["slice_sizes"] == [3, 3]
    assert set(payload) >= {"model_state", "optimizer_state", "rng_state", "config", "runtime", "parent", "cost"}
    assert payload["parent"] == result.written[0].key
    assert TrainConfig.from_dict(payload["config"]) == config
    assert Runtime.from_dict(payload["runtime"]).threads == 1
    cost = result.cost
    assert cost.samples_processed == 1 * 3 + 2 * 6 + 9 + 4 == cost.full_training_samples  # round(4.5) == 4
    assert cost.epochs_run == 4.5 and cost.slices_trained == (0, 1, 2) and cost.device == "cpu"
    assert cost.wall_seconds > 0 and cost.measured_fraction == 1.0


def test_bad_shard_input_fails_early_with_a_hint():
    with pytest.raises(ValueError, match="one row per record"):
        ShardData("s", ["a", "b"], [0, 0], np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError, match="unique"):
        ShardData("s", ["a", "a"], [0, 0], np.zeros((2, 4)), [0, 1])
    shard = ShardData("s", ["a", "b"], [0, 5], np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="slice numbers outside 0..1"):
        train_shard(shard, TrainConfig(ModelSpec(4, 2), SliceSchedule.paper(2, 1)), CheckpointStore("/nonexistent"))
    shard = ShardData("s", ["a", "b"], [0, 1], np.zeros((2, 4)), [0, 7])
    with pytest.raises(ValueError, match="num_classes"):
        train_shard(shard, TrainConfig(ModelSpec(4, 2), SliceSchedule.paper(2, 1)), CheckpointStore("/nonexistent"))
    with pytest.raises(UnknownRecordIdsError):
        shard.without(["zzz"])
    empty = ShardData("s", [], [], np.zeros((0, 4)), [])
    with pytest.raises(EmptyShardError, match="drop it from the ensemble"):
        train_shard(empty, TrainConfig(ModelSpec(4, 2), SliceSchedule.paper(2, 1)), CheckpointStore("/nonexistent"))


def test_table_adapter_reads_store_columns_and_handles_unlabeled_rows():
    table = pa.table(
        {
            "record_id": ["a", "b", "c"],
            "slice": pa.array([0, 0, 1], pa.int32()),
            "text": ["x", "y", "z"],
            "label": pa.array([1, None, 0], pa.int64()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2),
        }
    )
    with pytest.raises(ValueError, match="unlabeled='skip'"):
        shard_from_table(table, 3)
    shard = shard_from_table(table, 3, unlabeled="skip")
    assert shard.shard_id == "3" and shard.record_ids == ("a", "c") and shard.untrained_ids == ("b",)
    np.testing.assert_array_equal(shard.features, [[0, 1], [4, 5]])
    np.testing.assert_array_equal(shard.labels, [1, 0])
    assert shard.without(["b"]).untrained_ids == ()
    sliced = shard_from_table(table.slice(2), 3)  # offsets inside the features array are honoured
    np.testing.assert_array_equal(sliced.features, [[4, 5]])
    with pytest.raises(ValueError, match="lacks column"):
        shard_from_table(table.drop_columns(["features"]), 3)


def test_model_family_is_pluggable_and_init_is_seeded():
    spec = ModelSpec(5, 3, hidden=(4, 4))
    a, b, c = build_model(spec, 1), build_model(spec, 1), build_model(spec, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert "mlp" in model_families()

    def bilinear(spec: ModelSpec) -> nn.Module:
        rank = spec.options["rank"]
        return nn.Sequential(nn.Linear(spec.input_dim, rank), nn.Linear(rank, spec.num_classes))

    register_model_family("test-lowrank", bilinear)
    model = build_model(ModelSpec(5, 3, family="test-lowrank", options={"rank": 2}), 0)
    assert model(torch.zeros(1, 5)).shape == (1, 3)
    with pytest.raises(ValueError, match="register one"):
        build_model(ModelSpec(5, 3, family="nope"), 0)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        ModelSpec(5, 1)


def test_device_choice_honours_override_and_environment(monkeypatch):
    monkeypatch.delenv("ERASURE_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device().type == expected
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setenv("ERASURE_DEVICE", "cpu")
    assert choose_device().type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        choose_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_deterministic_mode_restores_global_switches():
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    with deterministic_mode(resolve_runtime("cpu", 1)):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before
    here = resolve_runtime("cpu", 1)
    assert here.matches(Runtime("cpu", 1, here.torch_version))
    assert not here.matches(Runtime("cpu", 2, here.torch_version))
    assert math.isfinite(here.threads)


@pytest.mark.gpu
def test_retraining_on_cuda_equals_training_from_scratch_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from shards.retrain import retrain_from_slice

    rng = np.random.default_rng(0)
    n = 300
    features = rng.normal(size=(n, 16)).astype(np.float32)
    shard = ShardData("g", [f"r{i}" for i in range(n)], np.sort(rng.integers(0, 4, n)), features, features[:, 0] > 0)
    config = TrainConfig(ModelSpec(16, 2, hidden=(32,)), SliceSchedule.paper(4, 4), batch_size=16)
    live, scratch = CheckpointStore(tmp_path / "live"), CheckpointStore(tmp_path / "scratch")
    train_shard(shard, config, live, device="cuda")
    removed = [shard.record_ids[150], shard.record_ids[299]]
    result = retrain_from_slice(shard, removed, config, live)
    assert result.cost.device.startswith("cuda") and result.environment_matches
    reference = train_shard(shard.without(removed), config, scratch, device="cuda")
    a, b = live.load(result.final)["model_state"], scratch.load(reference.final)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_training_config_reads_back_without_torch(tmp_path):
    """`erasure locate`'s estimate reads the schedule from a checkpoint without importing torch:
    the same config as torch's own loader, and a file that is not a checkpoint is refused."""
    from shards.checkpoint_config import read_checkpoint_fields, read_train_config

    rng = np.random.default_rng(0)
    shard = ShardData("s", [f"r{i}" for i in range(6)], [0, 0, 0, 1, 1, 1], rng.normal(size=(6, 4)), [0, 1] * 3)
    config = TrainConfig(ModelSpec(4, 2, hidden=(3,)), SliceSchedule.paper(2, 3.0), batch_size=4)
    store = CheckpointStore(tmp_path / "store")
    ref = train_shard(shard, config, store, threads=1).written[-1]
    assert read_train_config(ref.path) == store.load(ref)["config"]
    assert TrainConfig.from_dict(read_train_config(ref.path)) == config
    fields = read_checkpoint_fields(ref.path)
    assert fields["slice_index"] == 1 and fields["seen_ids"] is None  # tensors are not read
    (tmp_path / "not.pt").write_bytes(b"plain text")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_train_config(tmp_path / "not.pt")
