"""The console's sign-in session and CSRF tokens, without a table.

A person signs in with an API token once; the console then keeps a signed cookie:

    value = base64url(JSON {"t": token id, "e": expiry (epoch s), "n": nonce}) "." HMAC-SHA256(key, "console-session:" value)

HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
Secure when served over HTTPS, expiring after ``SESSION_SECONDS``. The token itself
is never stored in the cookie; every request reloads the token row by id, so a
revoked token signs its sessions out at once and scopes are always the current ones.

CSRF: every form carries ``HMAC-SHA256(key, "console-csrf:" nonce)`` of the session's
nonce; an action without it (or with another session's) is refused with 403. The
sign-in form has its own short-lived nonce cookie, so it is protected the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from fastapi import Request
from sqlalchemy import Engine

from db.audit import append_event
from db.requests import ApiToken, find_active_token
from db.session import unit_of_work

SESSION_COOKIE = "erasure_console"
SIGNIN_COOKIE = "erasure_console_signin"
SESSION_SECONDS = 8 * 3600  # one working day
SIGNIN_SECONDS = 30 * 60
CONSOLE_SCOPES = ("review", "audit", "admin")


class ConsoleDenied(Exception):
    """Not signed in (``status`` 401: the console sends the person to sign in) or lacking a scope (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ConsoleUser:
    token_id: int
    token_name: str
    scopes: frozenset[str]
    nonce: str
    expires_at: int

    @property
    def actor(self) -> str:
        """The same principal the API names for this token (``api.deps.Caller.actor``)."""
        return f"token:{self.token_name}"

    def holds(self, *scopes: str) -> bool:
        return "admin" in self.scopes or any(s in self.scopes for s in scopes)


def _mac(key: bytes, purpose: str, value: str) -> str:
    return hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def seal(key: bytes, purpose: str, payload: dict) -> str:
    value = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")
    return f"{value}.{_mac(key, purpose, value)}"


def unseal(key: bytes, purpose: str, cookie: str | None, now: float | None = None) -> dict | None:
    """The payload of a cookie ``seal`` wrote for ``purpose``, or None (absent, altered, expired)."""
    if not cookie or "." not in cookie or len(cookie) > 1000:
        return None
    value, _, mac = cookie.rpartition(".")
    if not hmac.compare_digest(mac, _mac(key, purpose, value)):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), int) or payload["e"] <= (now or time.time()):
        return None
    return payload


def csrf_token(key: bytes, nonce: str) -> str:
    return _mac(key, "console-csrf", nonce)


def csrf_valid(key: bytes, nonce: str, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(str(submitted), csrf_token(key, nonce))


def new_session_cookie(key: bytes, token_id: int) -> tuple[str, int]:
    expires = int(time.time()) + SESSION_SECONDS
    return seal(key, "console-session", {"t": token_id, "e": expires, "n": secrets.token_urlsafe(18)}), expires


def new_signin_cookie(key: bytes) -> tuple[str, str]:
    """(cookie value, nonce) for the sign-in form."""
    nonce = secrets.token_urlsafe(18)
    return seal(key, "console-signin", {"e": int(time.time()) + SIGNIN_SECONDS, "n": nonce}), nonce


def signin_nonce(key: bytes, request: Request) -> str | None:
    payload = unseal(key, "console-signin", request.cookies.get(SIGNIN_COOKIE))
    return payload.get("n") if payload else None


def session_user(engine: Engine, key: bytes, request: Request) -> ConsoleUser | None:
    """The signed-in person, or None: no cookie, a forged or expired one, or a revoked token."""
    payload = unseal(key, "console-session", request.cookies.get(SESSION_COOKIE))
    if payload is None or not isinstance(payload.get("t"), int) or not isinstance(payload.get("n"), str):
        return None
    with unit_of_work(engine) as session:
        row = session.get(ApiToken, payload["t"])
        if row is None or row.revoked_at is not None:
            return None
        return ConsoleUser(row.id, row.name, frozenset(row.scope_set), payload["n"], payload["e"])


def sign_in_with(engine: Engine, key: bytes, token: str) -> tuple[str | None, str | None]:
    """(session cookie, None) for an active token with a console scope, recorded on the
    audit log (``console.signed_in``); else (None, why not)."""
    if not token or len(token) > 500:
        return None, "That token is unknown or revoked."
    with unit_of_work(engine) as session:
        row = find_active_token(session, token.strip())
        if row is None:
            return None, "That token is unknown or revoked."
        if not row.scope_set & set(CONSOLE_SCOPES):
            return None, "That token has none of the console's scopes (review, audit, admin)."
        cookie, expires = new_session_cookie(key, row.id)
        append_event(session, "console.signed_in",
                     {"token_id": row.id, "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat()},
                     actor=f"token:{row.name}")
        return cookie, None


def record_sign_out(engine: Engine, user: ConsoleUser) -> None:
    with unit_of_work(engine) as session:
        append_event(session, "console.signed_out", {"token_id": user.token_id}, actor=user.actor)


def cookie_options(request: Request, max_age: int) -> dict:
    return {"max_age": max_age, "httponly": True, "samesite": "strict", "path": "/console",
            "secure": request.url.scheme == "https"}
