"""Versioned Parquet shard files: the copy-on-write store of training data.

Layout: ``<root>/<dataset>/shard-<s:05d>/v<version:06d>.parquet``. A version is
written to a temporary file, fsynced, then hard-linked to its final name (which
fails rather than replaces when the name exists) and the directory fsynced. So
a crash at any point leaves every earlier version intact and readable, and no
version is ever overwritten. Erasure is ``write_without``: a new version that is
the latest one minus some rows, in the same order.

Before a version is published its writer leaves a marker beside it,
``.vNNNNNN.parquet.writer-<pid>`` (holding the host), so that a version file no
database row names can be told apart: one whose writer still runs may be in
flight (an ingest records its versions after writing them all); one whose writer
is gone is a leftover of a killed process, and ``remove_stray_version`` deletes
it. The marker, not the file, names the writer: a version's bytes depend only on
its rows (a rerun writes the same file). Markers of recorded versions are
removed by the sweep (``pipeline.gc``).

Rows are in training order (slice, order_key, record_id); see ``shards.assign``.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.files import fsync_dir as _fsync_dir
from shards.files import sha256_file as _sha256
from shards.files import this_host, writer_alive

# Rows per Parquet row group: locate reads only the groups holding the texts it verifies, a person's
# records scattered over their slice. Five groups of a 125k-row shard cost 1.1 ms of CPU at 256 rows,
# 3.6 ms at 1,024 (the tail of a 1M-record locate read up to 20 groups), against ~200 ms for the
# whole text column; a whole-file read (training) takes 0.6 s instead of 0.35 s, the file is no
# larger, and the longer footer (0.8 MB, 3 ms to parse) is parsed once per process by locate's cache.
ROW_GROUP_ROWS = 256
WRITER_MARK = ".writer-"  # ".vNNNNNN.parquet.writer-<pid>": who publishes that version

_VERSION_FILE = re.compile(r"^v(\d{6})\.parquet$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class StorageFull(OSError):
    """The device filled up while a shard version was written (nothing was published)."""


def shard_schema(feature_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("record_id", pa.string(), nullable=False),
            pa.field("slice", pa.int32(), nullable=False),
            pa.field("order_key", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("label", pa.int64(), nullable=True),
            pa.field("features", pa.list_(pa.float32(), feature_dim), nullable=False),
        ]
    )


def validate_dataset_name(name: str) -> str:
    if not _DATASET_NAME.match(name):
        raise ValueError(
            f"invalid dataset name {name!r}: use 1-200 letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class ShardVersionRef:
    dataset: str
    shard: int
    version: int
    path: Path
    sha256: str
    row_count: int


class UnknownRecordsError(ValueError):
    """Some record ids asked to be removed are not in the shard version."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        shown = ", ".join(missing[:20])
        super().__init__(f"{len(missing)} record id(s) not in the shard: {shown}")


def build_shard_table(
    record_ids: list[str],
    slices: np.ndarray,
    order_keys: np.ndarray,
    texts: list[str],
    labels: list[int | None],
    features: np.ndarray,
) -> pa.Table:
    """A shard table in training order from column data (any order)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(record_ids):
        raise ValueError(f"features must be (n_records, dim); got {features.shape} for {len(record_ids)} records")
    dim = features.shape[1]
    table = pa.table(
        {
            "record_id": pa.array(record_ids, pa.string()),
            "slice": pa.array(np.asarray(slices, dtype=np.int32)),
            "order_key": pa.array(np.asarray(order_keys, dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), dim),
        },
        schema=shard_schema(dim),
    )
    return sort_training_order(table)


def sort_training_order(table: pa.Table) -> pa.Table:
    return table.sort_by([("slice", "ascending"), ("order_key", "ascending"), ("record_id", "ascending")])


class ShardStore:
    """Reads, writes and lists shard versions under one root directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def shard_dir(self, dataset: str, shard: int) -> Path:
        return self.root / validate_dataset_name(dataset) / f"shard-{shard:05d}"

    def _ref(self, dataset: str, shard: int, version: int, path: Path) -> ShardVersionRef:
        rows = pq.ParquetFile(path).metadata.num_rows
        return ShardVersionRef(dataset, shard, version, path, _sha256(path), rows)

    def versions(self, dataset: str, shard: int) -> list[ShardVersionRef]:
        """Every complete version of a shard, oldest first (temporary files are ignored)."""
        directory = self.shard_dir(dataset, shard)
        if not directory.exists():
            return []
        found = sorted(
            (int(m.group(1)), directory / m.group(0))
            for m in (_VERSION_FILE.match(p.name) for p in directory.iterdir())
            if m
        )
        return [self._ref(dataset, shard, version, path) for version, path in found]

    def _version_numbers(self, dataset: str, shard: int) -> list[int]:
        directory = self.shard_dir(dataset, shard)
        if not directory.exists():
            return []
        return sorted(int(m.group(1)) for m in (_VERSION_FILE.match(p.name) for p in directory.iterdir()) if m)

    def latest(self, dataset: str, shard: int) -> ShardVersionRef | None:
        numbers = self._version_numbers(dataset, shard)
        if not numbers:
            return None
        version = numbers[-1]
        return self._ref(dataset, shard, version, self.shard_dir(dataset, shard) / f"v{version:06d}.parquet")

    def path_of(self, dataset: str, shard: int, version: int) -> Path:
        return self.shard_dir(dataset, shard) / f"v{version:06d}.parquet"

    def read(
        self, dataset: str, shard: int, version: int | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """One shard version (the latest by default) as a table in training order."""
        if version is None:
            numbers = self._version_numbers(dataset, shard)
            if not numbers:
                raise FileNotFoundError(f"dataset {dataset!r} has no version of shard {shard}; ingest data first")
            version = numbers[-1]
        path = self.path_of(dataset, shard, version)
        if not path.exists():
            raise FileNotFoundError(f"shard {shard} of {dataset!r} has no version {version}")
        return pq.read_table(path, columns=columns)

    def write_version(
        self,
        dataset: str,
        shard: int,
        table: pa.Table,
        *,
        _before_publish: Callable[[Path], None] | None = None,
    ) -> ShardVersionRef:
        """Write ``table`` as the next version of the shard; never replaces a file."""
        if table.column_names[:6] != shard_schema(1).names:
            raise ValueError(f"shard table columns must be {shard_schema(1).names}, got {table.column_names}")
        directory = self.shard_dir(dataset, shard)
        directory.mkdir(parents=True, exist_ok=True)
        numbers = self._version_numbers(dataset, shard)
        version = (numbers[-1] if numbers else 0) + 1
        final = directory / f"v{version:06d}.parquet"
        tmp = directory / f".v{version:06d}.parquet.tmp-{os.getpid()}"
        marker = self.writer_marker(final)
        try:
            with pq.ParquetWriter(tmp, table.schema, compression="zstd") as writer:
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if _before_publish is not None:
                _before_publish(tmp)
            marker.write_text(this_host(), encoding="utf-8")
            try:
                os.link(tmp, final)
            except FileExistsError:
                marker.unlink(missing_ok=True)  # another writer published this number: not ours
                raise RuntimeError(
                    f"shard {shard} version {version} of {dataset!r} was written concurrently; retry the operation"
                ) from None
            _fsync_dir(directory)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            if not final.exists():
                marker.unlink(missing_ok=True)
            raise StorageFull(
                errno.ENOSPC, f"no space left on the device of {directory} while writing version {version} of "
                f"shard {shard} of {dataset!r} ({table.num_rows} rows); the version was not published and earlier "
                "versions are untouched") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ShardVersionRef(dataset, shard, version, final, _sha256(final), table.num_rows)

    def write_without(
        self, dataset: str, shard: int, record_ids: Iterable[str], *, base_version: int | None = None
    ) -> ShardVersionRef:
        """The erasure primitive: a new version equal to the base minus ``record_ids``.

        Every id must be in the base version (UnknownRecordsError otherwise), so a
        caller never believes it erased what was not there.
        """
        remove = sorted(set(record_ids))
        if not remove:
            raise ValueError("no record ids given to remove")
        base = self.read(dataset, shard, base_version)
        present = pc.is_in(base["record_id"], value_set=pa.array(remove, pa.string()))
        found = set(pc.filter(base["record_id"], present).to_pylist())
        missing = [rid for rid in remove if rid not in found]
        if missing:
            raise UnknownRecordsError(missing)
        return self.write_version(dataset, shard, base.filter(pc.invert(present)))

    def remove_version_file(self, ref: ShardVersionRef) -> None:
        """Roll back a version that was written but never recorded (ingest failed)."""
        ref.path.unlink(missing_ok=True)
        self.writer_marker(ref.path).unlink(missing_ok=True)

    def version_files_after(self, dataset: str, shard: int, version: int) -> list[Path]:
        """The version files numbered above ``version`` (above the latest recorded one: unrecorded)."""
        return [self.path_of(dataset, shard, n) for n in self._version_numbers(dataset, shard) if n > version]

    @staticmethod
    def writer_marker(path: Path | str) -> Path:
        """This process's marker for the version file ``path``."""
        path = Path(path)
        return path.with_name(f".{path.name}{WRITER_MARK}{os.getpid()}")

    @staticmethod
    def writer_markers(path: Path | str) -> list[Path]:
        """Every writer marker of the version file ``path``."""
        path = Path(path)
        return sorted(path.parent.glob(f".{path.name}{WRITER_MARK}*"))

    def writer_may_be_in_flight(self, path: Path | str) -> bool:
        """Whether a process that wrote ``path`` may still record it: its marker names a
        process on this host that runs and started before the marker was written; a marker
        written on another host counts as in flight (we cannot see its processes). No marker
        (a version written before markers, or a marker already swept): not in flight."""
        for marker in self.writer_markers(path):
            pid = marker.name.rsplit(WRITER_MARK, 1)[1]
            if not pid.isdigit():
                continue
            try:
                host = marker.read_text(encoding="utf-8").strip()
                written = marker.stat().st_mtime
            except FileNotFoundError:
                continue
            if host != this_host() or writer_alive(int(pid), written):
                return True
        return False

    def remove_stray_version(self, path: Path | str) -> None:
        """Delete a version file (and nothing else) that no database row names; the
        caller holds the shard's lock and has checked its writer is gone."""
        path = Path(path)
        if not _VERSION_FILE.match(path.name):
            raise ValueError(f"{path} is not a shard version file")
        path.unlink()
        for marker in self.writer_markers(path):
            marker.unlink(missing_ok=True)
        _fsync_dir(path.parent)
