"""The physical limit for intake: a bare FastAPI endpoint doing one INSERT.

Used by ``bench_intake.py`` as the baseline our ``POST /v1/erasure-requests`` is
measured against: the same uvicorn settings, the same PostgreSQL server, the
same driver and pool (``db.session.make_engine``) and the same body, but no
authentication, no validation beyond the JSON shape, no hashing, no audit
chain: one ``INSERT`` of the body and a commit, then a 202 with the new id.

    uvicorn benchmarks.bare_intake_app:create_bare_app --factory   # ERASURE_DATABASE_URL must be set
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone

from fastapi import FastAPI, Header
from pydantic import BaseModel
from sqlalchemy import text

from db.session import make_engine

TABLE = "bare_intake"
CREATE_TABLE = text(
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id VARCHAR(36) PRIMARY KEY, idempotency_key VARCHAR(200) UNIQUE, "
    "body TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL)")
_INSERT = text(f"INSERT INTO {TABLE} (id, idempotency_key, body, received_at) VALUES (:id, :key, :body, :at)")


class BareBody(BaseModel):
    identifiers: list[dict[str, str]] = []
    samples: list[str] = []


def create_bare_app() -> FastAPI:
    engine = make_engine(os.environ["ERASURE_DATABASE_URL"])
    app = FastAPI()

    @app.post("/bare", status_code=202)
    def bare(body: BareBody, idempotency_key: str = Header(alias="Idempotency-Key")) -> dict[str, str]:
        new_id = str(uuid.uuid4())
        with engine.begin() as connection:
            connection.execute(_INSERT, {"id": new_id, "key": idempotency_key, "body": json.dumps(body.model_dump()),
                                         "at": datetime.now(timezone.utc)})
        return {"id": new_id}

    return app
