"""The extraction probe of a request (front end): do the dataset's generative ensembles still
reproduce the erased records' texts? (The measure itself is ``shards.extraction``.)

For a dataset whose ensemble is of a generative family (``lm``), the erased records' texts
are read from the shard versions that last held them (before their purge), and the probe
runs on the ensemble in service before the request's retraining and on the one in service
now. The control set is the live records of the dataset that no member of either ensemble
ever saw (ingested after training, or unlabelled for a classifier): when there are none the
control is reported as unavailable, never invented. ``benchmarks/bench_extraction.py``
measures the control rate on held-out data.

Only counts and rates leave this module (an audit event ``extraction.probed``); the texts
and the continuations are never stored or logged.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.audit import AuditEvent, append_event
from db.session import unit_of_work
from db.settings import Settings
from pipeline.erasure import dataset_or_fail
from pipeline.membership import probe_inputs
from pipeline.training import checkpoint_store
from shards.ensemble import EnsembleVersion, training_ids
from shards.extraction import ProbeReport, ProbeSettings, ensemble_generator, probe_records

ROLES = ("before", "after")
ACTOR = "flow:verify"
MAX_CONTROL = 200
EVENT = "extraction.probed"


def _is_generative(version: EnsembleVersion | None, store) -> bool:  # noqa: ANN001
    if version is None or not version.members:
        return False
    from shards.families import family_named
    from shards.schedule import TrainConfig

    config = TrainConfig.from_dict(store.load(version.members[0].checkpoint)["config"])
    return family_named(config.model.family).kind == "generative"


def generative_dataset(settings: Settings, engine: Engine, dataset: str) -> bool:
    """Is the ensemble in service of ``dataset`` of a generative family (so the classifier probes do not apply)?"""
    from pipeline.training import current_ensemble

    with unit_of_work(engine) as session:
        version = current_ensemble(session, dataset_or_fail(session, dataset).id, settings)
    return _is_generative(version, checkpoint_store(settings, dataset))


def _texts(path: str, ids: list[str]) -> list[tuple[str, str]]:
    table = pq.read_table(path, columns=["record_id", "text"], filters=[("record_id", "in", ids)])
    return sorted(zip(table["record_id"].to_pylist(), table["text"].to_pylist()))


def _control(latest_files: dict[int, str], seen: frozenset[str], limit: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for _, path in sorted(latest_files.items()):
        table = pq.read_table(path, columns=["record_id", "text"])
        out += [(rid, text) for rid, text in zip(table["record_id"].to_pylist(), table["text"].to_pylist())
                if rid not in seen]
    return sorted(out)[:limit]


def stored_extraction(session: Session, request_id: str, dataset: str | None = None) -> dict | None:
    """The latest ``extraction.probed`` event's numbers for the request (and dataset), or None."""
    import json

    rows = session.scalars(select(AuditEvent).where(AuditEvent.kind == EVENT, AuditEvent.request_id == request_id)
                           .order_by(AuditEvent.id.desc())).all()
    for row in rows:
        details = json.loads(row.details)
        if dataset is None or details.get("dataset") == dataset:
            return details
    return None


def probe_extraction(settings: Settings, engine: Engine, request_id: str, dataset: str,
                     probe: ProbeSettings | None = None) -> dict[str, Any] | None:
    """Probe the request's erased records on the ``before`` and ``after`` ensembles of ``dataset`` (and the
    control set on both); record the counts as an audit event. None when the dataset's ensembles are not
    generative (nothing to extract). A rerun returns the stored numbers."""
    from shards.generation import EnsembleLM

    probe = probe or ProbeSettings()
    with unit_of_work(engine) as session:
        dataset_or_fail(session, dataset)
        stored = stored_extraction(session, request_id, dataset)
        if stored is not None:
            return stored
        inputs = probe_inputs(session, request_id, dataset, settings)
    store = checkpoint_store(settings, dataset)
    versions = {role: inputs.versions[role][1] for role in ROLES}
    if not any(_is_generative(v, store) for v in versions.values()):
        return None
    erased: list[tuple[str, str]] = []
    for files in inputs.erased.values():
        for path, ids in files.items():
            erased += _texts(path, list(ids))
    seen = frozenset().union(*(training_ids(v, store) for v in versions.values() if v is not None))
    control = _control(inputs.latest_files, seen | inputs.matched, MAX_CONTROL)
    roles: dict[str, Any] = {}
    for role, version in versions.items():
        if version is None or not version.members:
            roles[role] = {"ensemble_version": None, "erased": None, "control": None}
            continue
        ensemble = EnsembleLM.from_checkpoints(store, [m.checkpoint for m in version.members])
        generate = ensemble_generator(ensemble)
        roles[role] = {"ensemble_version": version.version_id,
                       "erased": _numbers(probe_records(generate, erased, probe)),
                       "control": _numbers(probe_records(generate, control, probe)) if control else None}
    details = {"dataset": inputs.dataset, "settings": probe.to_dict(), "roles": roles,
               "control_records": len(control)}
    with unit_of_work(engine) as session:
        append_event(session, "extraction.probed", details, actor=ACTOR, request_id=str(request_id))
    return details


def _numbers(report: ProbeReport) -> dict[str, Any]:
    """Counts and rates only: what the audit log and the certificate carry."""
    rate = report.extraction
    return {"probed": len(report.records), "skipped_short": report.skipped_short, "extracted": rate.hits,
            "exact": report.exact.hits, "rate": rate.rate, "ci_low": rate.low, "ci_high": rate.high}


def extraction_markdown(request_id: str, details: dict) -> str:
    """The probe of one dataset as markdown (the flow's artifact): counts, rates, intervals and a bar plot."""
    import base64

    from shards.extraction import Rate, render_extraction_png

    def rate(numbers: dict | None) -> Rate | None:
        if not numbers:
            return None
        return Rate(numbers["extracted"], numbers["probed"], numbers["ci_low"], numbers["ci_high"])

    groups = {role: {"erased": rate(n.get("erased")), "control": rate(n.get("control"))}
              for role, n in details["roles"].items()}
    png = render_extraction_png(groups, f"extraction probe, dataset {details['dataset']}")
    lines = [f"# Extraction probe of erasure request {request_id}, dataset {details['dataset']}", "",
             "| version | ensemble | set | probed | extracted | exact | rate | 95% interval |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for role, numbers in details["roles"].items():
        for name in ("erased", "control"):
            n = numbers.get(name)
            if n:
                lines.append(f"| {role} | {(numbers['ensemble_version'] or '')[:12]} | {name} | {n['probed']} | "
                             f"{n['extracted']} | {n['exact']} | {n['rate']:.3f} | "
                             f"[{n['ci_low']:.3f}, {n['ci_high']:.3f}] |")
    lines += ["", extraction_sentence(details) or "", "",
              f"![extraction rates](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"]
    return "\n".join(lines)


def extraction_sentence(details: dict | None) -> str | None:
    """One sentence for the certificate's front-end section (None for the "not run" placeholder)."""
    if not details or "settings" not in details:
        return None
    s = details["settings"]
    parts = []
    for role in ROLES:
        numbers = details["roles"].get(role) or {}
        erased, control = numbers.get("erased"), numbers.get("control")
        if not erased:
            continue
        text = (f"{role}: {erased['extracted']} of {erased['probed']} erased record(s) extracted "
                f"({erased['rate']:.1%}, 95% CI {erased['ci_low']:.1%}-{erased['ci_high']:.1%})")
        if control:
            text += f", control {control['extracted']} of {control['probed']} ({control['rate']:.1%})"
        parts.append(text)
    control_note = ("" if details.get("control_records") else
                    " No never-seen records were available as a control in this dataset.")
    return (f"Extraction probe (prompt {s['prompt_words']} words, greedy {s['continuation_words']} words, extracted "
            f"at a common span of >= {s['span']} words): " + "; ".join(parts) + "." + control_note)
