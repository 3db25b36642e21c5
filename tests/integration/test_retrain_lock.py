"""One shard's retraining runs once at a time on SQLite too (two review decisions start two
processing runs of one request; side by side they wrote the same checkpoints)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from sqlalchemy import create_engine

from db.locks import retrain_lock


def _hold(url: str, started, seconds: float) -> None:  # noqa: ANN001
    engine = create_engine(url)
    with retrain_lock(engine, 1, 3):
        started.set()
        time.sleep(seconds)


def _waited_for(url: str, dataset_id: int, shard: int) -> float:
    engine = create_engine(url)
    t = time.monotonic()
    with retrain_lock(engine, dataset_id, shard):
        return time.monotonic() - t


def _holder(url: str, seconds: float):  # noqa: ANN202
    """A process holding shard 3's retraining lock for ``seconds``, once it holds it."""
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(url, started, seconds))
    holder.start()
    assert started.wait(60)
    return holder


def test_second_retrain_of_a_shard_waits_for_the_first_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'erasure.db'}"
    holder = _holder(url, 1.5)
    assert _waited_for(url, 1, 4) < 0.5  # another shard is not held up
    assert _waited_for(url, 1, 3) > 0.8  # the same shard waits for the holder
    holder.join(30)
    assert holder.exitcode == 0


def test_a_killed_holder_releases_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'erasure.db'}"
    holder = _holder(url, 600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert _waited_for(url, 1, 3) < 5
