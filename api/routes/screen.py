"""/v1/screen: screen texts (e.g. model outputs) against a dataset's tombstones.
One service, ``pipeline.screening.screen_texts``; the texts are never echoed, logged or stored,
and an answer names no request or record (only an opaque reference)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import ApiError, Caller, EngineDep, SettingsDep, require_scope
from api.schemas import INVALID, TOO_LARGE, UNAUTHORIZED, ScreenIn, ScreenOut, error_responses
from pipeline.screening import ScreenResult, UnknownDataset, screen_texts

PATH = "/v1/screen"
ScreenCaller = Annotated[Caller, Depends(require_scope("screen"))]

router = APIRouter(tags=["screening"], responses=error_responses(UNAUTHORIZED, {404: "No such dataset"}, TOO_LARGE,
                                                               INVALID))


@router.post(PATH, response_model=ScreenOut, summary="Screen texts against the tombstones of erased records")
def screen(body: ScreenIn, caller: ScreenCaller, settings: SettingsDep, engine: EngineDep) -> ScreenResult:
    """For each text: does it match the MinHash signature of an erased record of the
    dataset (estimated Jaccard >= `min_jaccard`)? An aid for output filtering, not a
    guarantee. A match comes with an opaque `reference`, never a request or record id
    (the audit scope resolves it: GET /v1/audit/screen-references/{reference}).
    The texts are not stored, logged or returned."""
    try:
        return screen_texts(settings, body.dataset, body.texts, body.min_jaccard, engine=engine)
    except UnknownDataset as exc:
        raise ApiError(404, "not_found", str(exc)) from None
