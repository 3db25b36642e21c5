"""Request and response bodies of the API (pydantic v2), apart from the tables.

Validation here gives early 422 answers naming the field; the services in
``pipeline.lifecycle`` check the same rules again for the CLI and the flows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from dedup.policy import DEFAULT_SCREEN_JACCARD
from pipeline.lifecycle import (
    IDENTIFIER_KINDS,
    MAX_EXTENSION_MONTHS,
    MAX_IDENTIFIER_CHARS,
    MAX_IDENTIFIERS,
    MAX_REASON_CHARS,
    MAX_SAMPLE_CHARS,
    MAX_SAMPLES,
    DenialGround,
    ReviewInput,
    ReviewVerdict,
    Submission,
    validate_identifier,
)
from pipeline.screening import MAX_PROMPT_CHARS, MAX_SCREEN_TEXT_CHARS, MAX_SCREEN_TEXTS, MAX_WORDS, REFERENCE_PATTERN

IdentifierKind = Literal[IDENTIFIER_KINDS]  # type: ignore[valid-type]  # the kinds dedup/ normalises
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_REASON_CHARS)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("a sample must contain text, not only whitespace")
    return text


Sample = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SAMPLE_CHARS), AfterValidator(_not_blank)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---------------------------------------------------------------- intake


class IdentifierIn(_In):
    kind: IdentifierKind = Field(description="What the value is: " + ", ".join(IDENTIFIER_KINDS) + ".")
    value: str = Field(min_length=1, max_length=MAX_IDENTIFIER_CHARS, description="The identifier; stored only as a keyed hash.")

    @field_validator("value")
    @classmethod
    def _normalisable(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind is not None:
            validate_identifier(kind, value)  # ValueError -> 422 on this field
        return value


DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")]


class SubmitRequestIn(_In):
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=MAX_IDENTIFIERS)
    datasets: list[DatasetName] | None = Field(
        default=None, min_length=1, max_length=100,
        description="The datasets the request covers (each must be ingested); leave out to cover every dataset.")
    samples: list[Sample] = Field(
        default_factory=list,
        max_length=MAX_SAMPLES,
        validate_default=True,
        description=f"Texts the subject wrote or that describe them (at most {MAX_SAMPLES}, "
        f"{MAX_SAMPLE_CHARS} characters each); deleted when the request closes.",
    )

    @field_validator("samples")
    @classmethod
    def _something_to_look_for(cls, samples: list[str], info: ValidationInfo) -> list[str]:
        identifiers = info.data.get("identifiers")  # absent when they failed validation themselves
        if not samples and identifiers == []:
            raise ValueError("give at least one identifier or one sample (both identifiers and samples are empty)")
        return samples

    def identifier_pairs(self) -> list[tuple[str, str]]:
        return [(item.kind, item.value) for item in self.identifiers]


class SubmissionOut(_Out):
    id: str
    received_at: datetime
    due_at: datetime = Field(description="The Art. 12(3) deadline: received + one calendar month.")
    status_url: str

    @classmethod
    def of(cls, submission: Submission, status_url: str) -> SubmissionOut:
        return cls(id=submission.request_id, received_at=submission.received_at, due_at=submission.due_at,
                   status_url=status_url)


# ---------------------------------------------------------------- decisions


class ExtensionIn(_In):
    months: int = Field(ge=1, le=MAX_EXTENSION_MONTHS, description="Further months (at most 2 in total).")
    reason: Reason


class DenialIn(_In):
    ground: DenialGround = Field(description="The Art. 17(3) exemption relied on.")
    detail: Reason


class ReviewDecisionIn(_In):
    match_ref: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    decision: ReviewVerdict
    note: Annotated[str, StringConstraints(max_length=MAX_REASON_CHARS)] | None = None


class ReviewDecisionsIn(_In):
    decisions: list[ReviewDecisionIn] = Field(min_length=1, max_length=1000)

    def as_inputs(self) -> list[ReviewInput]:
        return [ReviewInput(d.match_ref, d.decision.value, d.note) for d in self.decisions]


class ReviewTicketIn(_In):
    """The decisions a paused Prefect review is to be resumed with (no note: Prefect keeps run inputs)."""

    decisions: list[ReviewDecisionIn] = Field(min_length=1, max_length=1000)

    def pairs(self) -> list[tuple[str, str]]:
        return [(d.match_ref, d.decision.value) for d in self.decisions]


class ReviewTicketOut(_Out):
    ticket: str = Field(description="Give it with exactly these decisions as the flow run's resume input "
                        "`{decisions, ticket}`; without it the decisions are refused.")
    reviewer: str = Field(description="The reviewer the ticket names (this token).")
    expires_at: datetime


# ---------------------------------------------------------------- status


class EventOut(_Out):
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str
    reason: str | None


class ReviewDecisionOut(_Out):
    match_ref: str
    decision: str
    reviewer: str
    note: str | None
    decided_at: datetime


class RequestStatusOut(_Out):
    id: str
    state: str
    received_at: datetime
    original_due_at: datetime
    due_at: datetime
    overdue: bool
    extension_months: int
    extension_reason: str | None = Field(description="From the request's notes; null once they are purged.")
    denial_ground: str | None
    denial_detail: str | None = Field(description="From the request's notes; null once they are purged.")
    submitted_by: str
    identifier_kinds: dict[str, int] = Field(description="How many identifiers of each kind (values are not kept).")
    sample_count: int
    samples_purged_at: datetime | None
    closed_at: datetime | None
    notes_purged_at: datetime | None = Field(description="When the request's notes (reasons, reviewers' notes) "
                                             "were deleted at the end of its retention period.")
    review_decisions: list[ReviewDecisionOut]
    history: list[EventOut]


# ---------------------------------------------------------------- screening


ScreenText = Annotated[str, StringConstraints(max_length=MAX_SCREEN_TEXT_CHARS)]


class ScreenIn(_In):
    dataset: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    texts: list[ScreenText] = Field(
        min_length=1, max_length=MAX_SCREEN_TEXTS,
        description=f"The texts to screen (1 to {MAX_SCREEN_TEXTS}, at most {MAX_SCREEN_TEXT_CHARS} characters each); "
        "never stored, logged or returned.",
    )
    min_jaccard: float = Field(
        default=DEFAULT_SCREEN_JACCARD, gt=0.0, lt=1.0,
        description="The estimated Jaccard similarity to a tombstone at which a text counts as a match.",
    )


class TextScreenOut(_Out):
    index: int = Field(description="Position of the text in `texts`.")
    matches_erased_content: bool = Field(description="True: the text matches erased content (block it).")
    best_estimated_jaccard: float | None = Field(description="The best MinHash estimate among the matches; null without one.")
    reference: str | None = Field(
        pattern=REFERENCE_PATTERN,
        description="An opaque reference to the best matching tombstone (null without a match). It names no request "
        "or record; only the audit scope can resolve it (GET /v1/audit/screen-references/{reference}).",
    )


class ScreenOut(_Out):
    dataset: str
    results: list[TextScreenOut]
    tombstones: int = Field(description="How many tombstones the dataset has.")
    note: str


class GenerateIn(_In):
    dataset: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)] = Field(
        description="The text to continue; screened first, never stored, logged or returned.")
    max_words: int = Field(default=16, ge=1, le=MAX_WORDS, description="Words to generate at most.")


class GenerateOut(_Out):
    dataset: str
    ensemble_version: str | None
    refused: bool = Field(description="True: the prompt was refused by the input screen (see `reason`).")
    reason: Literal["erased_identifier", "near_erased_text"] | None = Field(
        description="Why the prompt was refused: it carries an identifier of a subject who asked for erasure, or "
                    "it is a near-copy of an erased record.")
    continuation: str = Field(description="The ensemble's greedy continuation; empty when refused or blocked.")
    blocked: bool = Field(description="True: a continuation was generated but withheld by the output screen.")
    note: str


class PredictIn(_In):
    dataset: Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    texts: list[ScreenText] = Field(min_length=1, max_length=MAX_SCREEN_TEXTS,
                                    description="Texts to classify; screened first, never stored or logged.")


class PredictionOut(_Out):
    refused: bool
    reason: Literal["erased_identifier", "near_erased_text"] | None
    label: int | None = Field(description="The ensemble's most probable class; null when refused.")
    probabilities: list[float] | None


class PredictOut(_Out):
    dataset: str
    ensemble_version: str
    results: list[PredictionOut]


# ---------------------------------------------------------------- errors


class FieldProblem(BaseModel):
    location: str = Field(description="body, header, path or query")
    field: str = Field(description="Dotted path of the field, e.g. identifiers.0.value")
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[FieldProblem] = Field(default_factory=list)


class ErrorOut(BaseModel):
    error: ErrorDetail


# OpenAPI error responses, shared by the routers: each names its own statuses and words
UNAUTHORIZED = {401: "No valid bearer token", 403: "The token lacks the scope"}
TOO_LARGE = {413: "The body is too large"}
INVALID = {422: "Invalid input; `error.fields` names each bad field"}


def error_responses(*descriptions: dict[int, str]) -> dict[int, dict]:
    """``responses=`` for a router or route: every status described, answered with :class:`ErrorOut`."""
    merged: dict[int, str] = {}
    for d in descriptions:
        merged.update(d)
    return {status: {"model": ErrorOut, "description": text} for status, text in sorted(merged.items())}
