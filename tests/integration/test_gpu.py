"""On CUDA (``pytest -m gpu``; skipped without it): retraining is bitwise reproducible,
a sub-model retrains on the kind of device that trained it, and the SISA benchmark runs.

``benchmarks/gpu_check.sh`` runs these on a lent GPU and prints the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.checkpoints import CheckpointStore
from shards.model import ModelSpec
from shards.retrain import retrain_from_slice
from shards.training import ShardData, SliceSchedule, TrainConfig, train_shard

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")]


def _shard() -> tuple[ShardData, TrainConfig]:
    rng = np.random.default_rng(0)
    n = 2000
    features = rng.normal(size=(n, 64)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(np.int64)
    shard = ShardData("0", [f"r{i}" for i in range(n)], np.sort(rng.integers(0, 4, n)), features, labels)
    return shard, TrainConfig(ModelSpec(64, 2, hidden=(128,)), SliceSchedule.paper(4, 6), batch_size=64)


@pytest.fixture(autouse=True)
def _deterministic_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as the gpu deployments set it
    monkeypatch.delenv("ERASURE_DEVICE", raising=False)


def test_retraining_on_cuda_twice_gives_bitwise_equal_checkpoints(tmp_path: Path) -> None:
    shard, config = _shard()
    removed = [shard.record_ids[900], shard.record_ids[1999]]
    finals = []
    for run in ("first", "second"):
        store = CheckpointStore(tmp_path / run)
        trained = train_shard(shard, config, store, device="cuda")
        assert trained.cost.device.startswith("cuda")
        result = retrain_from_slice(shard, removed, config, store)
        assert result.cost.device.startswith("cuda") and result.environment_matches
        finals.append((trained.final.sha256, result.final.sha256, store.load(result.final)["model_state"]))
    (trained_a, retrained_a, state_a), (trained_b, retrained_b, state_b) = finals
    assert trained_a == trained_b and retrained_a == retrained_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_a_sub_model_retrains_on_the_kind_of_device_that_trained_it(tmp_path: Path) -> None:
    shard, config = _shard()
    removed = [shard.record_ids[5]]
    for device in ("cpu", "cuda"):
        store = CheckpointStore(tmp_path / device)
        train_shard(shard, config, store, device=device)
        result = retrain_from_slice(shard, removed, config, store)  # no device asked: the recorded one
        assert result.cost.device.split(":")[0] == device
        assert result.environment_matches


def test_the_sisa_benchmark_runs_on_cuda(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/bench_sisa.py", "--quick", "--device", "cuda", "--work-dir",
                           str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["settings"]["device"].startswith("cuda")
    single = figures["main"]["single_deletion"]
    assert single["measured_speedup"] > 1 and single["theoretical_speedup"] > 1
    assert figures["main"]["accuracy"]["ensemble"]["mean_prob"] > 0.5
