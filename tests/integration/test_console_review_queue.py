"""The review queue's seed case: a near-copy found from the subject's own record (not
from a sample) is shown beside that record, with the shared runs, Jaccard and cosine;
once the request is closed, ids and scores only.

Real ingest and locate (the service functions the flow calls, without Prefect)."""

from __future__ import annotations

import json

from db.session import unit_of_work
from db.settings import use_settings
from pipeline.database import open_database
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.lifecycle import RequestState, get_request, submit_request
from pipeline.processing import decide_after_locating, locate_and_record, start_processing
from pipeline.review_queue import review_items
from shards.sources import FieldMap

SUBJECT = ("Our allotment committee met on Tuesday to discuss the broken greenhouse latch near plot seventeen, "
           "the compost rota for the winter months, and whether the rainwater barrels should be moved closer "
           "to the northern gate before the frost arrives, since last year three of them cracked badly.")


def _near_copy(text: str) -> str:
    words = text.split()
    words[12], words[30] = "cracked", "southern"  # two words changed: some 5-word runs survive, some do not
    return " ".join(words)


def _ingest_club(settings, tmp_path, other_row: dict) -> None:  # noqa: ANN001
    """Dataset "club": the subject's record (ada@example.org), ``other_row`` without an identifier,
    and 20 unrelated people's notes; one shard, one slice, the hashing embedder."""
    rows = [{"id": "own", "text": SUBJECT, "email": "ada@example.org", "label": 0}, other_row]
    rows += [{"id": f"other{i}", "text": f"Unrelated note number {i} about weather, trains and soup recipes "
              f"for a family of {i + 2} in the autumn season.", "email": f"p{i}@example.org", "label": i % 2}
             for i in range(20)]
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest_source_file(source, IngestOptions(dataset="club", fields=FieldMap(identifier_fields=(("email", "email"),)),
                                             n_shards=1, n_slices=1, seed=0, fmt=None, embedder="hashing"), settings)


def _located_request_of_ada(settings, engine, key: str) -> str:  # noqa: ANN001
    """A request for ada@example.org, located in "club" and decided (awaiting review when anything is borderline)."""
    request_id = submit_request(engine, settings.secret_key_bytes(), idempotency_key=key,
                                identifiers=[("email", "ada@example.org")], samples=[], actor="test").request_id
    with use_settings(settings):
        start_processing(request_id)
        locate_and_record(request_id, "club")
        decide_after_locating(request_id)
    return request_id


def test_a_match_found_from_the_subjects_record_is_shown_beside_it(sqlite_settings, tmp_path) -> None:  # noqa: ANN001
    settings = sqlite_settings
    _ingest_club(settings, tmp_path, {"id": "copy", "text": _near_copy(SUBJECT), "label": 1})
    engine = open_database(settings)
    request_id = _located_request_of_ada(settings, engine, "seed-case")
    with unit_of_work(engine) as session:
        assert get_request(session, request_id).state == RequestState.AWAITING_REVIEW
        [item] = review_items(session, request_id, with_texts=True)
        assert item.record_id == "copy" and item.query_label == "the subject's record 0/own"
        assert "".join(s.text for s in item.query_segments) == SUBJECT
        assert "".join(s.text for s in item.record_segments) == _near_copy(SUBJECT)
        shared = "".join(s.text for s in item.record_segments if s.shared)
        assert "southern" not in shared and "allotment committee met" in shared
        assert 0.5 <= item.jaccard < 0.8 and item.jaccard == item.score  # the verified Jaccard the policy used
        assert item.cosine is not None and 0.5 < item.cosine < 1.0
        [hidden] = review_items(session, request_id, with_texts=False)
        assert hidden.query_segments is None and hidden.record_segments is None and hidden.jaccard is None
    engine.dispose()


PARAPHRASE = ("Since three of the rainwater barrels cracked badly last year, our allotment committee met on Tuesday "
              "to discuss whether the barrels should be moved closer to the northern gate before the frost arrives, "
              "and also the compost rota for the winter months and the broken greenhouse latch near plot seventeen.")


def test_a_paraphrase_match_keeps_its_evidence_as_numbers_and_the_page_shows_it(settings, tmp_path) -> None:  # noqa: ANN001
    """The subject's text reworded (hashing cosine ~0.91, shingle Jaccard ~0.29: not a near-copy) is found
    by the embedding search from the seed; its row keeps margin, rank, lead and score, without a word of
    either text, and the review page shows them against the dataset's thresholds (SQLite and PostgreSQL)."""
    from sqlalchemy import select

    from api.app import create_app
    from db.training import RequestMatch
    from dedup.policy import PARAPHRASE_REASONS
    from tests.e2e.test_console_routes import _signed_in
    from db.requests import issue_token

    _ingest_club(settings, tmp_path, {"id": "reworded", "text": PARAPHRASE, "label": 1})
    app = create_app(settings)
    engine = app.state.engine
    request_id = _located_request_of_ada(settings, engine, "paraphrase-case")
    with unit_of_work(engine) as session:
        rows_by_id = {m.record_id: m for m in session.scalars(select(RequestMatch).where(
            RequestMatch.request_id == request_id))}
        token = issue_token(session, "reviewer", ["review"])[0]
    assert rows_by_id["own"].paraphrase_evidence is None  # an identifier match has no paraphrase evidence
    match = rows_by_id["reworded"]
    assert (match.metric, match.decision) == ("cosine", "review")
    stored = match.paraphrase_evidence
    evidence = json.loads(stored)
    assert set(evidence) == {"cosine", "margin", "rank", "lead", "score", "query_knn_mean", "record_knn_mean",
                             "jaccard", "longest_span_words", "reason_codes"}
    assert all(v is None or isinstance(v, (int, float)) for k, v in evidence.items() if k != "reason_codes")
    assert "cosine_review" in evidence["reason_codes"] and set(evidence["reason_codes"]) <= set(PARAPHRASE_REASONS)
    assert abs(evidence["cosine"] - match.score) < 1e-6 and 0.75 <= evidence["cosine"] < 1.0
    assert evidence["rank"] >= 1 and evidence["margin"] > 0 and evidence["longest_span_words"] >= 5
    lowered = stored.lower()
    assert not any(word in lowered for word in ("allotment", "greenhouse", "barrels", "tuesday", "seventeen"))

    client, _ = _signed_in(app, token)
    page = client.get(f"/console/requests/{request_id}")
    assert page.status_code == 200, page.text[-2000:]
    html = page.text
    assert f"rank <b>{evidence['rank']}</b> among the query's neighbours" in html
    assert f"margin <b>{evidence['margin']:.3f}</b>" in html and f"score <b>{evidence['score']:.3f}</b>" in html
    assert f"recorded cosine <b>{evidence['cosine']:.3f}</b>" in html
    # hashing sees words, not meaning: the margin rule is off and the cosine decided, as the page says
    assert "the margin rule is off for this embedder; cosine decided, review ≥ 0.75" in html
    assert "cosine at or above the review threshold" in html
    engine.dispose()
