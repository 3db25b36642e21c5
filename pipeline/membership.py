"""The membership-inference probe of an erasure request: does the model still
treat the erased records as training data?

Members and held-out records. Under SISA a record of shard s was seen by
sub-model s only. So each erased record is scored by the sub-model of its own
shard (the one that held it), and the held-out records of that sub-model are a
seeded random sample of records of the *other* shards that the request did not
match: records it never saw, drawn from the same placement hash, so from the
same distribution as the shard's own data. Per shard, 20 held-out records per
erased record (at least 20, at most 1000), so the pooled AUC weighs each
sub-model as the erased records do; the same sample serves both versions.

Score: the per-record cross-entropy loss of that sub-model (``metric``
``cross_entropy_loss``); AUC = P(loss of an erased record < loss of a held-out
record) + ties/2, with a bootstrap interval (``shards.membership``).

Versions. ``before``: the ensemble in service before the request's retraining
(the parent of the first version its retraining jobs published); its members
for the erased records' shards were trained on the old shard versions.
``after``: the ensemble in service now. The erased records' features are read
by record id from the old shard version files, so the probe runs before
``pipeline.erasure.purge_superseded_files`` deletes them (once they are gone, it
stores rows without an AUC, saying why); only ids, labels and feature vectors
are read, never the text.

What it measures, honestly: the strongest in-house signal of the loss attack
(the sub-model that held the record; the ensemble averages it with sub-models
that never saw it). An AUC near 0.5 after retraining says the retrained
sub-models treat the erased records like unseen records of other shards; the
erased records are one person's and need not look like a random sample, so the
AUC can sit away from 0.5 for reasons other than memorisation.

The result is two rows of ``membership_probes`` (details: counts, quantiles and
the method; no record ids, no text), an audit event, a PNG under
``$ERASURE_HOME/reports/<request id>/membership.png`` and a Prefect artifact.
Idempotent: with both rows stored it does nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.audit import MembershipProbe, append_event, canonical_json
from db.lineage import latest_shard_versions
from db.models import ShardVersion, utcnow
from db.session import unit_of_work
from db.settings import Settings
from db.training import EnsembleVersionRow
from pipeline.erasure import dataset_or_fail, request_jobs, request_matches
from pipeline.lifecycle import get_request
from pipeline.training import checkpoint_store, current_ensemble_row
from shards.ensemble import EnsembleVersion
from shards.files import write_atomically
from shards.membership import AucEstimate, ScorePanel, cross_entropy_losses, estimate_auc, render_membership_png, summarize
from shards.training import load_submodel

METRIC = "cross_entropy_loss"
ROLES = ("before", "after")
HELDOUT_PER_ERASED = 20
HELDOUT_PER_SHARD = (20, 1000)
ACTOR = "flow:membership-probe"
SCORER = "the sub-model of each erased record's own shard in this ensemble version"
HELDOUT = (f"records of the other shards (never seen by that sub-model) not matched by the request: a seeded "
           f"sample of {HELDOUT_PER_ERASED} per erased record, {HELDOUT_PER_SHARD[0]}-{HELDOUT_PER_SHARD[1]} "
           "per shard")
DIRECTION = "AUC = P(loss of an erased record < loss of a held-out record) + ties/2; 0.5 = no signal"


# ---------------------------------------------------------------- versions


def ensembles_around_request(session: Session, dataset_id: int, request_id: str
                             ) -> tuple[EnsembleVersionRow | None, EnsembleVersionRow | None]:
    """(before, after): the ensemble version in service before the request's retraining
    published its first version (that version's parent), and the one in service now.
    ``before`` is None when the request's retraining published nothing."""
    published = {j.ensemble_version_id for j in request_jobs(session, request_id) if j.ensemble_version_id}
    first = session.scalars(select(EnsembleVersionRow).where(
        EnsembleVersionRow.dataset_id == dataset_id, EnsembleVersionRow.version_id.in_(published))
        .order_by(EnsembleVersionRow.id)).first() if published else None
    before = None
    if first is not None:
        query = select(EnsembleVersionRow).where(EnsembleVersionRow.dataset_id == dataset_id)
        if first.parent_version_id:
            before = session.scalars(query.where(EnsembleVersionRow.version_id == first.parent_version_id)).first()
        if before is None:
            before = session.scalars(query.where(EnsembleVersionRow.id < first.id)
                                     .order_by(EnsembleVersionRow.id.desc())).first()
    return before, current_ensemble_row(session, dataset_id)


def holding_version(session: Session, dataset_id: int, shard: int, erased_in: int) -> ShardVersion | None:
    """The shard version just before ``erased_in``: the last one that held the records it removed."""
    return session.scalars(select(ShardVersion).where(
        ShardVersion.dataset_id == dataset_id, ShardVersion.shard == shard, ShardVersion.version < erased_in)
        .order_by(ShardVersion.version.desc())).first()


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ProbeInputs:
    """What the probe reads from the database (ids and paths only)."""

    dataset: str
    feature_dim: int
    erased: dict[int, dict[str, tuple[str, ...]]]  # shard -> holding file -> erased record ids
    matched: frozenset[str]
    latest_files: dict[int, str]
    versions: dict[str, tuple[str | None, EnsembleVersion | None]]  # role -> (version id, manifest)

    @property
    def erased_count(self) -> int:
        return sum(len(ids) for files in self.erased.values() for ids in files.values())


def _inputs(session: Session, request_id: str, dataset: str) -> ProbeInputs:
    ds = dataset_or_fail(session, dataset)
    matches = request_matches(session, request_id, ds.id)
    grouped: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for m in matches:
        if m.erased_in_shard_version is None:
            continue
        held = holding_version(session, ds.id, m.shard, m.erased_in_shard_version)
        if held is not None:
            grouped[m.shard][held.path].append(m.record_id)
    before, after = ensembles_around_request(session, ds.id, request_id)
    versions = {role: (row.version_id, EnsembleVersion.read(row.manifest_path)) if row is not None else (None, None)
                for role, row in (("before", before), ("after", after))}
    return ProbeInputs(
        dataset=ds.name,
        feature_dim=ds.feature_dim,
        erased={s: {path: tuple(sorted(ids)) for path, ids in files.items()} for s, files in sorted(grouped.items())},
        matched=frozenset(m.record_id for m in matches),
        latest_files={s: v.path for s, v in latest_shard_versions(session, ds.id).items()},
        versions=versions,
    )


@dataclass
class _Rows:
    """Labels and features of some records of one shard (no text)."""

    labels: np.ndarray
    features: np.ndarray
    unlabeled: int = 0
    not_found: int = 0


def _read_records(path: str, ids: tuple[str, ...] | list[str], dim: int) -> _Rows:
    if not Path(path).exists():  # purged (``purge_superseded_files``): nothing left to read
        return _Rows(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), 0, len(ids))
    table = pq.read_table(path, columns=["record_id", "label", "features"], filters=[("record_id", "in", list(ids))])
    not_found = len(set(ids) - set(table["record_id"].to_pylist()))
    labelled = table.filter(pc.is_valid(table["label"]))
    flat = labelled["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return _Rows(labelled["label"].to_numpy().astype(np.int64),
                 np.asarray(flat, dtype=np.float32).reshape(labelled.num_rows, dim),
                 table.num_rows - labelled.num_rows, not_found)


def _concat(parts: list[_Rows]) -> _Rows:
    return _Rows(np.concatenate([p.labels for p in parts]), np.concatenate([p.features for p in parts]),
                 sum(p.unlabeled for p in parts), sum(p.not_found for p in parts))


def _seed(request_id: str, *parts: object) -> int:
    digest = hashlib.sha256(":".join([request_id, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class _Sample:
    shard: int
    erased: _Rows
    heldout: _Rows


def _samples(inputs: ProbeInputs, request_id: str) -> list[_Sample]:
    """Per erased shard: the erased records (old version) and a seeded held-out sample of other shards."""
    candidates: dict[int, list[str]] = {}
    for shard, path in sorted(inputs.latest_files.items()):
        table = pq.read_table(path, columns=["record_id", "label"])
        ids = table.filter(pc.is_valid(table["label"]))["record_id"].to_pylist()
        candidates[shard] = sorted(rid for rid in ids if rid not in inputs.matched)
    samples = []
    for shard, files in inputs.erased.items():
        erased = _concat([_read_records(path, ids, inputs.feature_dim) for path, ids in sorted(files.items())])
        pool = [(other, rid) for other in sorted(candidates) if other != shard for rid in candidates[other]]
        want = HELDOUT_PER_ERASED * sum(len(ids) for ids in files.values())
        size = min(len(pool), max(HELDOUT_PER_SHARD[0], min(HELDOUT_PER_SHARD[1], want)))
        picked = np.random.default_rng(_seed(request_id, shard)).choice(len(pool), size=size, replace=False)
        by_shard: dict[int, list[str]] = defaultdict(list)
        for i in sorted(picked):
            by_shard[pool[i][0]].append(pool[i][1])
        parts = [_read_records(inputs.latest_files[o], ids, inputs.feature_dim) for o, ids in sorted(by_shard.items())]
        heldout = _concat(parts) if parts else _Rows(np.zeros(0, np.int64), np.zeros((0, inputs.feature_dim), np.float32))
        samples.append(_Sample(shard, erased, heldout))
    return samples


# ---------------------------------------------------------------- measuring


@dataclass
class RoleResult:
    role: str
    version_id: str | None
    estimate: AucEstimate
    erased_losses: np.ndarray
    heldout_losses: np.ndarray
    details: dict = field(default_factory=dict)


def _measure(settings: Settings, inputs: ProbeInputs, samples: list[_Sample], role: str, seed: int) -> RoleResult:
    version_id, version = inputs.versions[role]
    store = checkpoint_store(settings, inputs.dataset)
    members = {m.shard_id: m.checkpoint for m in version.members} if version is not None else {}
    erased_losses, heldout_losses, shards = [], [], []
    no_model = 0
    for sample in samples:
        ref = members.get(str(sample.shard))
        if ref is None or not store.exists(ref.key):  # no sub-model, or its checkpoint was purged
            no_model += len(sample.erased.labels)
            continue
        model, _ = load_submodel(store, ref)
        seen = set(store.load(ref)["seen_ids"])
        erased_ids = [rid for ids in inputs.erased[sample.shard].values() for rid in ids]
        erased_losses.append(cross_entropy_losses(model, sample.erased.features, sample.erased.labels))
        heldout_losses.append(cross_entropy_losses(model, sample.heldout.features, sample.heldout.labels))
        shards.append({"shard": sample.shard, "erased_scored": len(sample.erased.labels),
                       "heldout": len(sample.heldout.labels), "erased_seen_by_scorer": sum(r in seen for r in erased_ids)})
    erased = np.concatenate(erased_losses) if erased_losses else np.zeros(0)
    heldout = np.concatenate(heldout_losses) if heldout_losses else np.zeros(0)
    estimate = estimate_auc(erased, heldout, higher_is_member=False, seed=seed)
    if version is None:
        reason = ("no ensemble version before the request's retraining: the erased records' shards were never "
                  "trained" if role == "before" else "no ensemble version in service")
        estimate = AucEstimate(None, None, None, 0, 0, estimate.confidence, estimate.resamples, seed, reason=reason)
    elif not inputs.erased_count:
        estimate = AucEstimate(None, None, None, 0, len(heldout), estimate.confidence, estimate.resamples, seed,
                               reason="the request erased no records")
    elif estimate.auc is None and (no_model or any(s.erased.not_found for s in samples)):
        estimate = AucEstimate(None, None, None, len(erased), len(heldout), estimate.confidence, estimate.resamples,
                               seed, reason="the superseded shard versions or checkpoints that held the erased "
                                            "records are gone (purged?) or the shards have no sub-model: "
                                            "nothing left to score")
    details = {
        "metric": METRIC, "direction": DIRECTION, "scorer": SCORER, "heldout": HELDOUT,
        "estimate": estimate.to_dict(), "erased_loss": summarize(erased), "heldout_loss": summarize(heldout),
        "shards": shards,
        "erased_seen_by_scorer": sum(s["erased_seen_by_scorer"] for s in shards),
        "unscored": {"no_sub_model": no_model, "unlabeled": sum(s.erased.unlabeled for s in samples),
                     "not_found": sum(s.erased.not_found for s in samples)},
    }
    return RoleResult(role, version_id, estimate, erased, heldout, details)


def report_path(settings: Settings, request_id: str) -> Path:
    return settings.home / "reports" / str(request_id) / "membership.png"


def _png(results: list[RoleResult]) -> bytes:
    titles = {"before": "before erasure (model that held them)", "after": "after retraining"}
    panels = [ScorePanel(f"{titles[r.role]}: {(r.version_id or 'none')[:12]}", r.erased_losses, r.heldout_losses,
                         r.estimate) for r in results]
    return render_membership_png(panels, "cross-entropy loss of the record's shard sub-model")


# ---------------------------------------------------------------- the probe


def probe_rows(session: Session, request_id: str) -> list[MembershipProbe]:
    rows = session.scalars(select(MembershipProbe).where(MembershipProbe.request_id == str(request_id))).all()
    return sorted(rows, key=lambda r: ROLES.index(r.role) if r.role in ROLES else len(ROLES))


def probe_summary(row: MembershipProbe) -> dict:
    """A stored probe as ids, counts and numbers (what the certificate and flows report)."""
    details = json.loads(row.details)
    estimate = details.get("estimate", {})
    return {"role": row.role, "ensemble_version": row.ensemble_version_id, "metric": row.metric, "auc": row.auc,
            "ci_low": row.ci_low, "ci_high": row.ci_high, "confidence": estimate.get("confidence"),
            "ci_method": estimate.get("ci_method"), "erased_count": row.erased_count,
            "heldout_count": row.heldout_count, "erased_seen_by_scorer": details.get("erased_seen_by_scorer"),
            "reason": estimate.get("reason"), "note": estimate.get("note")}


def probe_membership(settings: Settings, engine: Engine, request_id: str, dataset: str) -> list[dict]:
    """Measure the request's ``before`` and ``after`` versions once; a rerun returns the stored rows.

    Reads in one short transaction, scores outside any, stores both rows (and
    the audit event) in one more; the PNG is written before the rows, so a crash
    in between only means the next run draws it again.
    """
    with unit_of_work(engine) as session:
        stored = probe_rows(session, request_id)
        if len(stored) == len(ROLES):
            return [probe_summary(r) for r in stored]
        inputs = _inputs(session, request_id, dataset)
    seed = _seed(request_id, "bootstrap")
    samples = _samples(inputs, request_id)
    results = [_measure(settings, inputs, samples, role, seed) for role in ROLES]
    png = _png(results)
    path = write_atomically(report_path(settings, request_id), png)
    with unit_of_work(engine) as session:
        get_request(session, request_id, for_update=True)  # serialises two probes of one request (PostgreSQL)
        present = {r.role for r in probe_rows(session, request_id)}
        for result in results:
            if result.role in present:
                continue
            est = result.estimate
            session.add(MembershipProbe(
                request_id=str(request_id), role=result.role, ensemble_version_id=result.version_id, metric=METRIC,
                auc=est.auc, ci_low=est.ci_low, ci_high=est.ci_high, erased_count=len(result.erased_losses),
                heldout_count=len(result.heldout_losses),
                details=canonical_json({**result.details, "report": str(path.relative_to(settings.home))}),
                created_at=utcnow()))
        if len(present) < len(ROLES):
            session.flush()
            append_event(session, "membership.probed", {
                "metric": METRIC, "roles": {r.role: {"ensemble_version": r.version_id, "auc": r.estimate.auc,
                                                     "ci_low": r.estimate.ci_low, "ci_high": r.estimate.ci_high,
                                                     "erased": len(r.erased_losses), "heldout": len(r.heldout_losses)}
                                             for r in results}}, actor=ACTOR, request_id=str(request_id))
        summaries = [probe_summary(r) for r in probe_rows(session, request_id)]
    return summaries


def probe_markdown(request_id: str, summaries: list[dict], png: bytes) -> str:
    """The probe as markdown (the flow's artifact): the AUCs and the plot as a data: URI."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"# Membership probe of erasure request {request_id}", "",
             f"Metric: {METRIC}; {DIRECTION}.", "",
             "| version | ensemble | AUC | interval | erased | held out | note |", "|---|---|---:|---|---:|---:|---|"]
    lines += [f"| {s['role']} | {(s['ensemble_version'] or '')[:12]} | {number(s['auc'])} | "
              f"[{number(s['ci_low'])}, {number(s['ci_high'])}] | {s['erased_count']} | {s['heldout_count']} | "
              f"{s['reason'] or s['note'] or ''} |" for s in summaries]
    lines += ["", f"![loss distributions](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"]
    return "\n".join(lines)

