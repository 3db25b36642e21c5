"""Identifier normalisation and keyed hashing.

A subject's identifiers are never stored raw: each is normalised (so that
``Jane.Doe@Example.COM `` and ``jane.doe@example.com`` agree) and stored as
``HMAC-SHA256(key, kind ":" normalised)``. Without the key the hash cannot be
reversed by trying likely values, unlike a plain SHA-256 of an email.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

_SPACES = re.compile(r"\s+")
_NOT_DIGIT = re.compile(r"[^0-9]")


def _text(value: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", value)).strip()


def _email(value: str) -> str:
    value = _text(value).casefold().replace(" ", "")
    if value.count("@") != 1 or value.startswith("@") or value.endswith("@"):
        raise ValueError(f"not an email address (expected local@domain): {len(value)} characters")
    return value


def _phone(value: str) -> str:
    digits = _NOT_DIGIT.sub("", _text(value))
    if len(digits) < 6:
        raise ValueError("a phone number needs at least 6 digits")
    # A leading + or 00 marks the international form; keep digits only either way.
    return digits[2:] if digits.startswith("00") else digits


def _name(value: str) -> str:
    return _text(value).casefold()


def _user_id(value: str) -> str:
    return _text(value)


NORMALISERS = {
    "email": _email,
    "user_id": _user_id,
    "name": _name,
    "phone": _phone,
}
IDENTIFIER_KINDS = tuple(NORMALISERS)


def normalize_identifier(kind: str, value: object) -> str:
    """Normalise ``value`` for ``kind``; ValueError names the fix for bad input."""
    if kind not in NORMALISERS:
        raise ValueError(f"unknown identifier kind {kind!r}; known kinds: {', '.join(IDENTIFIER_KINDS)}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{kind} must be a string or integer, got {type(value).__name__}")
    normalised = NORMALISERS[kind](str(value))
    if not normalised:
        raise ValueError(f"{kind} is empty after normalisation")
    return normalised


def keyed_hash(key: bytes, kind: str, value: object) -> str:
    """Hex HMAC-SHA256 of ``kind:normalised value`` under ``key``."""
    message = f"{kind}:{normalize_identifier(kind, value)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def content_hmac(key: bytes, text: str) -> str:
    """Hex HMAC-SHA256 of a record's text under ``key`` (``content:`` keeps it apart from identifier hashes).

    The only digest of record content the database keeps: a plain SHA-256 would let
    anyone holding a guessed text confirm that it was (and, once erased, had been)
    in the training data."""
    return hmac.new(key, b"content:" + text.encode("utf-8"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short, non-secret fingerprint of the key, to detect a changed key."""
    return hmac.new(key, b"erasure-key-id", hashlib.sha256).hexdigest()[:16]
