"""Screened generation and prediction (front-end suppression, never confused with removal).

``generate_screened``: the dataset's ``lm`` ensemble continues a prompt, but only after
two screens, both with what the pipeline keeps of erased subjects (keyed identifier hashes,
keyed MinHash tombstones; never their text):

* input filter: a prompt that carries an identifier of a subject who asked for erasure
  (a candidate token's keyed hash equals one of theirs) is refused with ``erased_identifier``;
  a prompt that is a near-copy of an erased record (tombstone estimate >= the review
  threshold) is refused with ``near_erased_text``;
* output screen: a continuation that holds such an identifier, or whose text (alone or with
  the prompt) is near an erased record, is replaced by an empty string and ``blocked``.

Every refusal and every block is an audit event with counts only (``generation.screened``),
so the number of suppressed outputs is reported beside the back-end removals. Suppression is
measured, not guaranteed: MinHash does not see paraphrases, and identifiers the pipeline never
received cannot be recognised.

``predict_screened``: the classifier ensemble's class probabilities for texts, embedded as at
ingest; the texts are screened the same way (a screened text gets no prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from db.audit import append_event
from db.requests import ErasureRequest, RequestIdentifier
from db.session import unit_of_work
from db.settings import Settings
from dedup.policy import Thresholds
from pipeline.erasure import dataset_or_fail
from pipeline.lifecycle import RequestState
from pipeline.residue import SubjectScreen
from pipeline.screening import MAX_PROMPT_CHARS, MAX_WORDS, UnknownDataset, dataset_tombstones

REFUSED_IDENTIFIER = "erased_identifier"
REFUSED_NEAR_COPY = "near_erased_text"
REASONS = (REFUSED_IDENTIFIER, REFUSED_NEAR_COPY)
ACTOR = "api:generate"


class NotGenerative(ValueError):
    """The dataset's ensemble cannot serve this call (no ensemble, or the wrong kind of family)."""


@dataclass(frozen=True)
class GenerationResult:
    dataset: str
    ensemble_version: str | None
    refused: bool
    reason: str | None  # one of REASONS when refused
    continuation: str  # empty when refused or blocked
    blocked: bool  # the continuation was generated but withheld by the output screen
    note: str = ("Front-end suppression: prompts and outputs are screened against erased subjects' identifier "
                 "hashes and erased records' MinHash tombstones. An aid, not a guarantee: paraphrases pass.")


@dataclass(frozen=True)
class PredictionResult:
    dataset: str
    ensemble_version: str
    results: list[dict[str, Any]] = field(default_factory=list)  # per text: refused reason or probabilities


def _screen(settings: Settings, engine: Engine, dataset: str) -> SubjectScreen:
    """Every erased (or to-be-erased) subject's identifier hashes and the dataset's tombstones."""
    with unit_of_work(engine) as session:
        dataset_or_fail(session, dataset)
        hashes = frozenset(tuple(row) for row in session.execute(
            select(RequestIdentifier.kind, RequestIdentifier.keyed_hash)
            .join(ErasureRequest, ErasureRequest.id == RequestIdentifier.request_id)
            .where(ErasureRequest.state != RequestState.DENIED)).all())
    tombstones = dataset_tombstones(settings, dataset)
    return SubjectScreen(settings.secret_key_bytes(), hashes, (tombstones,) if tombstones is not None else (),
                         Thresholds().jaccard_review)


def _refusal(screen: SubjectScreen, text: str) -> str | None:
    if screen.identifier_hits(text):
        return REFUSED_IDENTIFIER
    if screen.tombstone_hits([text]):
        return REFUSED_NEAR_COPY
    return None


def _record(engine: Engine, dataset: str, call: str, refused: dict[str, int], blocked: int, served: int) -> None:
    with unit_of_work(engine) as session:
        append_event(session, "generation.screened", {"dataset": dataset, "call": call, "refused": refused,
                                                     "blocked": blocked, "served": served}, actor=ACTOR)


def _ensemble_of(settings: Settings, engine: Engine, dataset: str, kind: str):  # noqa: ANN202
    from pipeline.training import checkpoint_store, current_ensemble  # torch: only when a model is served
    from shards.families import family_named
    from shards.schedule import TrainConfig

    with unit_of_work(engine) as session:
        version = current_ensemble(session, dataset_or_fail(session, dataset).id, settings)
    if version is None or not version.members:
        raise NotGenerative(f"dataset {dataset!r} has no trained ensemble; run `erasure train --dataset {dataset}`")
    store = checkpoint_store(settings, dataset)
    family = TrainConfig.from_dict(store.load(version.members[0].checkpoint)["config"]).model.family
    if family_named(family).kind != kind:
        hint = "--family lm" if kind == "generative" else "a classifier family (mlp)"
        raise NotGenerative(f"dataset {dataset!r} serves a {family!r} ensemble, not a {kind} one; "
                            f"train it with {hint} to use this endpoint")
    return version, store


def generate_screened(settings: Settings, engine: Engine, dataset: str, prompt: str, max_words: int = 16
                      ) -> GenerationResult:
    """The ensemble's greedy continuation of ``prompt`` (at most ``max_words`` words), screened both ways."""
    from shards.generation import EnsembleLM

    if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt must be 1..{MAX_PROMPT_CHARS} characters of text")
    if not 1 <= max_words <= MAX_WORDS:
        raise ValueError(f"max_words must be in 1..{MAX_WORDS}")
    version, store = _ensemble_of(settings, engine, dataset, "generative")
    screen = _screen(settings, engine, dataset)
    reason = _refusal(screen, prompt)
    if reason is not None:
        _record(engine, dataset, "generate", {reason: 1}, 0, 0)
        return GenerationResult(dataset, version.version_id, True, reason, "", False)
    ensemble = EnsembleLM.from_checkpoints(store, [m.checkpoint for m in version.members])
    spaced = prompt if prompt[-1:].isspace() else prompt + " "
    continuation = ensemble.continue_greedily([spaced], max_new_bytes=16 * max_words, stop_after_words=max_words)[0]
    blocked = bool(screen.identifier_hits(continuation)
                   or screen.tombstone_hits([continuation, spaced + continuation]))
    _record(engine, dataset, "generate", {}, int(blocked), int(not blocked))
    return GenerationResult(dataset, version.version_id, False, None, "" if blocked else continuation, blocked)


def predict_screened(settings: Settings, engine: Engine, dataset: str, texts: Sequence[str]) -> PredictionResult:
    """Class probabilities of the classifier ensemble for each text not refused by the input screen."""
    import numpy as np

    from pipeline.locate import dataset_embedder
    from shards.ensemble import Ensemble, aggregate

    if isinstance(texts, str) or not texts:
        raise ValueError("give a non-empty list of texts")
    version, store = _ensemble_of(settings, engine, dataset, "classifier")
    with unit_of_work(engine) as session:
        ds = dataset_or_fail(session, dataset)
        embedder_name, dim = ds.embedder, ds.feature_dim
    screen = _screen(settings, engine, dataset)
    reasons = [_refusal(screen, t) for t in texts]
    allowed = [i for i, r in enumerate(reasons) if r is None]
    probabilities = np.zeros((0, 0))
    labels = np.zeros(0, dtype=np.int64)
    if allowed:
        embedder = dataset_embedder(embedder_name, dim)
        features = np.asarray(embedder.embed([texts[i] for i in allowed]), dtype=np.float32)
        ensemble = Ensemble(version, store)
        stacked = ensemble.predict_proba(features)  # (S, n, C)
        probabilities = stacked.mean(axis=0)
        labels = aggregate(stacked, version.aggregation)  # the ensemble's own rule (mean_prob or vote)
    results: list[dict[str, Any]] = []
    row = 0
    for reason in reasons:
        if reason is not None:
            results.append({"refused": True, "reason": reason, "label": None, "probabilities": None})
            continue
        probs, label = probabilities[row], labels[row]
        row += 1
        results.append({"refused": False, "reason": None, "label": int(label),
                        "probabilities": [round(float(p), 6) for p in probs]})
    refused: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            refused[reason] = refused.get(reason, 0) + 1
    _record(engine, dataset, "predict", refused, 0, len(allowed))
    return PredictionResult(dataset, version.version_id, results)


__all__ = ["GenerationResult", "NotGenerative", "PredictionResult", "UnknownDataset", "generate_screened",
           "predict_screened", "REASONS"]
