"""The demo: generate the built-in demo dataset and ingest it.

Later stages (locate, erase, retrain, certify) extend this as they land."""

from __future__ import annotations

from db.settings import Settings
from pipeline.ingest import IngestOptions, ingest_source_file
from pipeline.progress import Reporter
from shards.demo_data import write_demo
from shards.sources import FieldMap

DEMO_FIELDS = FieldMap(
    id_field="id",
    text_field="text",
    label_field="label",
    identifier_fields=(("email", "email"), ("user_id", "user_id"), ("name", "name")),
)


def run_demo(
    settings: Settings, *, records: int, shards: int, slices: int, reporter: Reporter, embedder: str = "minilm"
) -> dict:
    demo_dir = settings.home / "demo" / f"n{records}"
    files = write_demo(demo_dir, records, seed=0)
    summary = ingest_source_file(
        files.records,
        IngestOptions(dataset="demo", fields=DEMO_FIELDS, n_shards=shards, n_slices=slices, embedder=embedder),
        settings,
        reporter,
    )
    return {
        "demo_data": {"records": str(files.records), "ground_truth": str(files.ground_truth),
                      "n_records": files.n_records, "n_persons": files.n_persons, "n_copies": files.n_copies},
        "ingest": summary.to_json(),
        "database": settings.resolved_database_url.split("@")[-1],
        "home": str(settings.home),
    }


# ---------------------------------------------------------------- the whole story


def pick_demo_subject(ground_truth) -> dict:  # noqa: ANN001
    """The fictional person with the most planted copies (every locate method has work)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in Path(ground_truth).read_text().splitlines()]
    person = max((r for r in rows if r["type"] == "person"), key=lambda p: (len(p["copies"]), -p["person"]))
    copies = {r["id"]: r for r in rows if r["type"] == "copy" and r["person"] == person["person"]}
    return {**person, "copy_kinds": {rid: c["kind"] for rid, c in copies.items()}}


def full_retrain_samples(settings: Settings, dataset: str) -> int:
    """What retraining every sub-model from scratch costs now (samples processed)."""
    from db.lineage import latest_shard_versions
    from db.session import unit_of_work
    from pipeline.database import open_database
    from pipeline.erasure import dataset_or_fail
    from pipeline.object_store import shard_file
    from pipeline.training import checkpoint_store, current_ensemble
    from shards.training import TrainConfig, shard_from_parquet

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            ensemble = current_ensemble(session, ds.id, settings)
            versions = latest_shard_versions(session, ds.id)
        if ensemble is None or not ensemble.members:
            return 0
        config = TrainConfig.from_dict(checkpoint_store(settings, dataset).load(ensemble.members[0].checkpoint)["config"])
        total = 0
        for shard, version in versions.items():
            data = shard_from_parquet(shard_file(settings, version, dataset), str(shard), unlabeled="skip")
            total += config.schedule.samples(data.cumulative_sizes(config.num_slices))
        return total
    finally:
        engine.dispose()


def run_full_demo(
    settings: Settings, *, records: int, shards: int, slices: int, reporter: Reporter, embedder: str = "hashing",
    epochs: float = 4.0,
) -> dict:
    """The whole story on the demo data: ingest, train, a request for one fictional
    person, processing (the demo's reviewer decides borderline matches from the
    ground truth, through the same API decisions a person would use), erasure,
    retraining from the affected slices, verification. Flows run in this process
    against ``PREFECT_API_URL`` or, without one, a temporary Prefect server."""
    from db.session import unit_of_work
    from pipeline.database import open_database
    from pipeline.erasure import request_matches, undecided_refs
    from flows.process_request import process_erasure_request
    from pipeline.lifecycle import ReviewInput, record_review_decisions, submit_request
    from db.settings import use_settings
    from flows.training import train_ensemble
    from types import SimpleNamespace

    from pipeline.lifecycle import review_verdicts
    from pipeline.placement import request_retrain_estimates

    ingested = run_demo(settings, records=records, shards=shards, slices=slices, reporter=reporter, embedder=embedder)
    subject = pick_demo_subject(ingested["demo_data"]["ground_truth"])
    truth = set(subject["originals"]) | set(subject["copy_kinds"])
    with use_settings(settings):
        trained = train_ensemble("demo", epochs=epochs)
        engine = open_database(settings)
        submission = submit_request(
            engine, settings.secret_key_bytes(), idempotency_key=f"demo-person-{subject['person']}",
            identifiers=[("email", subject["email"]), ("user_id", subject["user_id"])], samples=[], actor="demo",
        )
        request_id = submission.request_id
        first = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="leave")
        reviewed = []
        if first["state"] == "awaiting_review":
            with unit_of_work(engine) as session:
                refs = undecided_refs(session, request_id)
                reviewed = [ReviewInput(ref, "erase" if ref.split("/", 1)[1] in truth else "keep",
                                        "demo reviewer: ground truth") for ref in refs]
                record_review_decisions(session, request_id, reviewed, reviewer="demo-reviewer",
                                        key=settings.secret_key_bytes())
        with unit_of_work(engine) as session:
            # What the decided matches will cost, priced before the erasure (the planner's own sums), with
            # the reviewer's verdicts the next pass applies; matches a first pass already erased count as
            # the shards held them before.
            verdicts = review_verdicts(session, request_id)
            decided = [SimpleNamespace(
                dataset_id=m.dataset_id, shard=m.shard, slice=m.slice, erased_in_shard_version=m.erased_in_shard_version,
                final_decision=m.final_decision if m.final_decision is not None else verdicts.get(m.match_ref))
                for m in request_matches(session, request_id)]
            estimate = request_retrain_estimates(settings, session, decided).get("demo")
        summary = process_erasure_request(request_id, "demo", review_timeout_s=0, on_review_timeout="leave")
        with unit_of_work(engine) as session:
            matches = request_matches(session, request_id)
            found = {m.record_id for m in matches}
            by_method: dict[str, dict] = {}
            for m in matches:
                row = by_method.setdefault(m.method, {"found": 0, "erased": 0, "kept": 0, "truly_the_subjects": 0})
                row["found"] += 1
                row["erased"] += m.erased_in_shard_version is not None
                row["kept"] += m.final_decision == "keep"
                row["truly_the_subjects"] += m.record_id in truth
        accountability = _accountability(settings, engine, request_id)
        accountability["residue"] = _residue(settings, engine, request_id)
        engine.dispose()
        full = full_retrain_samples(settings, "demo")
    retrained = [j for j in summary["retraining"] if j["status"] == "done"]
    sisa_samples = sum(j["samples_processed"] or 0 for j in retrained)
    missed = truth - found
    return {
        "ingest": ingested["ingest"],
        "train": {"ensemble_version": trained["ensemble_version"], "shards": len(trained["shards"])},
        "subject": {"person": subject["person"], "originals": len(subject["originals"]),
                    "planted_copies": dict(sorted(_count(subject["copy_kinds"].values()).items()))},
        "request_id": request_id,
        "state": summary["state"],
        "found_by_method": dict(sorted(by_method.items())),
        "reviewed": {"erase": sum(r.decision == "erase" for r in reviewed),
                     "keep": sum(r.decision == "keep" for r in reviewed)},
        "missed": {"records": len(missed),
                   "kinds": dict(sorted(_count(subject["copy_kinds"].get(r, "original") for r in missed).items()))},
        "erased": summary["erased"],
        "shards": summary["shards"],
        "retraining": retrained,
        "retrain_estimate": estimate,
        "cost": {"sisa_samples": sisa_samples, "full_retrain_samples": full,
                 "fraction_of_full": round(sisa_samples / full, 4) if full else None,
                 "estimate_agrees": None if estimate is None else (
                     estimate["samples"] == sisa_samples and estimate["full_training_samples"] == full)},
        "accountability": accountability,
        "database": settings.resolved_database_url.split("@")[-1],
        "home": str(settings.home),
    }


def _residue(settings: Settings, engine, request_id: str) -> dict:  # noqa: ANN001
    """The residue check (pipeline/residue.py), Prefect's records included: the flows ran in this process."""
    from flows.prefect_records import request_run_records
    from pipeline.residue import check_residue

    return check_residue(settings, engine, request_id, prefect_records=request_run_records)


SCOPE_ORDER = ("back_end_removal", "near_copies_and_paraphrases", "output_suppression",
               "latent_information_and_downstream_use")


def _accountability(settings: Settings, engine, request_id: str) -> dict:  # noqa: ANN001
    """What an auditor gets: the certificate (written to the reports folder and checked
    offline against the exported public key), the membership probe, the audit log."""
    from db.audit import verify_chain
    from db.session import unit_of_work
    from pipeline.certificate import parse_envelope, stored_certificate, verify_certificate
    from pipeline.membership import forgetting_sentence, probe_rows, probe_summary, request_reports_folder
    from pipeline.signing import load_or_create_signing_key

    with unit_of_work(engine) as session:
        issued = stored_certificate(session, request_id)
        probes = [probe_summary(row) for row in probe_rows(session, request_id)]
        chain = verify_chain(session)
    result: dict = {"membership_probe": probes, "membership_sentence": forgetting_sentence(probes),
                    "audit_log": chain.to_dict(), "certificate": None}
    if issued is not None:
        folder = request_reports_folder(settings, request_id)
        folder.mkdir(parents=True, exist_ok=True)
        cert_file = folder / "certificate.json"
        cert_file.write_text(issued.document, encoding="utf-8")
        key_file = folder / "issuer-public-key.pem"
        key_file.write_text(load_or_create_signing_key(settings).public_key_pem, encoding="utf-8")
        verdict = verify_certificate(parse_envelope(cert_file.read_text(encoding="utf-8")), key_file.read_text())
        scope = issued.envelope["certificate"]["scope"]
        result["certificate"] = {**issued.to_dict(), "file": str(cert_file), "public_key_file": str(key_file),
                                 "verified_offline": verdict.valid and verdict.signer_proven,
                                 "scope": {k: scope[k]["status"] for k in SCOPE_ORDER if k in scope}}
    return result


def _count(values) -> dict[str, int]:  # noqa: ANN001
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
