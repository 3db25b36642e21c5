"""The residue check's e-mail scan finds what the plain pattern finds, without its quadratic
backtracking on a long piece of text without spaces (an inline base64 image in a Prefect
artifact took 20+ s per request)."""

from __future__ import annotations

import base64
import os
import re

from hypothesis import given
from hypothesis import strategies as st

from pipeline.residue import email_candidates

# the pattern before linear-time scanning: the scan must find exactly its matches
PLAIN = re.compile(r"[^\s@<>\"'(),;:]+@[^\s@<>\"'(),;:]+\.[A-Za-z]{2,}")

ALPHABET = "ab.@-_+ \n<>\"'(),;:xyZ1é"


@given(st.text(alphabet=ALPHABET, max_size=80))
def test_the_split_scan_finds_exactly_the_plain_patterns_matches(text: str) -> None:
    assert email_candidates(text) == PLAIN.findall(text)


def test_an_address_beside_a_long_unbroken_blob_is_found() -> None:
    blob = base64.b64encode(os.urandom(60_000)).decode()  # the shape of an inline PNG: no space, no "@"
    text = f"![probe](data:image/png;base64,{blob}) mail jane.doe@example.org (copy)"
    assert email_candidates(text) == ["jane.doe@example.org"] == PLAIN.findall(text.replace(blob, ""))
