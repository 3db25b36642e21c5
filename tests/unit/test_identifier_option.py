"""`-i/--identifier`: one parser for every command, both forms, unambiguous values."""

from __future__ import annotations

import pytest

from api.cli_common import parse_identifier

KINDS = ("email", "user_id", "name", "phone")


@pytest.mark.parametrize(("spec", "pair"), [
    ("email=jane@example.com", ("email", "jane@example.com")),
    ("email:jane@example.com", ("email", "jane@example.com")),
    (" user_id = 42", ("user_id", " 42")),  # the kind is trimmed; the value is normalised later, per kind
    ("user_id=acct:42", ("user_id", "acct:42")),  # split on the first separator only
    ("user_id:acct=42:x", ("user_id", "acct=42:x")),
    ("name:Jane=Doe", ("name", "Jane=Doe")),
    ("phone=+44 20 7946 0000", ("phone", "+44 20 7946 0000")),
])
def test_both_forms_parse_to_the_same_pair(spec: str, pair: tuple[str, str]) -> None:
    assert parse_identifier(spec, KINDS) == pair


@pytest.mark.parametrize(("spec", "message"), [
    ("jane@example.com", "write KIND=VALUE or KIND:VALUE"),
    ("passport=X1", "'passport' is not an identifier kind"),
    ("mail:jane@example.com", "'mail' is not an identifier kind"),
    ("email=", "the value is empty"),
    ("email:  ", "the value is empty"),
    ("=jane@example.com", "'' is not an identifier kind"),
])
def test_bad_identifiers_name_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_identifier(spec, KINDS)
    assert message in str(raised.value)
