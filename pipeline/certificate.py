"""Signed erasure certificates: what was found, erased, retrained, measured and
not addressed for one completed request, signed with Ed25519.

Envelope (stored in ``certificates.document`` as canonical JSON, exactly as issued):

    {"certificate": {...},
     "signature": {"algorithm": "Ed25519", "key_id": sha256(raw public key),
                   "public_key_pem": "...", "value": base64(Ed25519(canonical_json(certificate)))}}

The certificate holds ids, counts, hashes, thresholds and times only: the
subject's identifiers as the keyed hashes the request stored, the erased
records as a count and one digest of their sorted ids (record ids are
pseudonymous keys, but a data owner's key may still carry meaning, so they are
not listed), never a sample or a record's text. It also names the audit log's
head at issue time (the last event's id and hash; the ``certificate.issued``
event links to it), so a log truncated later cannot hide events the
certificate saw. What still holds the erased records on disk (superseded shard
versions and checkpoints, until ``purge_superseded_files`` deletes them) is
counted, not hidden.

A request is processed against every dataset (or those it named), so the
certificate has a section per dataset searched (``datasets``): what was found
there, erased, retrained (with the exactness of each shard's retraining) and
measured. Exactness is stated only from recorded facts: a shard is ``exact``
when its retraining job recorded that it ran in the runtime recorded in the
checkpoints it restored (device kind, torch version, CPU threads,
deterministic mode) under the same model config, and the training manifest of
the ensemble in service was verified when the certificate was issued. A
retraining allowed on another runtime is certified as such (the model never
saw the records; it is not bitwise comparable with a from-scratch run).

One certificate per request (``certify_request`` returns the stored one on a
rerun). ``verify_certificate`` needs no database and no settings: it checks
the signature and the key id. With only the embedded public key it proves the
document is intact, not who signed it: anyone can sign a document with a key of
their own. A public key obtained apart from the document (``--public-key``)
proves it was signed by that key's holder.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.audit import AuditEvent, Certificate, append_event, canonical_json, chain_head
from db.models import Dataset, Record, ShardVersion, utcnow
from db.requests import ErasureRequest
from db.session import unit_of_work
from db.settings import Settings
from db.training import JOB_DONE, Checkpoint, EnsembleMemberRow, RequestMatch, ShardRetrainJob
from pipeline.signing import ALGORITHM, SigningKey, key_id, load_or_create_signing_key, load_public_key, signature_valid
from pipeline.object_store import home_path_of, shard_version_home_path, still_stored

CERTIFICATE_FORMAT = "erasure-certificate/2"  # /2: a section per dataset; exactness per shard
ACTOR = "flow:certify"
RECORD_IDS_DIGEST = "sha256 of the sorted erased record ids joined by '\\n' (UTF-8); the ids are not listed"


class MalformedCertificate(ValueError):
    """The input is not a certificate envelope (unreadable JSON or missing parts)."""


@dataclass(frozen=True)
class IssuedCertificate:
    request_id: str
    document: str  # canonical JSON of the envelope, as signed and stored
    sha256: str
    key_id: str
    issued_at: datetime

    @property
    def envelope(self) -> dict:
        return json.loads(self.document)

    @classmethod
    def from_row(cls, row: Certificate) -> IssuedCertificate:
        return cls(row.request_id, row.document, row.sha256, row.key_id, row.issued_at)

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "sha256": self.sha256, "key_id": self.key_id,
                "issued_at": self.issued_at.isoformat()}


# ---------------------------------------------------------------- issuing


def stored_certificate(session: Session, request_id: str) -> IssuedCertificate | None:
    row = session.get(Certificate, str(request_id))
    return IssuedCertificate.from_row(row) if row is not None else None


def certify_request(settings: Settings, engine: Engine, request_id: str, *,
                    prefect_records=None) -> IssuedCertificate | None:  # noqa: ANN001
    """Issue the request's certificate once it is completed; the stored one if it exists;
    None while the request is not completed. ``prefect_records``: the reader of Prefect's
    records for the residue check (``flows.prefect_records``; None: Prefect not checked)."""
    from pipeline.lifecycle import RequestState, get_request
    from pipeline.residue import residue_for_certificate

    # The residue check, outside the transaction: it reads files, may ask Prefect, records an event.
    residue = residue_for_certificate(settings, engine, request_id, prefect_records=prefect_records)
    try:
        with unit_of_work(engine) as session:
            request = get_request(session, request_id, for_update=True)
            existing = stored_certificate(session, request_id)
            if existing is not None or request.state != RequestState.COMPLETED:
                return existing
            key = load_or_create_signing_key(settings)
            body = build_certificate(settings, session, request)
            body["residue"] = residue  # what the residue check found (pipeline/residue.py)
            body["audit_chain_head"] = audit_chain_head(session)
            document = canonical_json(sign_certificate(body, key))
            digest = hashlib.sha256(document.encode("utf-8")).hexdigest()
            row = Certificate(request_id=request.id, issued_at=datetime.fromisoformat(body["issued_at"]),
                              document=document, sha256=digest, key_id=key.key_id)
            session.add(row)
            session.flush()
            append_event(session, "certificate.issued", {"sha256": digest, "key_id": key.key_id},
                         actor=ACTOR, request_id=request.id)
            issued = IssuedCertificate.from_row(row)
    except IntegrityError:  # another process issued it first (SQLite has no row lock): keep theirs
        with unit_of_work(engine) as session:
            issued = stored_certificate(session, request_id)
        if issued is None:
            raise
    return issued


def sign_certificate(certificate: dict, key: SigningKey) -> dict:
    return {"certificate": certificate,
            "signature": {"algorithm": ALGORITHM, "key_id": key.key_id, "public_key_pem": key.public_key_pem,
                          "value": key.sign(canonical_json(certificate).encode("utf-8"))}}


def audit_chain_head(session: Session) -> dict:
    """The last audit event, so the ``certificate.issued`` event appended next links to it."""
    event_id, digest = chain_head(session)
    return {"event_id": event_id, "hash": digest}


# ---------------------------------------------------------------- the document


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def searched_datasets(session: Session, request_id: str) -> list[Dataset]:
    """The datasets the request was processed against: those its locate step searched
    (``dataset.searched`` events) and those it has matches in, by name."""
    ids = set(session.scalars(select(RequestMatch.dataset_id).where(RequestMatch.request_id == str(request_id))))
    for details in session.scalars(select(AuditEvent.details).where(
            AuditEvent.request_id == str(request_id), AuditEvent.kind == "dataset.searched")):
        ids.add(int(json.loads(details)["dataset_id"]))
    return sorted((session.get(Dataset, i) for i in ids), key=lambda d: d.name)


def build_certificate(settings: Settings, session: Session, request: ErasureRequest) -> dict:
    """The certificate body of a completed request (without the audit head): the request,
    the subject, a section per dataset, and the scope over all of them."""
    all_matches = _matches(session, request.id)
    sections = [_dataset_section(settings, session, request, dataset,
                                 [m for m in all_matches if m.dataset_id == dataset.id])
                for dataset in searched_datasets(session, request.id)]
    return {
        "format": CERTIFICATE_FORMAT,
        "issued_at": utcnow().isoformat(),
        "request": {
            "id": request.id, "received_at": _iso(request.received_at), "original_due_at": _iso(request.original_due_at),
            "due_at": _iso(request.due_at), "extension_months": request.extension_months,
            "completed_at": _iso(request.closed_at), "state": request.state,
            "completed_on_time": request.closed_at is not None and request.closed_at <= request.due_at,
        },
        "subject": {
            "identifiers": [{"kind": i.kind, "keyed_hash": i.keyed_hash} for i in request.identifiers],
            "identifier_hashing": "HMAC-SHA256 of 'kind:normalised value' with the dataset's identifier key "
                                  "(key id below); neither the key nor the values are in this certificate",
            "samples_received": request.sample_count,
            "samples_purged_at": _iso(request.samples_purged_at),
        },
        "datasets_requested": json.loads(request.datasets) if request.datasets else "every dataset",
        "datasets": sections,
        "erasure": {"records_erased": sum(s["erasure"]["records_erased"] for s in sections),
                    "datasets": len(sections),
                    "shards_retrained": sum(len(s["retraining"]) for s in sections),
                    "exactness": _exactness_counts(sections)},
        "scope": _scope(sections),
    }


def _dataset_section(settings: Settings, session: Session, request: ErasureRequest, dataset: Dataset,
                     matches: list[RequestMatch]) -> dict:
    """One dataset's part: found, erased, retrained (exactness per shard), ensemble, verified, retained."""
    erased = [m for m in matches if m.erased_in_shard_version is not None]
    erased_ids = sorted({m.record_id for m in erased})
    verification = _verification_section(settings, session, request.id, dataset)
    manifest = verification.get("training_manifest")
    manifest_passed = manifest is not None and manifest.get("passed") is True
    return {
        "dataset": {"name": dataset.name, "shards": dataset.n_shards, "slices": dataset.n_slices,
                    "embedder": dataset.embedder, "identifier_key_id": dataset.key_id},
        "locate": _locate_section(session, request, dataset, matches),
        "erasure": _erasure_section(session, dataset, erased, erased_ids),
        "retraining": _retraining_section(session, request.id, dataset, manifest_passed),
        "ensemble": _ensemble_section(session, dataset, request.id),
        "verification": verification,
        "retained": _retained_section(settings, session, request.id, dataset, erased),
    }


def _matches(session: Session, request_id: str) -> list[RequestMatch]:
    from pipeline.erasure import request_matches

    return request_matches(session, request_id)


def _thresholds(dataset: Dataset | None) -> dict:
    from dedup.policy import default_thresholds

    return default_thresholds(dataset.embedder if dataset is not None else None).to_dict()


def _locate_section(session: Session, request: ErasureRequest, dataset: Dataset | None,
                    matches: list[RequestMatch]) -> dict:
    from pipeline.erasure import per_method_counts

    reviewed = {d.match_ref for d in request.review_decisions}
    borderline = [m for m in matches if m.decision == "review"]
    return {
        "thresholds": {**_thresholds(dataset), "sample_only": request.sample_only_policy or "review"},
        "thresholds_source": "dedup.policy defaults for the dataset's embedder: identifier matches are erased; "
                             "jaccard >= jaccard_erase erase, >= jaccard_review review; cosine >= cosine_erase "
                             "erase, >= cosine_review review; an embedding neighbour at rank <= margin_max_rank "
                             "(margin_max_rank > 0) with cosine >= cosine_floor reviews when its neighbourhood "
                             "ratio margin >= margin_review_lower (ranks 2 and below) or, at rank 1, its score "
                             "(margin + lead_weight x its cosine lead over the runner-up) >= margin_review, or >= "
                             "margin_review_spans when the texts share a "
                             "span_review_words-word span; below: kept, not recorded",
        "matches": len(matches),
        "by_method": per_method_counts(matches),
        # How matches reached only from a requester's sample were decided (dedup.policy.SampleOnly):
        # "review" (whatever their score) unless ERASURE_SAMPLE_ONLY_MATCHES=score.
        "sample_only_policy": request.sample_only_policy or "review",
        "sample_only_matches": sum(m.provenance == "sample" for m in matches),
        "review": {
            "borderline": len(borderline),
            "decided_by_reviewer": sum(m.match_ref in reviewed for m in borderline),
            "decided_by_timeout_policy": sum(m.match_ref not in reviewed and m.final_decision is not None
                                             for m in borderline),
            "erased": sum(m.final_decision == "erase" for m in borderline),
            "kept": sum(m.final_decision == "keep" for m in borderline),
        },
    }


def _version_row(session: Session, dataset_id: int, shard: int, version: int) -> ShardVersion | None:
    return session.scalars(select(ShardVersion).where(
        ShardVersion.dataset_id == dataset_id, ShardVersion.shard == shard, ShardVersion.version == version)).first()


def _version_dict(row: ShardVersion | None) -> dict | None:
    return None if row is None else {"version": row.version, "sha256": row.sha256, "rows": row.row_count,
                                     "created_by": row.created_by}


def _erasure_section(session: Session, dataset: Dataset | None, erased: list[RequestMatch], erased_ids: list[str]) -> dict:
    from pipeline.membership import holding_version

    shards = []
    by_shard: dict[tuple[int, int], int] = defaultdict(int)
    for m in erased:
        by_shard[(m.shard, m.erased_in_shard_version)] += 1
    for (shard, version), count in sorted(by_shard.items()):
        shards.append({
            "shard": shard, "records": count,
            "before": _version_dict(holding_version(session, dataset.id, shard, version)),
            "after": _version_dict(_version_row(session, dataset.id, shard, version)),
        })
    return {
        "records_erased": len(erased_ids),
        "record_ids_sha256": hashlib.sha256("\n".join(erased_ids).encode("utf-8")).hexdigest(),
        "record_ids_digest": RECORD_IDS_DIGEST,
        "shards": shards,
    }


EXACT = "exact"
DIFFERENT_RUNTIME = "different_runtime"
NO_SUB_MODEL = "no_sub_model"
NOT_ESTABLISHED = "not_established"
EXACTNESS_STATEMENTS = {
    EXACT: "retrained without the records from the checkpoint before their earliest slice, in the runtime "
           "recorded in its checkpoints (device kind, torch version, CPU threads, deterministic mode) and under "
           "the same model config; by SISA it is bitwise the sub-model trained from scratch without them, and "
           "the training manifest of the ensemble in service was verified",
    DIFFERENT_RUNTIME: "retrained without the records on a different runtime: the model never saw them; "
                       "not bitwise comparable",
    NO_SUB_MODEL: "no trainable record remained in the shard (or it had no sub-model): no sub-model of it is "
                  "in service",
}


def shard_exactness(job: ShardRetrainJob, manifest_passed: bool) -> tuple[str, str]:
    """(status, statement) of one shard's retraining, from what its job recorded only."""
    if job.status != JOB_DONE:
        return NOT_ESTABLISHED, f"the retraining is {job.status}, not done"
    if job.outcome in ("emptied", "untrained"):
        return NO_SUB_MODEL, EXACTNESS_STATEMENTS[NO_SUB_MODEL]
    if job.runtime_matches is None or job.config_matches is None:
        return NOT_ESTABLISHED, ("the runtime of this retraining was not recorded (it ran before runtimes were "
                                 "recorded per job): exactness is not claimed")
    if not manifest_passed:
        return NOT_ESTABLISHED, "the training manifest of the ensemble in service was not verified"
    if not job.config_matches:
        return NOT_ESTABLISHED, ("a checkpoint of the retrained chain records another model config: "
                                 "exactness is not claimed")
    if not job.runtime_matches:
        return DIFFERENT_RUNTIME, EXACTNESS_STATEMENTS[DIFFERENT_RUNTIME]
    return EXACT, EXACTNESS_STATEMENTS[EXACT]


def _runtime(recorded: str | None) -> dict | None:
    return json.loads(recorded) if recorded else None


def _retraining_section(session: Session, request_id: str, dataset: Dataset, manifest_passed: bool) -> list[dict]:
    from pipeline.erasure import request_jobs

    rows = []
    for j in request_jobs(session, request_id):
        if j.dataset_id != dataset.id:
            continue
        status, statement = shard_exactness(j, manifest_passed)
        rows.append({
            "job_id": j.id, "shard": j.shard, "status": j.status, "outcome": j.outcome,
            "trained_on_shard_version": j.target_shard_version,
            "restored_checkpoint_after_slice": j.restored_slice,
            "retrained_from_slice": None if j.restored_slice is None else j.restored_slice + 1,
            "samples_processed": j.samples_processed, "full_shard_samples": j.full_training_samples,
            "device": j.device, "runtime": _runtime(j.runtime), "recorded_runtime": _runtime(j.recorded_runtime),
            "runtime_matches": j.runtime_matches, "config_matches": j.config_matches,
            "exactness": {"status": status, "statement": statement},
            "ensemble_version": j.ensemble_version_id, "finished_at": _iso(j.finished_at)})
    return rows


def _exactness_counts(sections: list[dict]) -> dict[str, int]:
    counts = {EXACT: 0, DIFFERENT_RUNTIME: 0, NO_SUB_MODEL: 0, NOT_ESTABLISHED: 0}
    for section in sections:
        for job in section["retraining"]:
            counts[job["exactness"]["status"]] += 1
    return counts


def _ensemble_section(session: Session, dataset: Dataset | None, request_id: str) -> dict:
    from pipeline.membership import ensembles_around_request

    if dataset is None:
        return {"before": None, "in_service": None}
    before, after = ensembles_around_request(session, dataset.id, request_id)
    return {"before": before.version_id if before else None, "in_service": after.version_id if after else None}


def _verification_section(settings: Settings, session: Session, request_id: str, dataset: Dataset | None) -> dict:
    from pipeline.erasure import verify_request
    from pipeline.membership import probe_rows, probe_summary

    manifest = None
    if dataset is not None:
        manifest = {**verify_request(settings, session, request_id, dataset.name).to_dict(),
                    "method": "no erased record id is in the seen_ids of any member checkpoint of the ensemble "
                              "in service, checked when this certificate was issued"}
    probes = [probe_summary(r) for r in probe_rows(session, request_id, dataset.id if dataset is not None else None)]
    if probes:
        probe: list[dict] | dict = probes
    else:
        probe = {"status": "not run", "reason": "no probe is stored for this dataset of the request (it runs after "
                                                "retraining when records were erased from it)"}
    from pipeline.extraction import stored_extraction

    extraction = stored_extraction(session, request_id, dataset.name if dataset is not None else None)
    return {"training_manifest": manifest, "membership_probe": probe,
            "extraction_probe": extraction if extraction is not None else {
                "status": "not run", "reason": "the dataset's ensembles are not generative, or no records were "
                                               "erased from it"}}


def _retained_section(settings: Settings, session: Session, request_id: str, dataset: Dataset | None,
                      erased: list[RequestMatch]) -> dict:
    """Artefacts that held the erased records, counted with whether their files still exist.

    A shard version v of shard s held record r iff ``r.first_shard_version <= v <
    r.erased_in_shard_version``; a checkpoint after slice c trained for such a
    version saw r iff also ``c >= r.slice`` (slices are cumulative; the lineage
    rule of ``pipeline.erasure.purge_superseded_files``)."""
    from pipeline.locate import load_tombstones

    if dataset is None or not erased:
        return {"superseded_shard_versions": [], "superseded_files_on_disk": 0,
                "checkpoints_with_erased_records": {"count": 0, "on_disk": 0, "purged": 0},
                "tombstones": 0, "statement": "nothing was erased"}
    held: dict[int, list[Record]] = defaultdict(list)
    for record in session.scalars(select(Record).where(
            Record.dataset_id == dataset.id, Record.record_id.in_(sorted({m.record_id for m in erased})))):
        if record.erased_in_shard_version is not None:
            held[record.shard].append(record)

    def holds(shard: int, version: int, from_slice: int) -> bool:
        return any(r.first_shard_version <= version < r.erased_in_shard_version and r.slice <= from_slice
                   for r in held[shard])

    versions, checkpoints = [], []
    for shard in sorted(held):
        newest = max(r.erased_in_shard_version for r in held[shard])
        for row in session.scalars(select(ShardVersion).where(
                ShardVersion.dataset_id == dataset.id, ShardVersion.shard == shard, ShardVersion.version < newest)
                .order_by(ShardVersion.version)):
            if holds(shard, row.version, 1 << 30):
                home_path = shard_version_home_path(settings, dataset.name, shard, row.version)
                here = home_path_of(settings, row.path, home_path)  # a storage URL: this host's copy
                versions.append({"shard": shard, "version": row.version, "sha256": row.sha256,
                                 "file_on_disk": still_stored(settings, row.path, home_path),
                                 "indexes_on_disk": Path(f"{here}.dedup").exists(),
                                 "files_purged_at": _iso(row.files_purged_at)})
        checkpoints += [row for row in session.scalars(select(Checkpoint).where(
            Checkpoint.dataset_id == dataset.id, Checkpoint.shard == shard, Checkpoint.shard_version < newest))
            if holds(shard, row.shard_version, row.slice)]
    checkpoint_home = settings.home / "checkpoints" / dataset.name
    checkpoints_on_disk = sum(still_stored(settings, c.path, checkpoint_home / c.key[:2] / f"{c.key}.pt")
                              for c in checkpoints)
    keys = [c.key for c in checkpoints]
    in_ensembles = len(set(session.scalars(select(EnsembleMemberRow.ensemble_id).where(
        EnsembleMemberRow.dataset_id == dataset.id, EnsembleMemberRow.checkpoint_key.in_(keys))))) if keys else 0
    tombstones = load_tombstones(settings, dataset.name)
    files_on_disk = sum(v["file_on_disk"] or v["indexes_on_disk"] for v in versions)
    if files_on_disk or checkpoints_on_disk:
        where = (f"{files_on_disk} of {len(versions)} superseded shard version file(s) (with their locate "
                 f"indexes) and {checkpoints_on_disk} of {len(checkpoints)} sub-model checkpoint(s) that held the "
                 "erased records are still on disk: the store keeps superseded versions until they are purged, "
                 "and they have not been purged for this request. They are not in service: the current shard "
                 "versions and the ensemble in service do not hold the records (see verification).")
    else:
        where = (f"The {len(versions)} superseded shard version file(s) and {len(checkpoints)} checkpoint(s) that "
                 "held the erased records are no longer on disk (their lineage rows remain). Backups and copies "
                 "made outside this pipeline are not covered.")
    return {
        "superseded_shard_versions": versions,
        "superseded_files_on_disk": files_on_disk,
        "checkpoints_with_erased_records": {
            "count": len(checkpoints), "on_disk": checkpoints_on_disk,
            "purged": sum(c.file_purged_at is not None for c in checkpoints),
            "ensemble_versions_using_them": in_ensembles},
        "tombstones": sum(key.startswith(f"{request_id}/") for key in tombstones.keys) if tombstones else 0,
        "statement": where + (" The erased records' MinHash signatures are kept as tombstones to screen "
                              "re-ingested data; they are not the text, and they are keyed with the dataset's "
                              "secret key, so they confirm no guessed text to anyone without it."),
    }


def _back_end_statement(sections: list[dict], erased: int) -> str:
    """What the removal did, claiming exactness only for the shards whose jobs recorded it."""
    counts = _exactness_counts(sections)
    retrained = sum(counts.values())
    names = ", ".join(s["dataset"]["name"] for s in sections) or "none"
    text = (f"{erased} record(s) found for the subject and decided 'erase' were removed from the training data of "
            f"{len(sections)} dataset(s) searched ({names}): new shard versions without them. ")
    if not retrained:
        return text + "No trained sub-model had seen them, so none was retrained."
    text += f"Of the {retrained} sub-model retraining(s): "
    parts = []
    if counts[EXACT]:
        parts.append(f"{counts[EXACT]} exact (retrained from the checkpoint before the earliest slice that held "
                     "them, in the recorded runtime and config: by SISA bitwise the sub-model trained without them)")
    if counts[DIFFERENT_RUNTIME]:
        parts.append(f"{counts[DIFFERENT_RUNTIME]} retrained without the records on a different runtime: the model "
                     "never saw them; not bitwise comparable")
    if counts[NO_SUB_MODEL]:
        parts.append(f"{counts[NO_SUB_MODEL]} left no sub-model (no trainable record remained)")
    if counts[NOT_ESTABLISHED]:
        parts.append(f"{counts[NOT_ESTABLISHED]} without recorded runtime facts or verified manifest: exactness is "
                     "not claimed")
    return text + "; ".join(parts) + (". The training manifest check of each dataset's ensemble in service is in "
                                      "its section.")


def _scope(sections: list[dict]) -> dict:
    from pipeline.extraction import extraction_sentence
    from pipeline.membership import forgetting_sentence

    erased = sum(s["erasure"]["records_erased"] for s in sections)
    review = [s["locate"]["review"] for s in sections]
    thresholds = "; ".join(
        f"{s['dataset']['name']}: MinHash verified Jaccard >= {s['locate']['thresholds']['jaccard_erase']} erased, "
        f">= {s['locate']['thresholds']['jaccard_review']} to review, embedding cosine >= "
        f"{s['locate']['thresholds']['cosine_review']} to review, >= {s['locate']['thresholds']['cosine_erase']} "
        "erased" for s in sections)
    return {
        "back_end_removal": {
            "status": "done" if erased else "nothing to remove",
            "statement": _back_end_statement(sections, erased),
        },
        "near_copies_and_paraphrases": {
            "status": "searched at the thresholds stated",
            "statement": (f"Copies without the subject's identifiers were searched in every dataset listed "
                          f"({thresholds or 'none'}), one hop from the subject's records; "
                          f"{sum(r['borderline'] for r in review)} borderline match(es) went to review "
                          f"({sum(r['erased'] for r in review)} erased, {sum(r['kept'] for r in review)} kept). "
                          "Copies below these thresholds, and data never ingested into this pipeline, were not "
                          "found and not removed."),
        },
        "output_suppression": {
            "status": "measured, not guaranteed",
            "statement": ("What was measured: a reference-calibrated membership-inference probe (each erased "
                          "record's confidence under its shard's sub-model, calibrated on the sub-models that never "
                          "saw it, against other people's records that sub-model never saw; its power measured on "
                          "records still in training) before and after retraining, and the POST /v1/screen endpoint "
                          "screens new text against the erased records' tombstones. "
                          + "".join(f"{s['dataset']['name']}: {line} " if len(sections) > 1 else f"{line} "
                                    for s in sections
                                    if (line := forgetting_sentence(s["verification"]["membership_probe"])))
                          + "".join(f"{line} " for s in sections
                                    if (line := extraction_sentence(s["verification"].get("extraction_probe"))))
                          + "Nothing else: no control stops a model from producing output that resembles the "
                          "subject's data."),
        },
        "latent_information_and_downstream_use": {
            "status": "not addressed",
            "statement": ("What the models can infer about the subject from other people's records, and copies "
                          "or uses outside this pipeline (exports, caches, backups, models distilled or fine-tuned "
                          "from these ones), are not addressed by this certificate."),
        },
    }


# ---------------------------------------------------------------- offline verification


@dataclass(frozen=True)
class CertificateVerdict:
    valid: bool
    request_id: str | None
    key_id: str | None  # the key id the signature names
    key_source: str  # "supplied": a public key given apart from the document; "embedded": the document's own
    signer_proven: bool
    problem: str | None = None

    @property
    def meaning(self) -> str:
        if not self.valid:
            return f"INVALID: {self.problem}"
        if self.signer_proven:
            return f"valid: signed by the holder of the supplied key {self.key_id}"
        return (f"valid with the embedded key {self.key_id}: the document is intact, but the embedded key does not "
                "prove who signed it; verify with --public-key from the issuer")

    def to_dict(self) -> dict:
        return {"valid": self.valid, "request_id": self.request_id, "key_id": self.key_id,
                "key_source": self.key_source, "signer_proven": self.signer_proven, "problem": self.problem,
                "meaning": self.meaning}


def parse_envelope(data: str | bytes) -> dict:
    """The envelope from a file's text; ``MalformedCertificate`` says what is wrong."""
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedCertificate(f"not JSON ({exc}); give a file written by `erasure audit certificate --out`") from None
    _check_shape(envelope)
    return envelope


def _check_shape(envelope: Any) -> None:
    if not isinstance(envelope, dict) or not isinstance(envelope.get("certificate"), dict) \
            or not isinstance(envelope.get("signature"), dict):
        raise MalformedCertificate("not a certificate envelope: expected an object with 'certificate' and "
                                   "'signature' objects")
    missing = [k for k in ("algorithm", "key_id", "public_key_pem", "value")
               if not isinstance(envelope["signature"].get(k), str)]
    if missing:
        raise MalformedCertificate(f"the signature lacks {', '.join(missing)}")


def verify_certificate(envelope: dict, public_key_pem: str | bytes | None = None) -> CertificateVerdict:
    """Check the signature over ``canonical_json(envelope['certificate'])`` and the key id.

    Without ``public_key_pem`` the embedded key is used (integrity only). A
    supplied key that is not Ed25519 PEM raises ``ValueError``; a malformed
    envelope raises ``MalformedCertificate``.
    """
    _check_shape(envelope)
    certificate, signature = envelope["certificate"], envelope["signature"]
    request = certificate.get("request")
    request_id = request.get("id") if isinstance(request, dict) else None
    claimed = signature["key_id"]
    supplied = load_public_key(public_key_pem) if public_key_pem is not None else None
    source = "supplied" if supplied is not None else "embedded"

    def invalid(problem: str) -> CertificateVerdict:
        return CertificateVerdict(False, request_id, claimed, source, False, problem)

    if signature["algorithm"] != ALGORITHM:
        return invalid(f"signature algorithm {signature['algorithm']!r}, expected {ALGORITHM}")
    try:
        embedded = load_public_key(signature["public_key_pem"])
    except ValueError:
        return invalid("the embedded public key is unreadable")
    if key_id(embedded) != claimed:
        return invalid("the key_id does not match the embedded public key")
    if supplied is not None and key_id(supplied) != claimed:
        return invalid(f"signed by key {claimed}, not by the supplied key {key_id(supplied)}")
    try:
        body = canonical_json(certificate).encode("utf-8")
    except ValueError as exc:
        return invalid(f"the certificate cannot be canonicalised ({exc})")
    if not signature_valid(supplied or embedded, signature["value"], body):
        return invalid("the signature does not match the certificate: it was changed after signing")
    return CertificateVerdict(True, request_id, claimed, source, supplied is not None)
