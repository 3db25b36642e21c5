"""Reading and validating input records from JSONL, CSV or Parquet.

Rows are numbered from 1 in file order: the JSONL line number, the CSV data
row (the header is row 0), the Parquet row. Validation never stops at the
first problem; it collects every bad row so the user fixes the file once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_TEXT_CHARS = 1_000_000
MAX_ID_CHARS = 256


class SourceError(ValueError):
    """The file cannot be read at all (missing, not the format, not UTF-8...)."""


@dataclass(frozen=True)
class RowError:
    row: int
    message: str


@dataclass
class ValidationReport:
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0

    def add(self, row: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(RowError(row, message))

    def summary(self) -> str:
        lines = [f"{self.error_count} invalid row(s); nothing was ingested. First {len(self.errors)}:"]
        lines += [f"  row {e.row}: {e.message}" for e in self.errors]
        return "\n".join(lines)


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the id, text, label and identifiers (field -> kind)."""

    id_field: str = "id"
    text_field: str = "text"
    label_field: str | None = "label"
    identifier_fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CleanRow:
    row: int
    record_id: str
    text: str
    label: int | str | None  # a class name (str) is mapped to its index by the dataset's label vocabulary
    identifiers: tuple[tuple[str, str], ...]  # (kind, raw value); hashed before storage


def detect_format(path: Path, declared: str | None = None) -> str:
    if declared:
        if declared not in FORMATS:
            raise SourceError(f"unknown format {declared!r}; use one of {', '.join(FORMATS)}")
        return declared
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"cannot tell the format of {path.name!r} from its suffix; pass --format jsonl|csv|parquet")
    return fmt


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise SourceError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise SourceError(f"permission denied reading {path}") from None
    return digest.hexdigest()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, _Bad("not valid UTF-8")
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, _Bad(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        reader = csv.DictReader(text)
        number = 0
        try:
            for number, row in enumerate(reader, start=1):
                if None in row:
                    yield number, _Bad(f"has {len(row) - 1 + len(row[None])} values but the header names {len(reader.fieldnames or [])} columns")
                    continue
                # CSV has no types: empty cells are missing values.
                yield number, {k: (v if v != "" else None) for k, v in row.items()}
        except UnicodeDecodeError:
            raise SourceError(f"{path.name} is not valid UTF-8 (near data row {number + 1})") from None
        except csv.Error as exc:
            raise SourceError(f"{path.name} is not valid CSV near data row {number + 1}: {exc}") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise SourceError(f"{path.name} is not a readable Parquet file: {exc}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            yield number, row


class _Bad:
    def __init__(self, message: str) -> None:
        self.message = message


def read_rows(path: Path, fmt: str) -> Iterator[tuple[int, object]]:
    """(row number, raw row) pairs; a raw row is a dict or a _Bad marker."""
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    return readers[fmt](path)


def _as_id(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return None


MAX_LABEL_CHARS = 200


def _as_label(value: object, csv_text: bool) -> int | str:
    """An integer label, or a class name (a non-empty string; resolved through the dataset's
    label vocabulary at ingest). A CSV cell that reads as an integer is an integer."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        name = value.strip()
        if not name or len(name) > MAX_LABEL_CHARS:
            raise ValueError
        if csv_text:
            try:
                return int(name)
            except ValueError:
                return name
        return name
    raise TypeError


def clean_row(number: int, raw: object, fields: FieldMap, fmt: str, report: ValidationReport) -> CleanRow | None:
    """Validate one raw row; returns None (and records why) when it is bad."""
    if isinstance(raw, _Bad):
        report.add(number, raw.message)
        return None
    if not isinstance(raw, dict):
        report.add(number, f"expected an object, got {type(raw).__name__}")
        return None
    problems: list[str] = []
    raw_id = raw.get(fields.id_field)
    record_id = _as_id(raw_id)
    if raw_id is None or record_id == "":
        problems.append(f"missing or empty id field {fields.id_field!r}")
    elif record_id is None:
        problems.append(f"id {fields.id_field!r} must be a string or integer, got {type(raw_id).__name__}")
    elif len(record_id) > MAX_ID_CHARS:
        problems.append(f"id longer than {MAX_ID_CHARS} characters")
    text = raw.get(fields.text_field)
    if text is None or (isinstance(text, str) and not text.strip()):
        problems.append(f"missing or empty text field {fields.text_field!r}")
    elif not isinstance(text, str):
        problems.append(f"text {fields.text_field!r} must be a string, got {type(text).__name__}")
    elif len(text) > MAX_TEXT_CHARS:
        problems.append(f"text longer than {MAX_TEXT_CHARS} characters")
    label = None
    if fields.label_field is not None:
        raw_label = raw.get(fields.label_field)
        if raw_label is None:
            problems.append(f"missing label field {fields.label_field!r} (pass --no-label for unlabelled data)")
        else:
            try:
                label = _as_label(raw_label, fmt == "csv")
            except (TypeError, ValueError):
                problems.append(f"label {fields.label_field!r} must be an integer or a class name (a non-empty "
                                f"string of at most {MAX_LABEL_CHARS} characters), got {raw_label!r:.40}")
    identifiers: list[tuple[str, str]] = []
    for field_name, kind in fields.identifier_fields:
        value = raw.get(field_name)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # identifiers are optional per row
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            problems.append(f"identifier {field_name!r} must be a string or integer, got {type(value).__name__}")
            continue
        identifiers.append((kind, str(value)))
    if problems:
        report.add(number, "; ".join(problems))
        return None
    return CleanRow(number, record_id, text, label, tuple(identifiers))  # type: ignore[arg-type]
