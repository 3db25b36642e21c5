"""The binary COPY writer (``db.pg_binary_copy``): what PostgreSQL reads back is exactly the Arrow
values (NULLs, empty and non-ASCII text, bytes, slices, rows split over chunks); what a column
cannot carry is refused before anything reaches the server."""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pytest

from db.pg_binary_copy import binary_copy_chunks

KINDS = ["int4", "text", "bytea", "bytea"]


def _table() -> pa.Table:
    one = pa.table({
        "n": pa.array([1, -2, 2**31 - 1, -(2**31), 0], pa.int64()),
        "s": pa.array(["x", None, "", "é ü 中 \u2603", "a,b \"q\" \\N\nline"]),
        "h": pa.array([bytes.fromhex(h) for h in ("00ff" * 16, "ab" * 32, "0123456789abcdef" * 4, "f" * 64, "0" * 64)],
                      pa.binary(32)),
        "b": pa.array([b"\x00\x01", None, b"", b"z", b"\xff" * 300]),
    })
    return pa.concat_tables([one, one, one]).slice(2, 11)  # a slice of a two-chunk table


def _copied(url: str, table: pa.Table, rows_per_chunk: int) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("CREATE TEMP TABLE t (n int4, s varchar(40), h bytea, b bytea)")
        with conn.cursor().copy("COPY t FROM STDIN (FORMAT binary)") as copy:
            for chunk in binary_copy_chunks(table, KINDS, rows_per_chunk):
                copy.write(chunk)
        return conn.execute("SELECT n, s, encode(h, 'hex'), b FROM t").fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 100])
def test_postgres_reads_back_exactly_the_arrow_values(postgres_url: str, rows_per_chunk: int) -> None:
    table = _table()
    expected = [(r["n"], r["s"], r["h"].hex(), r["b"]) for r in table.to_pylist()]
    assert _copied(postgres_url, table, rows_per_chunk) == expected


@pytest.mark.postgres
def test_an_empty_table_copies_no_rows(postgres_url: str) -> None:
    assert _copied(postgres_url, _table().slice(0, 0), 10) == []


@pytest.mark.parametrize(("column", "values", "message"), [
    ("h", pa.array([b"\0" * 32] * 10 + [None], pa.binary(32)), "takes no NULLs"),
    ("b", ["text"] * 11, "bytea takes binary"),
    ("n", [2**31] * 11, "column n: .*not in range"),
    ("n", [None] * 11, "without NULLs"),
    ("s", [1] * 11, "text takes strings"),
])
def test_a_value_the_column_cannot_carry_is_refused(column: str, values: list | pa.Array, message: str) -> None:
    table = _table().combine_chunks()
    table = table.set_column(table.column_names.index(column), column,
                             values if isinstance(values, pa.Array) else pa.array(values))
    with pytest.raises(ValueError, match=message):
        list(binary_copy_chunks(table, KINDS))
