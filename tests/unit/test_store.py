"""The shard store: copy-on-write versions, the erasure primitive, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from shards.assign import place_record
from shards.store import ShardStore, UnknownRecordsError, build_shard_table


def make_table(n: int, dim: int = 8, seed: int = 0, prefix: str = "r"):
    ids = [f"{prefix}{i}" for i in range(n)]
    places = [place_record(rid, seed, 1, 4) for rid in ids]
    rng = np.random.default_rng(seed)
    return build_shard_table(
        ids,
        np.array([p.slice for p in places]),
        np.array([p.order_key for p in places]),
        [f"text of {rid}" for rid in ids],
        [i % 2 for i in range(n)],
        rng.normal(size=(n, dim)).astype(np.float32),
    )


def test_versions_are_never_overwritten(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    first = store.write_version("ds", 0, make_table(10))
    second = store.write_version("ds", 0, make_table(12))
    assert (first.version, second.version) == (1, 2)
    assert [v.version for v in store.versions("ds", 0)] == [1, 2]
    assert store.read("ds", 0, 1).num_rows == 10 and store.read("ds", 0).num_rows == 12
    assert store.versions("ds", 0)[0].sha256 == first.sha256


def test_write_without_removes_exactly_those_ids_and_keeps_order(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    base = store.write_version("ds", 3, make_table(50))
    table = store.read("ds", 3)
    remove = table["record_id"].to_pylist()[5:9] + [table["record_id"].to_pylist()[-1]]
    new = store.write_without("ds", 3, remove)
    assert new.version == 2 and new.row_count == 45
    after = store.read("ds", 3)
    expected = [rid for rid in table["record_id"].to_pylist() if rid not in set(remove)]
    assert after["record_id"].to_pylist() == expected
    kept = table.filter(np.isin(table["record_id"].to_numpy(zero_copy_only=False), expected))
    assert after.equals(kept)
    assert store.versions("ds", 3)[0].sha256 == base.sha256


def test_write_without_unknown_ids_is_refused(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    store.write_version("ds", 0, make_table(5))
    with pytest.raises(UnknownRecordsError, match="1 record id\\(s\\) not in the shard: nope"):
        store.write_without("ds", 0, ["r1", "nope"])
    with pytest.raises(ValueError, match="no record ids"):
        store.write_without("ds", 0, [])
    assert [v.version for v in store.versions("ds", 0)] == [1]


def test_removing_every_row_gives_an_empty_version(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    store.write_version("ds", 0, make_table(4))
    ref = store.write_without("ds", 0, [f"r{i}" for i in range(4)])
    assert ref.row_count == 0 and store.read("ds", 0).num_rows == 0


def test_bad_dataset_name_and_missing_shard(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    with pytest.raises(ValueError, match="invalid dataset name"):
        store.write_version("../escape", 0, make_table(2))
    with pytest.raises(FileNotFoundError, match="ingest data first"):
        store.read("ds", 7)


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.unit.test_store import make_table
    from shards.store import ShardStore

    store = ShardStore(Path({path!r}))
    table = make_table(20000, dim=64, seed=1, prefix="big")

    def hang(tmp):
        print("WRITTEN", flush=True)
        time.sleep(60)

    hook = hang if {hang} else None
    store.write_version("ds", 0, table, _before_publish=hook)
    print("DONE", flush=True)
    """
)


def _spawn(tmp_path: Path, hang: bool) -> subprocess.Popen:
    code = CHILD.format(root=str(Path(__file__).resolve().parents[2]), path=str(tmp_path), hang=hang)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_crash_between_write_and_rename_keeps_previous_version(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    previous = store.write_version("ds", 0, make_table(30))
    child = _spawn(tmp_path, hang=True)
    assert child.stdout.readline().strip() == "WRITTEN"  # the new file is complete but unpublished
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert [v.version for v in store.versions("ds", 0)] == [1]
    assert store.latest("ds", 0).sha256 == previous.sha256
    assert store.read("ds", 0).num_rows == 30
    # a leftover temporary file does not block the next write
    assert store.write_version("ds", 0, make_table(31)).version == 2


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_kill_at_any_moment_of_a_write_leaves_a_readable_store(tmp_path: Path, delay: float) -> None:
    store = ShardStore(tmp_path)
    previous = store.write_version("ds", 0, make_table(30))
    child = _spawn(tmp_path, hang=False)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    versions = store.versions("ds", 0)
    assert versions[0].sha256 == previous.sha256
    assert [v.version for v in versions] in ([1], [1, 2])
    for version in versions:  # whatever is listed is complete
        assert store.read("ds", 0, version.version).num_rows in (30, 20000)
