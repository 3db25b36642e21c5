"""``erasure audit certificate | verify-certificate | public-key``: export a
request's signed certificate, verify one offline, export the public key.

``verify-certificate`` needs no database and no settings: exit 0 when the
signature is valid, 1 when it is not, 2 when the file (or the public key) is
unreadable or not a certificate. With only the key embedded in the file, a
valid signature proves the document is intact; ``--public-key`` (obtained from
the issuer, not from the file) proves who signed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from api.cli_common import DbOpt, HomeOpt, JsonOpt, emit, fail, settings_from_flags

OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")]


def register_commands(audit_app: typer.Typer) -> None:
    """Mount this module's commands on ``erasure audit``."""
    audit_app.command("certificate")(certificate)
    audit_app.command("verify-certificate")(verify_certificate_file)
    audit_app.command("public-key")(public_key)


def certificate(
    request_id: Annotated[str, typer.Argument(help="The request id (a UUID).")],
    out: OutOpt = None,
    home: HomeOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a completed request's signed certificate (issued now if a crash left it unissued)."""
    from pipeline.certificate import certify_request
    from pipeline.database import open_database
    from pipeline.lifecycle import RequestNotFound, get_request
    from db.session import unit_of_work

    settings = settings_from_flags(home, database_url)
    engine = open_database(settings)
    try:
        try:
            issued = certify_request(settings, engine, request_id)
            if issued is None:
                with unit_of_work(engine) as session:
                    state = get_request(session, request_id).state
                fail(f"request {request_id} is {state}: a certificate is issued when it completes")
        except RequestNotFound as exc:
            fail(str(exc))
        except ValueError as exc:
            fail(str(exc))
    finally:
        engine.dispose()
    if out is not None:
        try:
            out.write_text(issued.document + "\n", encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}")
        emit({**issued.to_dict(), "path": str(out)}, as_json,
             f"certificate of request {request_id} written to {out} (sha256 {issued.sha256}, key {issued.key_id})")
        return
    if as_json:
        emit(issued.envelope, True, "")
        return
    body = issued.envelope["certificate"]
    lines = [f"certificate of request {request_id}, issued {issued.issued_at.isoformat()}",
             f"  completed {body['request']['completed_at']}, due {body['request']['due_at']}"]
    for section in body["datasets"]:
        erasure, probes = section["erasure"], section["verification"]["membership_probe"]
        exactness = ", ".join(f"shard {j['shard']}: {j['exactness']['status']}" for j in section["retraining"])
        lines.append(f"  dataset {section['dataset']['name']}: {section['locate']['matches']} found, "
                     f"{erasure['records_erased']} erased from {len(erasure['shards'])} shard(s); "
                     f"sub-models retrained: {len(section['retraining'])}" + (f" ({exactness})" if exactness else ""))
        if isinstance(probes, list):
            lines += [f"    membership probe {p['role']}: " + (
                f"AUC {p['auc']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}], "
                f"{p['erased_count']} erased vs {p['heldout_count']} held out" if p["auc"] is not None
                else f"no AUC ({p['reason']})") for p in probes]
    lines += [f"  sha256 {issued.sha256}, signed by key {issued.key_id}",
              "  write it with --out FILE; print the document with --json"]
    typer.echo("\n".join(lines))


def verify_certificate_file(
    file: Annotated[Path, typer.Argument(help="A certificate written by `erasure audit certificate --out`.")],
    public_key_file: Annotated[Optional[Path], typer.Option(
        "--public-key", help="The issuer's public key (PEM), obtained apart from the certificate.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a certificate offline (exit 1 when invalid, 2 when unreadable)."""
    from pipeline.certificate import MalformedCertificate, parse_envelope, verify_certificate

    try:
        envelope = parse_envelope(file.read_bytes())
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except MalformedCertificate as exc:
        fail(f"{file}: {exc}")
    pem = None
    if public_key_file is not None:
        try:
            pem = public_key_file.read_bytes()
        except OSError as exc:
            fail(f"cannot read {public_key_file}: {exc.strerror}")
    try:
        verdict = verify_certificate(envelope, pem)
    except MalformedCertificate as exc:
        fail(f"{file}: {exc}")
    except ValueError as exc:
        fail(f"{public_key_file}: {exc}")
    emit(verdict.to_dict(), as_json, f"certificate of request {verdict.request_id}: {verdict.meaning}")
    if not verdict.valid:
        raise typer.Exit(1)


def public_key(out: OutOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Export the certificate signing key's public half (PEM); the key is created if there is none yet."""
    from pipeline.signing import load_or_create_signing_key

    settings = settings_from_flags(home, None)
    try:
        key = load_or_create_signing_key(settings)
    except ValueError as exc:
        fail(str(exc))
    if out is not None:
        try:
            out.write_text(key.public_key_pem, encoding="ascii")
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror}")
    data = {"key_id": key.key_id, "algorithm": "Ed25519", "public_key_pem": key.public_key_pem,
            "path": str(out) if out else None}
    human = f"public key {key.key_id} written to {out}" if out else key.public_key_pem.rstrip("\n")
    emit(data, as_json, human)
