"""A generative (lm) dataset through the real pipeline: trained by family, erased, retrained exactly,
probed for extraction before and after, and certified with the front-end numbers."""

from __future__ import annotations

import json

import pytest

from db.audit import AuditEvent, Certificate, verify_chain
from db.session import unit_of_work
from db.settings import Settings, use_settings
from pipeline.database import open_database
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.training import checkpoint_store, current_ensemble
from shards.demo_data import write_demo
from shards.ensemble import training_ids
from shards.sources import FieldMap
from sqlalchemy import select
from tests.prefect_server import demo_subject, submit_for

FIELDS = FieldMap(id_field="id", text_field="text", label_field="label",
                  identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")))


def test_an_lm_dataset_is_erased_retrained_probed_and_certified(settings: Settings, prefect_env: dict) -> None:
    from flows.process_request import process_erasure_request
    from flows.training import train_ensemble

    files = write_demo(settings.home / "demo-data", 120, seed=0)
    ingest_source_file(files.records, IngestOptions(dataset="gen", fields=FIELDS, n_shards=2, n_slices=2), settings)
    with use_settings(settings):  # what `erasure train --family lm --block-size 48 ...` runs
        trained = train_ensemble("gen", family="lm", block_size=48, epochs=1.0, hidden=[16], batch_size=32,
                                 budget="per-shard")
    store = checkpoint_store(settings, "gen")
    configs = [store.load(m["checkpoint"])["config"]["model"] for m in trained["shards"]]
    assert {c["family"] for c in configs} == {"lm"} and {c["input_dim"] for c in configs} == {48}
    # a language model is not scored as a classifier: a clear refusal, not a shape error
    from pipeline.evaluation import evaluate_file

    with pytest.raises(ValueError, match="evaluate and predict score classifiers"):
        evaluate_file(settings, "gen", files.records)

    subject = demo_subject(files.ground_truth)
    request_id = submit_for(settings, subject)
    with use_settings(settings):
        summary = process_erasure_request(request_id, review_timeout_s=0, on_review_timeout="erase")
    assert summary["state"] == "completed"

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            version = current_ensemble(session, 1)
            assert not set(subject["originals"]) & training_ids(version, store)  # retrained without them
            body = json.loads(session.get(Certificate, request_id).document)["certificate"]
            events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "extraction.probed")).all()
            assert verify_chain(session).ok
    finally:
        engine.dispose()
    assert len(events) == 1 and events[0].request_id == request_id
    probe = body["datasets"][0]["verification"]["extraction_probe"]
    assert probe["dataset"] == "gen" and set(probe["roles"]) == {"before", "after"}
    for role in ("before", "after"):
        erased = probe["roles"][role]["erased"]
        assert erased["probed"] + erased["skipped_short"] == body["datasets"][0]["erasure"]["records_erased"]
        assert 0.0 <= erased["ci_low"] <= erased["rate"] <= erased["ci_high"] <= 1.0
    assert probe["roles"]["before"]["ensemble_version"] != probe["roles"]["after"]["ensemble_version"]
    assert "Extraction probe" in body["scope"]["output_suppression"]["statement"]
    retraining = body["datasets"][0]["retraining"]
    assert retraining and all(j["exactness"]["status"] == "exact" for j in retraining)
    assert subject["email"] not in json.dumps(probe)  # counts only

    from pipeline.extraction import extraction_markdown

    markdown = extraction_markdown(request_id, probe)  # the flow's artifact: the table and the plot
    assert "| before |" in markdown and "| after |" in markdown and "data:image/png;base64,iVBOR" in markdown
