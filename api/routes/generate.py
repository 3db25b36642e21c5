"""/v1/generate and /v1/predict: the ensembles served behind the erasure screens (front-end
suppression). One service each, ``pipeline.generation``; prompts and texts are never stored,
logged or echoed, and a refusal names a reason code, never a request or a person."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import ApiError, Caller, EngineDep, SettingsDep, require_scope
from api.schemas import (
    INVALID,
    TOO_LARGE,
    UNAUTHORIZED,
    GenerateIn,
    GenerateOut,
    PredictIn,
    PredictOut,
    error_responses,
)
from pipeline.generation import GenerationResult, NotGenerative, PredictionResult, generate_screened, predict_screened

GenerateCaller = Annotated[Caller, Depends(require_scope("generate"))]

router = APIRouter(tags=["generation"], responses=error_responses(
    UNAUTHORIZED, {404: "No such dataset", 409: "The dataset has no ensemble of the family this call serves"},
    TOO_LARGE, INVALID))


@router.post("/v1/generate", response_model=GenerateOut, summary="Continue a prompt with the dataset's lm ensemble")
def generate(body: GenerateIn, caller: GenerateCaller, settings: SettingsDep, engine: EngineDep) -> GenerationResult:
    """The greedy continuation of the ensemble (members' next-byte distributions averaged). The prompt is
    refused (`refused`, `reason`) when it carries an identifier of a subject who asked for erasure or is a
    near-copy of an erased record; a continuation near erased content is withheld (`blocked`). Both are
    counted in the audit log (counts only). Front-end suppression: an aid, not a guarantee."""
    try:
        return generate_screened(settings, engine, body.dataset, body.prompt, body.max_words)
    except NotGenerative as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.post("/v1/predict", response_model=PredictOut, summary="Classify texts with the dataset's classifier ensemble")
def predict(body: PredictIn, caller: GenerateCaller, settings: SettingsDep, engine: EngineDep) -> PredictionResult:
    """Class probabilities of the ensemble for each text, embedded as at ingest. A text that carries an
    identifier of a subject who asked for erasure, or is a near-copy of an erased record, gets no prediction
    (`refused`, `reason`)."""
    try:
        return predict_screened(settings, engine, body.dataset, body.texts)
    except NotGenerative as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
