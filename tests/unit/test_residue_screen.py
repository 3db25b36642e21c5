"""Screening Prefect's records for a subject's identifiers: what it finds, and that big records do not stall it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dedup.identifiers import keyed_hash
from pipeline.residue import SubjectScreen

KEY = b"residue-screen-test-key-0123456789"


def screen(*identifiers: tuple[str, str]) -> SubjectScreen:
    return SubjectScreen(KEY, frozenset((k, keyed_hash(KEY, k, v)) for k, v in identifiers), (), 0.5)


def test_the_subjects_identifiers_are_found_in_strings_and_others_are_not() -> None:
    s = screen(("email", "jane.doe@example.com"), ("user_id", "u-4711"))
    strings = ["parameters: {'to': 'Jane.Doe@example.com'}", "bob@example.org u-4712", "ran for u-4711;",
               "jane.doe@example.com u-4711", "nothing here"]
    assert s.screen_strings(strings) == [0, 2, 3]
    assert [s.identifier_hits(t) for t in strings] == [1, 0, 1, 2, 0]


def test_a_long_record_without_spaces_is_screened_in_linear_time() -> None:
    # a serialized blob (a task result, say) of 200k characters and no "@": the old email pattern tried a
    # match at every position and took minutes here; the certificate waits on this check. The regex holds
    # the GIL, so the bound is enforced on a child process.
    code = (
        "from tests.unit.test_residue_screen import screen\n"
        "s = screen(('email', 'jane.doe@example.com'))\n"
        "print(s.identifier_hits('QUJD' * 50_000 + ' jane.doe@example.com'))\n"
    )
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("screening a 200k-character string did not finish within 60 s") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
