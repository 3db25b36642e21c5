"""The ensemble: aggregation by vote and by mean probability, manifests that name their checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.checkpoints import CheckpointStore
from shards.ensemble import DEFAULT_AGGREGATION, Ensemble, EnsembleVersion, aggregate, training_ids
from shards.model import ModelSpec
from shards.retrain import retrain_from_slice
from shards.training import ShardData, SliceSchedule, TrainConfig, train_shard

DIM = 4


def test_mean_probability_and_vote_aggregation():
    probs = np.array(
        [
            [[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]],
            [[0.6, 0.4, 0.0], [0.4, 0.5, 0.1]],
            [[0.0, 1.0, 0.0], [0.45, 0.3, 0.25]],
        ]
    )
    # record 0: two votes for 0, but the mean probability favours 1
    assert aggregate(probs, "vote").tolist()[0] == 0
    assert aggregate(probs, "mean_prob").tolist()[0] == 1
    # record 1: votes 2, 1, 0 tie three ways; the tie goes to the highest mean probability (label 2: 0.35)
    assert aggregate(probs, "vote").tolist()[1] == 2
    assert DEFAULT_AGGREGATION == "mean_prob"
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(probs, "max")
    with pytest.raises(ValueError, match=r"\(S, n, C\)"):
        aggregate(probs[0], "vote")


def make_shards(count: int = 3, n: int = 60) -> dict[str, ShardData]:
    rng = np.random.default_rng(42)
    shards = {}
    for s in range(count):
        features = rng.normal(size=(n, DIM)).astype(np.float32)
        labels = (features[:, 0] + 0.3 * features[:, 1] > 0).astype(np.int64)
        slices = np.sort(rng.integers(0, 2, n))
        shards[str(s)] = ShardData(str(s), [f"{s}-{i}" for i in range(n)], slices, features, labels)
    return shards


CONFIG = TrainConfig(ModelSpec(DIM, 2, hidden=(8,)), SliceSchedule.paper(2, 6), batch_size=8, learning_rate=0.02)


def test_ensemble_version_records_each_checkpoint_and_round_trips(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    shards = make_shards()
    results = [train_shard(shard, CONFIG, store, threads=1) for shard in shards.values()]
    version = EnsembleVersion.from_results(results, aggregation="vote")
    path = version.write(tmp_path / "ensembles" / f"{version.version_id}.json")
    manifest = json.loads(path.read_text())
    assert [m["checkpoint"]["key"] for m in manifest["members"]] == [r.final.key for r in results]
    assert all(m["checkpoint"]["sha256"] == r.final.sha256 for m, r in zip(manifest["members"], results))
    again = EnsembleVersion.read(path)
    assert again == version and again.version_id == version.version_id
    manifest["members"][0]["checkpoint"]["key"] = results[1].final.key
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="edited or corrupted"):
        EnsembleVersion.read(path)
    assert training_ids(version, store) == {rid for s in shards.values() for rid in s.record_ids}


def test_predict_and_evaluate_an_ensemble_and_its_retrained_successor(tmp_path):
    store = CheckpointStore(tmp_path)
    shards = make_shards()
    version = EnsembleVersion.from_results(train_shard(s, CONFIG, store, threads=1) for s in shards.values())
    rng = np.random.default_rng(7)
    test_x = rng.normal(size=(300, DIM)).astype(np.float32)
    test_y = (test_x[:, 0] + 0.3 * test_x[:, 1] > 0).astype(np.int64)
    ensemble = Ensemble(version, store, device="cpu")
    report = ensemble.evaluate(test_x, test_y)
    assert set(report.accuracy) == {"vote", "mean_prob"} and report.default == "mean_prob"
    assert report.accuracy["mean_prob"] > 0.8 and set(report.member_accuracy) == {"0", "1", "2"}
    assert ensemble.predict(test_x).shape == (300,)
    with pytest.raises(ValueError, match=r"features must be \(n, 4\)"):
        ensemble.predict(test_x[:, :3])

    erased = ["1-3", "1-50"]
    result = retrain_from_slice(shards["1"], erased, CONFIG, store, threads=1)
    successor = version.with_member("1", result.final)
    assert successor.parent == version.version_id
    assert [m.checkpoint.key for m in successor.members if m.shard_id != "1"] == [
        m.checkpoint.key for m in version.members if m.shard_id != "1"
    ]
    assert not set(erased) & training_ids(successor, store)
    assert set(erased) <= training_ids(version, store)  # the previous version is still what it was
    assert Ensemble(successor, store).evaluate(test_x, test_y).accuracy["mean_prob"] > 0.8
    with pytest.raises(ValueError, match="not 2"):
        version.with_member("2", result.final)


def test_an_ensemble_without_members_cannot_predict(tmp_path):
    with pytest.raises(ValueError, match="no sub-models"):
        Ensemble(EnsembleVersion(()), CheckpointStore(tmp_path))
