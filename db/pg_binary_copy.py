"""PostgreSQL's binary COPY format, written from Arrow columns (no Python object per value).

The format (PostgreSQL manual, COPY, "Binary Format"): a 19-byte header (signature, int32 flags,
int32 header-extension length), then per row an int16 field count and per field an int32 length
(-1 for NULL) followed by that many bytes, every integer big-endian; a trailer, int16 -1. An
``int4`` value is its 4 big-endian bytes, ``text``/``varchar`` its UTF-8 bytes, ``bytea`` its raw
bytes.

How: a row is fixed-width blocks (the field count, the length words, int4 values, fixed-size bytes)
alternating with the variable fields' bytes. Each block is built for all rows at once as an
``n x width`` byte matrix (numpy), and Arrow's ``binary_join_element_wise`` concatenates block,
text, block, ... row by row in C++: its values buffer is the rows, in order, ready to send.

Why: the server parses binary rows faster than CSV (no quoting, no digits to read: 582k
identifier rows load in 0.30-0.40 s instead of 0.5-0.6 s).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FieldKind = Literal["int4", "text", "bytea"]
"""``int4``: an integer column (no NULLs), sent as int4. ``text``: a string column (NULLs allowed).
``bytea``: a binary column (NULLs allowed) or a fixed-size binary one (no NULLs)."""

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)


def binary_copy_chunks(table: pa.Table, kinds: Sequence[FieldKind], rows_per_chunk: int = 65_536) -> Iterator[bytes]:
    """The whole COPY payload of ``table`` (its columns in order, one kind each): the header, then
    the rows ``rows_per_chunk`` at a time (bounded memory), then the trailer. Raises ValueError for a
    column its kind cannot carry, before that chunk is yielded."""
    if len(kinds) != table.num_columns:
        raise ValueError(f"{table.num_columns} columns but {len(kinds)} kinds")
    if table.num_columns >= 2**15:
        raise ValueError("binary COPY carries at most 32767 fields per row")
    yield HEADER
    for start in range(0, table.num_rows, rows_per_chunk):
        chunk = table.slice(start, rows_per_chunk)
        yield encode_rows([chunk.column(i).combine_chunks() for i in range(chunk.num_columns)], kinds,
                          names=chunk.column_names)
    yield TRAILER


def encode_rows(columns: Sequence[pa.Array], kinds: Sequence[FieldKind], names: Sequence[str] | None = None) -> bytes:
    """The rows of ``columns`` (equal lengths) in binary COPY row format, without header or trailer."""
    names = list(names) if names is not None else [str(i) for i in range(len(columns))]
    n = len(columns[0]) if columns else 0
    if any(len(column) != n for column in columns):
        raise ValueError("columns of different lengths")
    if not n:
        return b""
    parts: list[pa.Array] = []  # fixed block, variable bytes, fixed block, ...
    block = [_big_endian(np.full(n, len(columns)), ">i2")]  # the fixed-width pieces since the last variable field
    for column, kind, name in zip(columns, kinds, names, strict=True):
        if kind == "int4":
            block += [_big_endian(np.full(n, 4), ">i4"), _big_endian(_int4(column, name), ">i4")]
        elif kind == "bytea" and pa.types.is_fixed_size_binary(column.type):
            matrix = _fixed_bytes(column, name)
            block += [_big_endian(np.full(n, matrix.shape[1]), ">i4"), matrix]
        elif kind in ("text", "bytea"):
            values = _variable(column, kind, name)
            lengths = np.asarray(pc.binary_length(values).fill_null(-1), dtype=np.int64)
            block.append(_big_endian(lengths, ">i4"))
            parts += [_as_binary(np.hstack(block)), values.fill_null(b"")]
            block = []
        else:
            raise ValueError(f"column {name}: unknown kind {kind!r}")
    if block:
        parts.append(_as_binary(np.hstack(block)))
    rows = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary())) if len(parts) > 1 else parts[0]
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int32, count=n + 1, offset=rows.offset * 4)
    return rows.buffers()[2][int(offsets[0]):int(offsets[-1])].to_pybytes()


def _big_endian(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as an n x width matrix of their big-endian bytes."""
    wire = values.astype(dtype)
    return wire.view(np.uint8).reshape(len(values), wire.itemsize)


def _as_binary(matrix: np.ndarray) -> pa.Array:
    """Each row of an n x width byte matrix as one binary value."""
    n, width = matrix.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(matrix))])


def _int4(column: pa.Array, name: str) -> np.ndarray:
    if column.null_count or not pa.types.is_integer(column.type):
        raise ValueError(f"column {name}: int4 takes integers without NULLs, not {column.type}")
    try:
        narrow = column.cast(pa.int32())  # a value outside int4 raises, never wraps
    except pa.ArrowInvalid as exc:
        raise ValueError(f"column {name}: {exc}") from None
    return np.asarray(narrow, dtype=np.int32)


def _fixed_bytes(column: pa.Array, name: str) -> np.ndarray:
    """A fixed-size binary column as an n x width byte matrix (no copy)."""
    if column.null_count:
        raise ValueError(f"column {name}: fixed-size bytea takes no NULLs")
    width = column.type.byte_width
    return np.frombuffer(column.buffers()[1], dtype=np.uint8, count=width * len(column),
                         offset=column.offset * width).reshape(len(column), width)


def _variable(column: pa.Array, kind: FieldKind, name: str) -> pa.Array:
    """A text or bytea column as binary values (NULLs kept)."""
    if kind == "text" and not _is_string(column.type):
        raise ValueError(f"column {name}: text takes strings, not {column.type}")
    if kind == "bytea" and not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"column {name}: bytea takes binary values, not {column.type}")
    return column.cast(pa.binary())  # the same bytes: UTF-8 is what the server reads for text


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)
