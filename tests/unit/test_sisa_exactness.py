"""Exact unlearning: retraining from the affected slice equals training from scratch without the records."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.checkpoints import CheckpointStore
from shards.families import family_named, family_names
from shards.model import ModelSpec
from shards.retrain import plan_retrain, retrain_from_slice, route_removals
from shards.training import (
    EmptyShardError,
    ShardData,
    SCHEDULE_KINDS,
    SliceSchedule,
    TrainConfig,
    checkpoint_chain,
    train_shard,
)

DIM, CLASSES = 6, 3


def make_shard(shard_id: str, n: int, num_slices: int, seed: int, *, equal_slices: bool = False) -> ShardData:
    """Rows in training order (sorted by slice). ``equal_slices``: the reference layout, n//R per slice and
    the trailing n mod R records in the last, partial slice."""
    rng = np.random.default_rng(seed)
    if equal_slices:
        per = max(1, n // num_slices)
        slices = np.minimum(np.arange(n) // per, num_slices - 1)
    else:
        slices = np.sort(rng.integers(0, num_slices, n))
    features = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 0.5)
    return ShardData(shard_id, [f"{shard_id}-r{i:03d}" for i in range(n)], slices, features, labels)


def make_config(num_slices: int, seed: int = 0, epochs: int = 2, schedule: str = "paper") -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(DIM, CLASSES, hidden=(8,)),
        schedule=SliceSchedule.named(schedule, num_slices, epochs),
        batch_size=8,
        learning_rate=0.01,
        seed=seed,
    )


def state_of(store: CheckpointStore, ref) -> dict:
    payload = store.load(ref)
    return {"model": payload["model_state"], "optimizer": payload["optimizer_state"], "ids": payload["seen_ids"]}


def assert_bitwise_equal(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def check_exact(shard: ShardData, removed: set[str], config: TrainConfig, root: Path) -> None:
    """Train, retrain without ``removed``, train from scratch without them; compare bit for bit."""
    live, scratch = CheckpointStore(root / "live"), CheckpointStore(root / "scratch")
    original = train_shard(shard, config, live, threads=1)
    original_keys = checkpoint_chain(shard, config)
    removed_slices = sorted({int(s) for rid, s in zip(shard.record_ids, shard.slices) if rid in removed})
    result = retrain_from_slice(shard, removed, config, live, threads=1)
    remaining = shard.without(removed)
    if remaining.num_records == 0:
        assert result.plan.outcome == "emptied" and result.final is None
        with pytest.raises(EmptyShardError):
            train_shard(remaining, config, scratch, threads=1)
        return
    reference = train_shard(remaining, config, scratch, threads=1)
    earliest = removed_slices[0]
    assert result.plan.earliest_affected_slice == earliest
    assert result.plan.restore_slice == earliest - 1
    assert result.cost.slices_trained == tuple(range(earliest, config.num_slices))
    assert result.environment_matches
    # the retrained sub-model is the from-scratch one: same address, same bits
    assert result.final.key == reference.final.key
    assert_bitwise_equal(state_of(live, result.final), state_of(scratch, reference.final))
    # checkpoints before the affected slice were reused, not rewritten
    new_keys = checkpoint_chain(remaining, config)
    assert new_keys[:earliest] == original_keys[:earliest]
    assert all(k1 != k2 for k1, k2 in zip(new_keys[earliest:], original_keys[earliest:]))
    # the previous sub-model is still there, untouched
    assert live.load(original.final)["seen_ids"] == state_of(live, original.final)["ids"]
    assert not removed & set(state_of(live, result.final)["ids"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 48),
    num_slices=st.integers(1, 4),
    data_seed=st.integers(0, 2**16),
    train_seed=st.integers(0, 3),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    equal_slices=st.booleans(),
    schedule=st.sampled_from(SCHEDULE_KINDS),  # every schedule the pipeline trains with (fractional epochs too)
)
def test_retraining_equals_training_from_scratch(n, num_slices, data_seed, train_seed, picks, equal_slices,
                                                 schedule):
    shard = make_shard("s", n, num_slices, data_seed, equal_slices=equal_slices)
    removed = {shard.record_ids[p % n] for p in picks}
    with tempfile.TemporaryDirectory() as tmp:
        check_exact(shard, removed, make_config(num_slices, train_seed, schedule=schedule), Path(tmp))


def test_trailing_records_of_the_last_partial_slice_are_retrained(tmp_path):
    # 4 slices of 5 and 3 trailing records in the last slice; the reference implementation retrains nothing
    shard = make_shard("s", 23, 4, 7, equal_slices=True)
    trailing = {shard.record_ids[-1], shard.record_ids[-2]}
    config = make_config(4)
    plan_store = CheckpointStore(tmp_path / "live")
    train_shard(shard, config, plan_store, threads=1)
    plan = plan_retrain(shard, trailing, config, plan_store)
    assert plan.outcome == "retrain" and plan.slices_to_retrain == (3,) and plan.restore_slice == 2
    check_exact(shard, trailing, config, tmp_path / "exact")


def test_removing_a_whole_slice(tmp_path):
    shard = make_shard("s", 30, 3, 11, equal_slices=True)
    whole_middle = {rid for rid, s in zip(shard.record_ids, shard.slices) if s == 1}
    check_exact(shard, whole_middle, make_config(3), tmp_path / "middle")
    whole_first = {rid for rid, s in zip(shard.record_ids, shard.slices) if s == 0}
    check_exact(shard, whole_first, make_config(3), tmp_path / "first")


def test_removing_a_whole_shard_empties_it(tmp_path):
    shard = make_shard("s", 12, 3, 3)
    check_exact(shard, set(shard.record_ids), make_config(3), tmp_path)


def test_removals_in_several_shards_at_once(tmp_path):
    config = make_config(3)
    shards = {sid: make_shard(sid, 20, 3, i) for i, sid in enumerate(("a", "b", "c"))}
    live = CheckpointStore(tmp_path / "live")
    finals = {sid: train_shard(shard, config, live, threads=1).final for sid, shard in shards.items()}
    removed = {"a-r019", "a-r002", "c-r010"}
    routed = route_removals(shards, removed)
    assert routed == {"a": ("a-r002", "a-r019"), "c": ("c-r010",)}
    files_before = sorted(p.name for p in live.root.rglob("*.pt"))
    for sid, ids in routed.items():
        result = retrain_from_slice(shards[sid], ids, config, live, threads=1)
        reference = train_shard(shards[sid].without(ids), config, CheckpointStore(tmp_path / f"ref-{sid}"), threads=1)
        assert_bitwise_equal(state_of(live, result.final), state_of(reference_store(tmp_path, sid), reference.final))
    # shard b was not retrained: its final checkpoint is unchanged, and no file of b was written
    new_files = set(p.name for p in live.root.rglob("*.pt")) - set(files_before)
    assert all(live.load(name[:-3])["shard_id"] != "b" for name in new_files)
    assert plan_retrain(shards["b"], (), config, live).outcome == "up_to_date"
    assert live.ref(finals["b"].key) == finals["b"]


def reference_store(tmp_path: Path, sid: str) -> CheckpointStore:
    return CheckpointStore(tmp_path / f"ref-{sid}")


def test_training_is_deterministic_given_the_seed(tmp_path):
    shard = make_shard("s", 40, 4, 5)
    first = train_shard(shard, make_config(4, seed=1), CheckpointStore(tmp_path / "a"), threads=1)
    second = train_shard(shard, make_config(4, seed=1), CheckpointStore(tmp_path / "b"), threads=1)
    other = train_shard(shard, make_config(4, seed=2), CheckpointStore(tmp_path / "c"), threads=1)
    assert_bitwise_equal(
        state_of(CheckpointStore(tmp_path / "a"), first.final), state_of(CheckpointStore(tmp_path / "b"), second.final)
    )
    assert first.final.key == second.final.key  # the files differ only in their recorded wall times
    assert other.final.key != first.final.key


def test_dropout_models_are_exact_too(tmp_path):
    config = TrainConfig(
        model=ModelSpec(DIM, CLASSES, hidden=(8,), dropout=0.3),
        schedule=SliceSchedule.paper(3, 2),
        batch_size=8,
        learning_rate=0.01,
    )
    shard = make_shard("s", 30, 3, 9)
    check_exact(shard, {shard.record_ids[15]}, config, tmp_path)


def test_sgd_optimizer_is_exact_too(tmp_path):
    config = TrainConfig(
        model=ModelSpec(DIM, CLASSES, hidden=()),
        schedule=SliceSchedule.paper(2, 3),
        batch_size=4,
        learning_rate=0.05,
        optimizer="sgd",
    )
    shard = make_shard("s", 20, 2, 4)
    check_exact(shard, {shard.record_ids[3], shard.record_ids[17]}, config, tmp_path)


# ---- every registered model family (shards.families): built-ins and installed entry points alike ----

_WORDS = "order parcel refund login crash invoice delivery late broken app screen card hotel flight".split()


def make_family_shard(spec, shard_id: str, n: int, num_slices: int, seed: int) -> ShardData:
    """Features of the spec's input width, labels in range, and a short text per record (for text families)."""
    rng = np.random.default_rng(seed)
    slices = np.sort(rng.integers(0, num_slices, n))
    features = rng.normal(size=(n, spec.input_dim)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, n)
    texts = [" ".join(rng.choice(_WORDS, rng.integers(1, 6))) for _ in range(n)]
    return ShardData(shard_id, [f"{shard_id}-r{i:03d}" for i in range(n)], slices, features, labels, texts=texts)


@pytest.mark.parametrize("family_name", family_names())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 24),
    num_slices=st.integers(1, 3),
    data_seed=st.integers(0, 2**16),
    picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    schedule=st.sampled_from(SCHEDULE_KINDS),
)
def test_every_family_retrains_exactly(family_name, n, num_slices, data_seed, picks, schedule):
    spec = family_named(family_name).example_spec()
    shard = make_family_shard(spec, "s", n, num_slices, data_seed)
    removed = {shard.record_ids[p % n] for p in picks}
    config = TrainConfig(model=spec, schedule=SliceSchedule.named(schedule, num_slices, 2), batch_size=4,
                         learning_rate=0.01, seed=data_seed % 3)
    with tempfile.TemporaryDirectory() as tmp:
        check_exact(shard, removed, config, Path(tmp))


def test_a_text_family_addresses_checkpoints_by_text(tmp_path):
    # the same ids, labels and features with one text changed must not reuse a checkpoint of the old text
    spec = family_named("lm").example_spec()
    shard = make_family_shard(spec, "s", 10, 2, 1)
    config = TrainConfig(model=spec, schedule=SliceSchedule.paper(2, 2), batch_size=4)
    edited = ShardData("s", shard.record_ids, shard.slices, shard.features, shard.labels,
                       texts=shard.texts[:-1] + ("an edited text",))
    assert checkpoint_chain(shard, config)[0] == checkpoint_chain(edited, config)[0]
    assert checkpoint_chain(shard, config)[1] != checkpoint_chain(edited, config)[1]
    mlp = make_config(2)
    plain = make_shard("s", 10, 2, 1)
    with_texts = ShardData("s", plain.record_ids, plain.slices, plain.features, plain.labels, texts=["x"] * 10)
    assert checkpoint_chain(plain, mlp) == checkpoint_chain(with_texts, mlp)  # classifiers ignore texts
