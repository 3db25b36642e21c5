"""Signed certificates and the membership probe of a real request, end to end
through the flows (a real Prefect server, both database backends): the
certificate verifies offline with the exported public key and fails with one
byte changed or another key; it and the probe rows hold no identifier or text;
a crash between completing and certifying is finished by the scheduled path."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from typer.testing import CliRunner

from db.audit import AuditEvent, Certificate, MembershipProbe, verify_chain
from db.session import unit_of_work
from pipeline.database import open_database
from pipeline.erasure import KILL_ENV, erased_record_ids
from db.settings import use_settings
from tests.prefect_server import submit_for, trained_demo

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 300
PROCESS = dict(review_timeout_s=0, on_review_timeout="erase")


def _cli(*args: str) -> object:
    from api.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _stored(settings, request_id: str) -> tuple:  # noqa: ANN001
    """(certificate row, probe rows, audit events, erased record ids); the audit chain must verify."""
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            cert = session.get(Certificate, request_id)
            probes = session.scalars(select(MembershipProbe).where(MembershipProbe.request_id == request_id)).all()
            events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
            assert verify_chain(session).ok
            erased = erased_record_ids(session, request_id)
            return cert, list(probes), list(events), erased
    finally:
        engine.dispose()


def _personal_strings(demo: dict, erased: list[str]) -> list[str]:
    """Everything that would identify the subject or quote a record: identifiers, texts, record ids."""
    subject = demo["subject"]
    texts = {}
    for line in demo["files"].records.read_text().splitlines():
        row = json.loads(line)
        texts[row["id"]] = row["text"]
    return [subject["email"], subject["name"], subject["user_id"], *erased, *(texts[r] for r in erased),
            *(texts[r][:40] for r in erased)]


def test_certificate_and_probe_of_a_completed_request(settings, prefect_env, tmp_path) -> None:  # noqa: ANN001
    from flows.process_request import process_erasure_request

    demo = trained_demo(settings, records=RECORDS)
    request_id = submit_for(settings, demo["subject"])
    with use_settings(settings):
        outcome = process_erasure_request(request_id, "demo", **PROCESS)
    assert outcome["state"] == "completed" and outcome["erased"] > 0
    cert, probes, events, erased = _stored(settings, request_id)
    assert cert is not None and len(erased) == outcome["erased"]

    # The probe: one row per version, with AUCs; the model before erasure had seen every erased record.
    by_role = {p.role: p for p in probes}
    assert set(by_role) == {"before", "after"}
    for probe in probes:
        assert probe.metric == "reference_calibrated_logit" and probe.erased_count == len(erased)
        assert probe.auc is not None and probe.ci_low <= probe.auc <= probe.ci_high
        assert probe.heldout_count >= 20
        details = json.loads(probe.details)  # the power on records still in training, the distinct texts, a sentence
        assert details["power"]["auc"] is not None and details["power"]["members"] >= 20
        assert 1 <= details["groups"]["erased"] <= len(erased) and details["sentence"]
    assert json.loads(by_role["before"].details)["erased_seen_by_scorer"] == len(erased)
    assert json.loads(by_role["after"].details)["erased_seen_by_scorer"] == 0
    assert (settings.home / "reports" / request_id / "membership-demo.png").read_bytes().startswith(b"\x89PNG")
    print(f"\nmembership AUC before {by_role['before'].auc:.3f} [{by_role['before'].ci_low:.3f}, "
          f"{by_role['before'].ci_high:.3f}], after {by_role['after'].auc:.3f} [{by_role['after'].ci_low:.3f}, "
          f"{by_role['after'].ci_high:.3f}], {len(erased)} erased, {by_role['after'].heldout_count} held out")

    # Nothing personal in the certificate, the probe rows or their audit events.
    stored_text = "\n".join([cert.document, *(p.details for p in probes), *(e.details for e in events)])
    for needle in _personal_strings(demo, erased):
        assert needle not in stored_text, needle

    # The certificate's content, and its anchor in the audit log.
    envelope = json.loads(cert.document)
    body = envelope["certificate"]
    assert body["request"]["id"] == request_id and body["erasure"]["records_erased"] == len(erased)
    [section] = body["datasets"]  # one section per dataset searched
    assert section["dataset"]["name"] == "demo" and section["erasure"]["records_erased"] == len(erased)
    assert section["verification"]["training_manifest"]["passed"] is True
    assert {p["role"] for p in section["verification"]["membership_probe"]} == {"before", "after"}
    # which policy decided matches reached only from a requester's sample (issue 10, point 6)
    assert section["locate"]["sample_only_policy"] == section["locate"]["thresholds"]["sample_only"] == "review"
    assert section["locate"]["sample_only_matches"] == 0  # identifiers only: nothing reached from a sample alone
    after_sentence = json.loads(by_role["after"].details)["sentence"]
    assert after_sentence in body["scope"]["output_suppression"]["statement"]
    assert section["ensemble"]["before"] == by_role["before"].ensemble_version_id
    assert all(s["before"]["version"] < s["after"]["version"] for s in section["erasure"]["shards"])
    # retrained in the recorded runtime, manifest verified: exact, from the job's recorded facts
    assert section["retraining"] and all(j["exactness"]["status"] == "exact" and j["runtime_matches"] is True
                                         for j in section["retraining"])
    assert body["erasure"]["exactness"]["exact"] == len(section["retraining"])
    # completion deleted the superseded files that held the records; the certificate says so
    retained = section["retained"]
    held = retained["checkpoints_with_erased_records"]
    assert retained["superseded_files_on_disk"] == 0 and held["on_disk"] == 0
    assert held["count"] >= 1 and held["purged"] == held["count"]
    assert retained["superseded_shard_versions"]
    assert all(v["files_purged_at"] and not v["file_on_disk"] for v in retained["superseded_shard_versions"])
    assert "no longer on disk" in retained["statement"]
    assert [e.kind for e in events].count("files.purged") == 1
    assert body["scope"]["latent_information_and_downstream_use"]["status"] == "not addressed"
    issued = [e for e in events if e.kind == "certificate.issued"]
    assert len(issued) == 1 and json.loads(issued[0].details)["sha256"] == cert.sha256
    assert issued[0].prev_hash == body["audit_chain_head"]["hash"]
    assert issued[0].id == body["audit_chain_head"]["event_id"] + 1

    # Export and verify offline with the exported public key.
    home = ["--home", str(settings.home), "--database-url", settings.resolved_database_url]
    cert_file, key_file = tmp_path / "cert.json", tmp_path / "issuer.pem"
    assert _cli("audit", "certificate", request_id, "--out", str(cert_file), *home).exit_code == 0
    assert _cli("audit", "public-key", "--out", str(key_file), "--home", str(settings.home)).exit_code == 0
    ok = _cli("audit", "verify-certificate", str(cert_file), "--public-key", str(key_file), "--json")
    assert ok.exit_code == 0, ok.output
    verdict = json.loads(ok.stdout)
    assert verdict["valid"] and verdict["signer_proven"] and verdict["key_source"] == "supplied"
    embedded = json.loads(_cli("audit", "verify-certificate", str(cert_file), "--json").stdout)
    assert embedded["valid"] and not embedded["signer_proven"] and embedded["key_source"] == "embedded"

    # One byte changed (the JSON stays valid): invalid, exit 1.
    data = cert_file.read_bytes()
    at = data.index(b'"records_erased":') + len(b'"records_erased":')
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(data[:at] + str((int(chr(data[at])) + 1) % 10).encode() + data[at + 1:])
    bad = _cli("audit", "verify-certificate", str(tampered), "--public-key", str(key_file), "--json")
    assert bad.exit_code == 1 and json.loads(bad.stdout)["valid"] is False
    assert _cli("audit", "verify-certificate", str(tampered)).exit_code == 1

    # Another key: invalid. Not a certificate, or an unreadable key: exit 2.
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong = _cli("audit", "verify-certificate", str(cert_file), "--public-key", str(other), "--json")
    assert wrong.exit_code == 1 and "not by the supplied key" in json.loads(wrong.stdout)["problem"]
    (tmp_path / "junk.json").write_text("{not json")
    assert _cli("audit", "verify-certificate", str(tmp_path / "junk.json")).exit_code == 2
    assert _cli("audit", "verify-certificate", str(cert_file), "--public-key", str(cert_file)).exit_code == 2
    assert _cli("audit", "verify-certificate", str(tmp_path / "missing.json")).exit_code == 2

    # A rerun changes nothing: the same certificate, the same probes.
    with use_settings(settings):
        again = process_erasure_request(request_id, "demo")
    assert again["state"] == "completed"
    cert_again, probes_again, _, _ = _stored(settings, request_id)
    assert cert_again.sha256 == cert.sha256 and len(probes_again) == 2
    assert oct(settings.signing_key_path.stat().st_mode & 0o777) == "0o600"

    # The purge is idempotent: nothing is left for a second one.
    from pipeline.erasure import purge_superseded_files

    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            purged = purge_superseded_files(settings, session, request_id)
    finally:
        engine.dispose()
    assert purged.shard_versions == [] and purged.checkpoints == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_killed_between_completing_and_certifying_then_scheduled_run_certifies(settings, prefect_env) -> None:  # noqa: ANN001
    from flows.retraining import retrain_pending

    demo = trained_demo(settings, records=RECORDS)
    request_id = submit_for(settings, demo["subject"])
    env = {**prefect_env, "ERASURE_HOME": str(settings.home), "ERASURE_DATABASE_URL": settings.resolved_database_url,
           "ERASURE_SECRET_KEY": settings.secret_key.get_secret_value(), KILL_ENV: "after:verify",
           "PYTHONPATH": str(ROOT)}
    code = ("from flows.process_request import process_erasure_request as p; "
            f"p({request_id!r}, 'demo', **{PROCESS!r})")
    killed = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    cert, probes, _, _ = _stored(settings, request_id)
    assert cert is None and len(probes) == 2  # completed, probed, not yet certified
    with use_settings(settings):
        done = retrain_pending("demo")
    assert {"request_id": request_id, "state": "completed"} in done["completed"]
    cert, _, events, _ = _stored(settings, request_id)
    assert cert is not None and sum(e.kind == "certificate.issued" for e in events) == 1
    with use_settings(settings):
        assert retrain_pending("demo")["completed"] == []  # nothing left to finish
