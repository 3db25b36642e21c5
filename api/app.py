"""The FastAPI application: ``create_app(settings)`` builds it (nothing is built
at import time). Every 4xx answer has one shape::

    {"error": {"code": "validation_error", "message": "...",
               "fields": [{"location": "body", "field": "identifiers.0.value", "message": "..."}]}}

Bodies larger than ``max_body_bytes`` (256 KiB) are refused with 413 before
they are parsed. Error answers never echo the submitted values. While the
database cannot be reached every route answers 503 with ``Retry-After``
(resend the same request, with the same Idempotency-Key);
the pool's pre-ping replaces dead connections, so service resumes by itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.console_pages import install_console
from api.deps import ApiError
from api.dispatch import RunStarter
from api.routes.audit import router as audit_router
from api.routes.requests import router as requests_router
from api.routes.generate import router as generate_router
from api.routes.screen import router as screen_router
from db.settings import Settings, load_settings
from pipeline.database import open_database
from pipeline.lifecycle import (
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    RequestConflict,
    RequestNotFound,
)

MAX_BODY_BYTES = 256 * 1024
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
DATABASE_RETRY_AFTER_S = 5


def error_response(status: int, code: str, message: str, fields: list[dict] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "fields": fields or []}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413: at once when the
    Content-Length says so, otherwise as soon as the streamed body exceeds it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "the Content-Length header is not a number")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; our handler answers 413.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes ({self.max_bytes // 1024} KiB)"

    def _too_large(self) -> JSONResponse:
        return error_response(413, "payload_too_large", self._message())


def _field_problems(errors: list[dict]) -> list[dict]:
    problems = []
    for error in errors:
        location, *path = error.get("loc") or ("body",)
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            message = f"invalid JSON at character {path[0] if path else 0}: {error.get('ctx', {}).get('error', '')}"
            path = []
        message = message.removeprefix("Value error, ")
        field = ".".join(str(part) for part in path) or str(location)
        problems.append({"location": str(location), "field": field, "message": message})
    return problems


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = _field_problems(list(exc.errors()))
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return error_response(422, "validation_error", f"invalid request: {summary}{more}", problems)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        # A lost or refused connection (server down, restarting, failed over): 503, try again.
        # Anything else from the database is a bug and stays a 500.
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            return error_response(503, "database_unavailable", "the database cannot be reached just now; send the "
                                  "same request again in a few seconds (with the same Idempotency-Key: if it was "
                                  "stored after all, you get the first answer back)",
                                  headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})
        raise exc

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        fields = [{"location": "body", "field": exc.field, "message": str(exc)}] if exc.field else []
        return error_response(422, "validation_error", str(exc), fields)

    @app.exception_handler(RequestNotFound)
    async def _not_found(_: Request, exc: RequestNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(IdempotencyConflict)
    async def _idempotency(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return error_response(409, "idempotency_conflict", str(exc))

    @app.exception_handler(RequestConflict)
    async def _conflict(_: Request, exc: RequestConflict) -> JSONResponse:
        code = "illegal_transition" if isinstance(exc, IllegalTransition) else "state_conflict"
        return error_response(409, code, str(exc))


def create_app(settings: Settings | None = None, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The API over the configured database (its schema is brought to head)."""
    settings = settings or load_settings()
    engine = open_database(settings)
    secret_key = settings.secret_key_bytes()

    # Starts the processing deployment for each new request, off the request path (api/dispatch.py).
    run_starter = (RunStarter(settings.process_deployment, max_age_s=settings.sweep_received_grace_s / 2 or None)
                   if settings.process_deployment else None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if run_starter is not None:
            run_starter.start()
        yield
        if run_starter is not None:
            run_starter.stop()
        engine.dispose()

    app = FastAPI(
        title="erasure-pipeline",
        version="0.1.0",
        summary="GDPR Art. 17 erasure requests for ML training data",
        description="Submit and follow erasure requests. Authenticate with `Authorization: Bearer <token>` "
        "(tokens come from `erasure token create`; scopes: intake, review, audit, screen, admin, generate).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.secret_key = secret_key
    app.state.run_starter = run_starter
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)
    app.include_router(requests_router)
    app.include_router(screen_router)
    app.include_router(generate_router)
    app.include_router(audit_router)
    install_console(app)  # /console: the reviewer's and auditor's pages
    return app
