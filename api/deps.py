"""Route dependencies as ``Annotated`` aliases: settings, engine, a unit of
work per request, the HMAC key, and bearer-token authentication by scope."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.requests import find_active_token, token_digest
from db.session import unit_of_work
from db.settings import Settings
from pipeline.lifecycle import MAX_IDEMPOTENCY_KEY_CHARS


# How long a verified token is trusted without a database lookup (seconds).
TOKEN_CACHE_SECONDS = 2.0


class ApiError(Exception):
    """An error answer: status, machine-readable code, message for a human."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass(frozen=True)
class Caller:
    """Who called: the token's id, name and scopes."""

    token_name: str
    scopes: frozenset[str]
    token_id: int

    @property
    def actor(self) -> str:
        return f"token:{self.token_name}"

    @property
    def sees_every_request(self) -> bool:
        """Review, audit and admin tokens see every request; an intake token only those it submitted."""
        return bool(self.scopes & {"review", "audit", "admin"})


# Attribute reads are ``async def``: FastAPI runs a plain ``def`` dependency in the thread
# pool, a thread hop per dependency per request (intake paid five of them).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_secret_key(request: Request) -> bytes:
    return request.app.state.secret_key


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SecretKeyDep = Annotated[bytes, Depends(get_secret_key)]


def open_session(engine: EngineDep) -> Iterator[Session]:
    """One transaction per request, committed before the answer is sent
    (``scope="function"``) and rolled back when the route raises."""
    with unit_of_work(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(open_session, scope="function")]

IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        pattern=r"^[\x21-\x7e]+$",
        description="A client-chosen unique key (e.g. a UUID): resending the same body with the same key "
        "returns the first request instead of creating another.",
    ),
]

_bearer = HTTPBearer(auto_error=False, description="An API token from `erasure token create`.")


class TokenCache:
    """Recently verified tokens (by SHA-256), so a busy client costs one database
    transaction per request, not two. An entry lives ``ttl_s`` seconds: a token
    revoked with ``erasure token revoke`` stops working within that time.
    Unknown tokens are never cached (a wrong token is always looked up)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Caller | None:
        """The caller if ``token`` was verified less than ``ttl_s`` ago (no I/O); else None."""
        with self._lock:
            hit = self._entries.get(token_digest(token))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def lookup(self, engine: Engine, token: str) -> Caller | None:
        """The caller, from the cache or the database (blocking: run it in a thread)."""
        hit = self.cached(token)
        if hit is not None:
            return hit
        digest, now = token_digest(token), time.monotonic()
        with unit_of_work(engine) as session:
            row = find_active_token(session, token)
            caller = None if row is None else Caller(row.name, row.scope_set, row.id)
        with self._lock:
            if caller is None:
                self._entries.pop(digest, None)
            elif self.ttl_s > 0:
                if len(self._entries) > 10_000:
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl_s, caller)
        return caller


async def get_token_cache(request: Request) -> TokenCache:
    cache = getattr(request.app.state, "token_cache", None)
    if cache is None:
        cache = request.app.state.token_cache = TokenCache(TOKEN_CACHE_SECONDS)
    return cache


def require_scope(*scopes: str) -> Callable[..., Caller]:
    """A dependency admitting a valid, unrevoked bearer token holding any of
    ``scopes`` (admin holds them all): 401 without one, 403 without the scope."""
    wanted = " or ".join(repr(s) for s in scopes)

    async def authorised_caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        engine: EngineDep,
        cache: Annotated[TokenCache, Depends(get_token_cache)],
    ) -> Caller:
        if credentials is None:
            raise ApiError(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})
        # A cache hit answers on the event loop; only a database lookup goes to the thread pool.
        caller = cache.cached(credentials.credentials) or await run_in_threadpool(
            cache.lookup, engine, credentials.credentials)
        if caller is None:
            raise ApiError(401, "unauthorized", "the bearer token is unknown or revoked",
                           {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        allowed = "admin" in caller.scopes or any(scope in caller.scopes for scope in scopes)
        if not allowed:
            held = ", ".join(sorted(caller.scopes)) or "none"
            raise ApiError(403, "forbidden", f"this token lacks the scope {wanted} (it has: {held})",
                           {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'})
        return caller

    return authorised_caller


IntakeCaller = Annotated[Caller, Depends(require_scope("intake"))]
ReviewCaller = Annotated[Caller, Depends(require_scope("review"))]
StatusReader = Annotated[Caller, Depends(require_scope("intake", "review", "audit"))]
