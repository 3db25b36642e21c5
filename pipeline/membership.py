"""The membership-inference probe of an erasure request: does the model still
treat the erased records as training data, and could the test have noticed?

A raw loss says how *typical* a text is as much as whether a model trained on
it: one person's posts can be easy, and then they have low losses under every
model. So the probe is reference-calibrated (offline LiRA / RMIA style). Under
SISA a record of shard s was seen by sub-model s only; every other sub-model
is a reference that never saw it. A record's score under the sub-model probing
it is its logit-scaled confidence there minus its mean under the reference
sub-models whose training sets (``seen_ids``) do not contain it
(``shards.membership.calibrated_scores``): how much more the probed model
trusts the record than models that never saw it. Each sub-model's confidences
are first centred per label on its median over the sampled records of other
people it never saw (``centre_per_label``), so one sub-model's bias toward a
label cannot pass for membership (a control record, whose own shard's
sub-model saw it, has one reference fewer than an erased record).

Who is compared with whom, per version (``before``: the ensemble in service
before the request's retraining; ``after``: the one in service now):

* erased: each erased record, scored by the sub-model of the shard it was
  erased from (features read by id from the old shard version file, so the
  probe runs before ``pipeline.erasure.purge_superseded_files``);
* control: other people's records with the same label in the other shards'
  current versions, scored by the *same* sub-model (which never saw them), a
  seeded sample of up to ``PER_STRATUM`` per (sub-model, label). Left out: every
  record the request matched (the subject's other records, copies kept on
  review) and every record that shares a near-duplicate group with an erased
  record or with a record of another shard (its membership is ambiguous);
* members: records still in the probed sub-model's training set (same shard,
  same label, not matched), sampled the same way.

Pairs are compared only within a stratum (the probing sub-model and the label),
never across pooled losses. ``auc``: erased vs control. ``power``: members vs
control, the same statistic on records whose membership is known; a probe
whose power is near 0.5 cannot tell members from non-members at all, and the
stored sentence says so instead of reading a reassuring AUC. After an exact
retraining the erased records are non-members of every sub-model, so the
question is whether they still look like members: AUC near 0.5 says they look
like records the models never saw.

Groups. Sixteen copies of three texts are three observations. Records are
grouped by near-duplicate text (MinHash estimate of word-shingle Jaccard at or
above ``GROUP_JACCARD``, computed in memory and never stored) and, for the
erased records, by the locate's own links (a copy and the record whose text
found it); the interval is a cluster bootstrap over these groups and the
number of distinct erased texts is reported.

The probe runs per dataset the request erased from (each has its own shards,
sub-models and ensemble versions). The result, per dataset, is two rows of
``membership_probes`` (details: counts, quantiles, the method and one plain
sentence built from the numbers; no record ids, no text), an audit event
(numbers and the dataset name only), a PNG under
``$ERASURE_HOME/reports/<request id>/membership-<dataset>.png`` and a Prefect
artifact. Idempotent: with both rows of a dataset stored it does nothing.
Rows from before migration 0012 may have no dataset (their request matched in
several datasets): they measured the request's first dataset by name among
those it erased from (the one the earlier code probed), and are read as such.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from db.audit import MembershipProbe, append_event, canonical_json
from db.lineage import latest_shard_versions
from db.models import Dataset, ShardVersion, utcnow
from db.session import unit_of_work
from db.settings import Settings
from db.training import EnsembleVersionRow, RequestMatch
from dedup.lsh import BandIndex, choose_params
from dedup.minhash import MinHashParams, minhash_signatures
from pipeline.erasure import dataset_or_fail, request_jobs, request_matches
from pipeline.lifecycle import get_request
from pipeline.object_store import is_object_url, local_copy, object_store, publish_file, shard_file
from pipeline.training import checkpoint_store, current_ensemble_row, read_manifest
from shards.ensemble import EnsembleVersion
from shards.files import write_atomically
from shards.membership import (
    AucEstimate,
    ScorePanel,
    calibrated_scores,
    centre_per_label,
    estimate_auc,
    group_labels,
    logit_confidences,
    render_membership_png,
    summarize,
)
from shards.training import load_submodel

METRIC = "reference_calibrated_logit"
ROLES = ("before", "after")
PER_STRATUM = 500
GROUP_JACCARD = 0.35
ACTOR = "flow:membership-probe"
SCORE = ("phi = log(p / (1 - p)) of the record's true label under the probing sub-model, minus its mean phi under "
         "the reference sub-models (the other shards' sub-models whose training set did not contain the record); "
         "each sub-model's phi centred per label on its median over the other people's records it never saw")
SCORER = "the sub-model of each erased record's own shard in this ensemble version"
CONTROL = (f"other people's records with the same label in the other shards, never seen by the probing sub-model, "
           f"scored by that sub-model: a seeded sample of up to {PER_STRATUM} per (sub-model, label); the request's "
           "matches, and records sharing a near-duplicate group with an erased record or with a record of another "
           "shard, left out")
POWER = ("records still in the probing sub-model's training set (same shard and label, not matched, sampled the same "
         "way) against the same control: whether the test can tell members from non-members at all")
DIRECTION = ("AUC = P(score of an erased record > score of a control record), pairs within the same sub-model and "
             "label only, ties counted half; 0.5 = no signal")
GROUPING = (f"near-duplicate texts (MinHash-estimated word-shingle Jaccard >= {GROUP_JACCARD}, in memory) and the "
            "locate's copy links; the interval resamples these groups")
WIDE_INTERVAL = 0.3  # an interval wider than this is called wide in the sentence


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
    links: tuple[tuple[str, str], ...] = ()  # (erased record id, the locate query that found it as a copy)

    @property
    def erased_count(self) -> int:
        return sum(len(ids) for files in self.erased.values() for ids in files.values())


def _inputs(session: Session, request_id: str, dataset: str, settings: Settings) -> ProbeInputs:
    ds = dataset_or_fail(session, dataset)
    matches = request_matches(session, request_id, ds.id)
    grouped: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for m in matches:
        if m.erased_in_shard_version is None:
            continue
        held = holding_version(session, ds.id, m.shard, m.erased_in_shard_version)
        if held is not None:  # a purged version keeps its recorded path: nothing is read from it
            path = held.path if held.files_purged_at is not None else str(shard_file(settings, held, ds.name))
            grouped[m.shard][path].append(m.record_id)
    before, after = ensembles_around_request(session, ds.id, request_id)
    versions = {role: (row.version_id, read_manifest(settings, row, ds.name)) if row is not None else (None, None)
                for role, row in (("before", before), ("after", after))}
    return ProbeInputs(
        dataset=ds.name,
        feature_dim=ds.feature_dim,
        erased={s: {path: tuple(sorted(ids)) for path, ids in files.items()} for s, files in sorted(grouped.items())},
        matched=frozenset(m.record_id for m in matches),
        latest_files={s: str(shard_file(settings, v, ds.name))
                      for s, v in latest_shard_versions(session, ds.id).items()},
        versions=versions,
        links=tuple(sorted((m.record_id, m.query) for m in matches
                           if m.erased_in_shard_version is not None and m.method != "identifier")),
    )


probe_inputs = _inputs  # the extraction probe (pipeline/extraction.py) reads the same erased records and versions


@dataclass
class _Rows:
    """Ids, labels, features and texts of some labelled records of one shard file."""

    ids: list[str]
    labels: np.ndarray
    features: np.ndarray
    texts: list[str]
    unlabeled: int = 0
    not_found: int = 0


def _read_records(path: str, ids: Sequence[str], dim: int) -> _Rows:
    if not Path(path).exists():  # purged (``purge_superseded_files``): nothing left to read
        return _Rows([], np.zeros(0, np.int64), np.zeros((0, dim), np.float32), [], 0, len(ids))
    table = pq.read_table(path, columns=["record_id", "label", "features", "text"],
                          filters=[("record_id", "in", list(ids))])
    not_found = len(set(ids) - set(table["record_id"].to_pylist()))
    labelled = table.filter(pc.is_valid(table["label"]))
    flat = labelled["features"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return _Rows(labelled["record_id"].to_pylist(), labelled["label"].to_numpy().astype(np.int64),
                 np.asarray(flat, dtype=np.float32).reshape(labelled.num_rows, dim), labelled["text"].to_pylist(),
                 table.num_rows - labelled.num_rows, not_found)


def _seed(request_id: str, *parts: object) -> int:
    digest = hashlib.sha256(":".join([request_id, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _pick(items: list, size: int, seed: int) -> list:
    if len(items) <= size:
        return list(items)
    chosen = np.random.default_rng(seed).choice(len(items), size=size, replace=False)
    return [items[i] for i in sorted(chosen)]


def near_duplicate_pairs(texts: Sequence[str], threshold: float = GROUP_JACCARD) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose word-shingle Jaccard similarity, estimated from
    MinHash signatures (LSH candidates), is at least ``threshold``."""
    if len(texts) < 2:
        return []
    params = MinHashParams()
    signatures = minhash_signatures(list(texts), params)
    index = BandIndex.build(signatures, choose_params(threshold, params.num_perm, max_miss=1e-3))
    pairs = []
    for i, candidates in enumerate(index.candidates(signatures)):
        later = candidates[candidates > i]
        if len(later):
            agree = (signatures[later] == signatures[i]).mean(axis=1)
            pairs += [(i, int(j)) for j in later[agree >= threshold]]
    return pairs


Stratum = tuple[int, int]  # (shard of the probing sub-model, label)


@dataclass
class _Sample:
    """The records the probe scores (no text kept) and who is compared with whom."""

    ids: list[str]
    shard: np.ndarray  # the shard each record is (erased: was) in
    labels: np.ndarray
    features: np.ndarray
    erased: np.ndarray  # bool
    group: np.ndarray  # near-duplicate group of each record
    controls: dict[Stratum, list[int]]
    members: dict[Stratum, list[int]]
    excluded: dict[str, int]
    unlabeled: int
    not_found: int

    def erased_in(self, stratum: Stratum) -> list[int]:
        return [i for i in np.flatnonzero(self.erased).tolist()
                if (int(self.shard[i]), int(self.labels[i])) == stratum]

    @property
    def strata(self) -> list[Stratum]:
        return sorted({(int(self.shard[i]), int(self.labels[i])) for i in np.flatnonzero(self.erased)})


def _sample(inputs: ProbeInputs, request_id: str) -> _Sample:
    """The erased records (old versions), and per (shard, label) of theirs a seeded
    control sample of the other shards and a member sample of the same shard."""
    dim = inputs.feature_dim
    parts: list[tuple[int, _Rows]] = [(shard, _read_records(path, ids, dim))
                                      for shard, files in inputs.erased.items() for path, ids in sorted(files.items())]
    strata = sorted({(shard, int(label)) for shard, rows in parts for label in rows.labels})
    pool: dict[Stratum, list[str]] = defaultdict(list)  # (shard, label) -> unmatched labelled record ids
    for shard, path in sorted(inputs.latest_files.items()):
        table = pq.read_table(path, columns=["record_id", "label"])
        table = table.filter(pc.is_valid(table["label"]))
        for rid, label in zip(table["record_id"].to_pylist(), table["label"].to_pylist()):
            if rid not in inputs.matched:
                pool[(shard, int(label))].append(rid)
    picked_controls, picked_members = {}, {}
    for s, label in strata:
        others = [(t, rid) for t in sorted(inputs.latest_files) if t != s for rid in sorted(pool.get((t, label), ()))]
        picked_controls[(s, label)] = _pick(others, PER_STRATUM, _seed(request_id, "control", s, label))
        own = [(s, rid) for rid in sorted(pool.get((s, label), ()))]
        picked_members[(s, label)] = _pick(own, PER_STRATUM, _seed(request_id, "member", s, label))
    wanted: dict[int, set[str]] = defaultdict(set)
    for picked in (picked_controls, picked_members):
        for chosen in picked.values():
            for t, rid in chosen:
                wanted[t].add(rid)
    parts_erased = len(parts)
    parts += [(t, _read_records(inputs.latest_files[t], sorted(ids), dim)) for t, ids in sorted(wanted.items())]

    ids = [rid for _, rows in parts for rid in rows.ids]
    shard = (np.concatenate([np.full(len(rows.ids), s, np.int64) for s, rows in parts]) if parts
             else np.zeros(0, np.int64))
    erased = np.concatenate([np.full(len(rows.ids), k < parts_erased) for k, (_, rows) in enumerate(parts)]) \
        if parts else np.zeros(0, bool)
    texts = [text for _, rows in parts for text in rows.texts]
    position = {(int(shard[i]), rid): i for i, rid in enumerate(ids)}

    pairs = near_duplicate_pairs(texts)
    erased_at = {ids[i]: i for i in np.flatnonzero(erased).tolist()}
    anchors: dict[str, int] = {}
    for rid, query in inputs.links:  # a copy and the erased record (or the sample) whose text found it
        i = erased_at.get(rid)
        if i is None:
            continue
        if query.startswith("record:") and "/" in query:
            j = erased_at.get(query.split("/", 1)[1])
            if j is not None:
                pairs.append((i, j))
        elif query.startswith("sample:"):
            pairs.append((anchors.setdefault(query, i), i))
    group = group_labels(len(ids), pairs)
    del texts  # grouping is all the text was read for

    subject_groups = set(group[erased].tolist())
    shards_of_group: dict[int, set[int]] = defaultdict(set)
    for i in np.flatnonzero(~erased).tolist():
        shards_of_group[int(group[i])].add(int(shard[i]))
    excluded = {"copies_of_erased": 0, "near_copies_across_shards": 0}
    reasons: dict[int, str] = {}
    for i in np.flatnonzero(~erased).tolist():
        if int(group[i]) in subject_groups:
            reasons[i] = "copies_of_erased"
        elif len(shards_of_group[int(group[i])]) > 1:
            reasons[i] = "near_copies_across_shards"
    for reason in reasons.values():
        excluded[reason] += 1

    def keep(picked: dict[Stratum, list[tuple[int, str]]]) -> dict[Stratum, list[int]]:
        out = {}
        for stratum, chosen in picked.items():
            out[stratum] = [i for i in (position.get(key) for key in chosen) if i is not None and i not in reasons]
        return out

    return _Sample(
        ids=ids, shard=shard,
        labels=np.concatenate([rows.labels for _, rows in parts]) if parts else np.zeros(0, np.int64),
        features=np.concatenate([rows.features for _, rows in parts]) if parts else np.zeros((0, dim), np.float32),
        erased=erased, group=group, controls=keep(picked_controls), members=keep(picked_members), excluded=excluded,
        unlabeled=sum(rows.unlabeled for _, rows in parts[:parts_erased]),
        not_found=sum(rows.not_found for _, rows in parts[:parts_erased]),
    )


# ---------------------------------------------------------------- measuring


@dataclass
class RoleResult:
    role: str
    version_id: str | None
    estimate: AucEstimate
    power: AucEstimate
    erased_scores: np.ndarray
    control_scores: np.ndarray
    member_scores: np.ndarray
    details: dict = field(default_factory=dict)


def _no_auc(estimate: AucEstimate, reason: str) -> AucEstimate:
    return AucEstimate(None, None, None, estimate.members, estimate.nonmembers, estimate.confidence,
                       estimate.resamples, estimate.seed, reason=reason, member_groups=estimate.member_groups,
                       nonmember_groups=estimate.nonmember_groups, strata=estimate.strata)


def _measure(settings: Settings, inputs: ProbeInputs, sample: _Sample, role: str, seed: int) -> RoleResult:
    version_id, version = inputs.versions[role]
    store = checkpoint_store(settings, inputs.dataset)
    refs = {m.shard_id: m.checkpoint for m in version.members} if version is not None else {}
    phi: dict[int, np.ndarray] = {}
    seen: dict[int, frozenset[str]] = {}
    for shard_id, ref in sorted(refs.items()):
        if ref is None or not store.exists(ref.key):  # no sub-model, or its checkpoint was purged
            continue
        model, _ = load_submodel(store, ref)
        seen[int(shard_id)] = frozenset(store.load(ref)["seen_ids"])
        phi[int(shard_id)] = logit_confidences(model, sample.features, sample.labels)
    models = sorted(phi)
    unseen = np.stack([np.fromiter((rid not in seen[t] for rid in sample.ids), dtype=bool, count=len(sample.ids))
                       for t in models], axis=1) if models else np.zeros((len(sample.ids), 0), bool)
    # each model's phi centred per label on the other people's records it never saw (its "population")
    centred = centre_per_label(np.stack([phi[t] for t in models], axis=1) if models
                               else np.zeros((len(sample.ids), 0)), sample.labels, unseen & ~sample.erased[:, None])
    # reference[i, k]: record i's centred phi under model k, NaN where model k saw record i
    reference = np.where(unseen, centred, np.nan)

    scores: dict[str, list[float]] = {"erased": [], "control": [], "member": []}
    groups: dict[str, list[int]] = {"erased": [], "control": [], "member": []}
    strata: dict[str, list[str]] = {"erased": [], "control": [], "member": []}
    counts = {"no_sub_model": 0, "no_reference": 0, "control_seen_by_scorer": 0, "member_not_seen_by_scorer": 0}
    per_shard: dict[int, dict[str, int]] = defaultdict(lambda: {"erased_scored": 0, "control": 0, "members": 0,
                                                                 "erased_seen_by_scorer": 0})
    for stratum in sample.strata:
        s = stratum[0]
        kinds = {"erased": sample.erased_in(stratum), "control": sample.controls.get(stratum, []),
                 "member": sample.members.get(stratum, [])}
        if s not in phi:
            counts["no_sub_model"] += len(kinds["erased"])
            continue
        column = models.index(s)
        for kind, rows in kinds.items():
            rows = np.asarray(rows, dtype=np.int64)
            in_scorer = np.fromiter((sample.ids[i] in seen[s] for i in rows), dtype=bool, count=len(rows))
            if kind == "erased":
                per_shard[s]["erased_seen_by_scorer"] += int(in_scorer.sum())
            elif kind == "control":
                counts["control_seen_by_scorer"] += int(in_scorer.sum())
                rows = rows[~in_scorer]
            else:
                counts["member_not_seen_by_scorer"] += int((~in_scorer).sum())
                rows = rows[in_scorer]
            others = reference[rows].copy()
            others[:, column] = np.nan  # the probing model is never its own reference
            calibrated = calibrated_scores(centred[rows, column], others)
            ok = np.isfinite(calibrated)
            if kind == "erased":
                counts["no_reference"] += int((~ok).sum())
            scores[kind] += calibrated[ok].tolist()
            groups[kind] += sample.group[rows[ok]].tolist()
            strata[kind] += [f"{s}:{stratum[1]}"] * int(ok.sum())
            per_shard[s][{"erased": "erased_scored", "control": "control", "member": "members"}[kind]] += int(ok.sum())

    def estimate(kind: str) -> AucEstimate:
        return estimate_auc(scores[kind], scores["control"], seed=seed, member_groups=groups[kind],
                            nonmember_groups=groups["control"], member_strata=strata[kind],
                            nonmember_strata=strata["control"])

    est, power = estimate("erased"), estimate("member")
    if version is None:
        reason = ("no ensemble version before the request's retraining: the erased records' shards were never "
                  "trained" if role == "before" else "no ensemble version in service")
        est, power = _no_auc(est, reason), _no_auc(power, reason)
    elif not inputs.erased_count:
        est = _no_auc(est, "the request erased no records")
    elif est.auc is None and (counts["no_sub_model"] or sample.not_found):
        est = _no_auc(est, "the superseded shard versions or checkpoints that held the erased records are gone "
                           "(purged?) or the shards have no sub-model: nothing left to score")
    elif est.auc is None and len(models) < 3:
        est = _no_auc(est, f"{len(models)} sub-model(s): a reference-calibrated probe needs at least 3 (the probing "
                           "one, and for a control record of another shard one more that saw neither)")
    arrays = {kind: np.asarray(values) for kind, values in scores.items()}
    details = {
        "metric": METRIC, "score": SCORE, "direction": DIRECTION, "scorer": SCORER, "heldout": CONTROL,
        "power_method": POWER, "grouping": GROUPING,
        "estimate": est.to_dict(), "power": power.to_dict(),
        "groups": {"erased": len(set(groups["erased"])), "control": len(set(groups["control"])),
                   "members": len(set(groups["member"]))},
        "erased_score": summarize(arrays["erased"]), "heldout_score": summarize(arrays["control"]),
        "member_score": summarize(arrays["member"]),
        "sub_models": len(models), "strata": len(sample.strata),
        "shards": [{"shard": s, **row} for s, row in sorted(per_shard.items())],
        "erased_seen_by_scorer": sum(row["erased_seen_by_scorer"] for row in per_shard.values()),
        "excluded_from_control_and_members": dict(sample.excluded),
        "dropped": {k: v for k, v in counts.items() if k not in ("no_sub_model",)},
        "unscored": {"no_sub_model": counts["no_sub_model"], "no_reference": counts["no_reference"],
                     "unlabeled": sample.unlabeled, "not_found": sample.not_found},
    }
    details["sentence"] = probe_sentence(role, details["estimate"], details["power"], details["groups"]["erased"])
    return RoleResult(role, version_id, est, power, arrays["erased"], arrays["control"], arrays["member"], details)


# ---------------------------------------------------------------- the sentence


def _figure(estimate: dict, inline: bool = False) -> str:
    """``AUC 0.47, 95 % CI 0.30–0.64`` (inside parentheses) or ``AUC 0.47 (95 % CI 0.30–0.64)`` (inline)."""
    text = f"AUC {estimate['auc']:.2f}"
    if estimate.get("ci_low") is not None and estimate.get("ci_high") is not None:
        confidence = estimate.get("confidence") or 0.95
        interval = f"{confidence * 100:.0f} % CI {estimate['ci_low']:.2f}–{estimate['ci_high']:.2f}"
        text += f" ({interval})" if inline else f", {interval}"
    return text


def _texts(groups: int | None, estimate: dict) -> str:
    if groups is None:
        return _figure(estimate)
    wide = (estimate.get("ci_low") is not None and estimate.get("ci_high") is not None
            and estimate["ci_high"] - estimate["ci_low"] > WIDE_INTERVAL)
    return (f"{_figure(estimate)}; {groups} distinct text{'' if groups == 1 else 's'}"
            + (", so the interval is wide" if wide else ""))


def _shown(value: float | None) -> float | None:
    """A figure as the sentence prints it: the verdicts compare what the reader sees."""
    return None if value is None else round(value, 2)


def _power_is_useless(power: dict | None) -> bool:
    return (power is None or power.get("auc") is None or power.get("ci_low") is None
            or _shown(power["ci_low"]) <= 0.5)


def probe_sentence(role: str, estimate: dict, power: dict | None, groups: int | None) -> str:
    """One plain sentence from a probe's numbers: what the test shows, and whether
    it could have shown anything. The power (members vs non-members on records
    still in training) is what an erased record would score if it were still
    remembered like training data; only an interval that excludes it rules that out."""
    if role == "before":
        if estimate.get("auc") is None:
            return f"Before erasure, the membership test could not be run: {estimate.get('reason')}."
        if estimate.get("ci_low") is not None and _shown(estimate["ci_low"]) > 0.5:
            sentence = (f"Before erasure, a reference-calibrated membership test told this person's records from "
                        f"records the models never saw ({_texts(groups, estimate)})")
        else:
            sentence = (f"Before erasure, while the models still trained on them, a reference-calibrated membership "
                        f"test could not tell this person's records from records the models never saw "
                        f"({_texts(groups, estimate)})")
        if power is None or power.get("auc") is None:
            return sentence + "."
        return sentence + f"; on other records still in training it reached {_figure(power, inline=True)}."
    if estimate.get("auc") is None:
        return f"After retraining, the membership test could not be run: {estimate.get('reason')}."
    if _power_is_useless(power):
        unmeasured = (power or {}).get("reason") or "no records to measure it on"
        why = (f"({_figure(power)})" if power is not None and power.get("auc") is not None
               else f"(its power could not be measured: {unmeasured})")
        return (f"A reference-calibrated membership test cannot tell records the models still train on from records "
                f"they never saw {why}, so its reading for this person's erased records after retraining "
                f"({_texts(groups, estimate)}) says nothing about whether they were forgotten.")
    low, high = _shown(estimate.get("ci_low")), _shown(estimate.get("ci_high"))
    if low is not None and low > 0.5:
        return (f"After retraining, a reference-calibrated membership test still tells this person's erased records "
                f"from records the models never saw ({_texts(groups, estimate)}), although no sub-model in service "
                f"trained on them (members vs non-members: {_figure(power)}): look for copies of their texts still "
                "in training.")
    if high is not None and high < 0.5:
        verdict = (f"After retraining, this person's erased records look less like training data than records the "
                   f"models never saw ({_texts(groups, estimate)})")
    else:
        verdict = (f"After retraining, a reference-calibrated membership test tells this person's erased records "
                   f"from records the models never saw no better than chance ({_texts(groups, estimate)})")
    if high is not None and high < _shown(power["ci_low"]):
        return verdict + (f"; the same test tells members from non-members with {_figure(power, inline=True)}, "
                          "above that interval, so it could have noticed if they were still remembered like "
                          "training data.")
    return verdict + (f"; but on records still in training the same test reaches only {_figure(power, inline=True)}, "
                      "a value that interval does not rule out, so it cannot show whether they are still remembered.")


def report_path(settings: Settings, request_id: str, dataset: str) -> Path:
    """The probe's plot for one dataset of a request (a dataset name is a safe file name:
    ``[A-Za-z0-9][A-Za-z0-9_.-]*``)."""
    return request_reports_folder(settings, request_id) / f"membership-{dataset}.png"


def report_file(settings: Settings, session: Session, request_id: str, dataset: str) -> Path | None:
    """The probe's plot on this host, or None: the file in the home; with a storage URL, the object
    its probe row names, fetched (verified) into this host's home."""
    path = report_path(settings, request_id, dataset)
    if object_store(settings) is None:
        return path if path.is_file() else None
    ds = session.scalar(select(Dataset).where(Dataset.name == dataset))
    urls = [] if ds is None else [json.loads(r.details).get("report") for r in probe_rows(session, request_id, ds.id)]
    url = next((u for u in urls if isinstance(u, str) and is_object_url(u)), None)
    return None if url is None else local_copy(settings, url, None, path)


def request_reports_folder(settings: Settings, request_id: str) -> Path:
    """``$ERASURE_HOME/reports/<request id>``: a request's reports (plots, the exported certificate)."""
    return settings.home / "reports" / str(request_id)


def _png(results: list[RoleResult]) -> bytes:
    titles = {"before": "before erasure (model that held them)", "after": "after retraining"}
    panels = [ScorePanel(f"{titles[r.role]}: {(r.version_id or 'none')[:12]}", r.erased_scores, r.control_scores,
                         r.estimate, known_members=r.member_scores, power=r.power) for r in results]
    return render_membership_png(panels, "calibrated confidence: own sub-model minus references (logit)",
                                 member_label="this person's erased records", nonmember_label="control (never seen)")


# ---------------------------------------------------------------- the probe


def first_probed_dataset_id(session: Session, request_id: str) -> int | None:
    """The dataset a stored probe without ``dataset_id`` measured: the request's first
    dataset by name among those it erased from (before migration 0012 only that one was
    probed), or among those it matched in when it erased nothing."""
    query = (select(Dataset.id).join(RequestMatch, RequestMatch.dataset_id == Dataset.id)
             .where(RequestMatch.request_id == str(request_id)).order_by(Dataset.name).limit(1))
    erased = session.scalars(query.where(RequestMatch.erased_in_shard_version.is_not(None))).first()
    return erased if erased is not None else session.scalars(query).first()


def probe_rows(session: Session, request_id: str, dataset_id: int | None = None) -> list[MembershipProbe]:
    """The stored probes of a request: of one dataset when ``dataset_id`` is given (a row
    without a dataset counts as the first one's), else of every dataset; ordered by
    dataset, then role (``before``, ``after``)."""
    query = select(MembershipProbe).where(MembershipProbe.request_id == str(request_id))
    if dataset_id is not None:
        own = MembershipProbe.dataset_id == dataset_id
        if first_probed_dataset_id(session, request_id) == dataset_id:
            own = or_(own, MembershipProbe.dataset_id.is_(None))
        query = query.where(own)
    rows = session.scalars(query).all()
    return sorted(rows, key=lambda r: (r.dataset_id is not None, r.dataset_id or 0,
                                       ROLES.index(r.role) if r.role in ROLES else len(ROLES), r.id))


def probe_summary(row: MembershipProbe) -> dict:
    """A stored probe as ids, counts, numbers and its sentence (what the certificate and flows report)."""
    details = json.loads(row.details)
    estimate = details.get("estimate", {})
    power = details.get("power")
    groups = details.get("groups", {})
    return {"role": row.role, "ensemble_version": row.ensemble_version_id, "metric": row.metric, "auc": row.auc,
            "ci_low": row.ci_low, "ci_high": row.ci_high, "confidence": estimate.get("confidence"),
            "ci_method": estimate.get("ci_method"), "erased_count": row.erased_count,
            "heldout_count": row.heldout_count, "erased_seen_by_scorer": details.get("erased_seen_by_scorer"),
            "groups": groups.get("erased"), "heldout_groups": groups.get("control"),
            "power": None if power is None else {"auc": power.get("auc"), "ci_low": power.get("ci_low"),
                                                 "ci_high": power.get("ci_high"), "members": power.get("members"),
                                                 "reason": power.get("reason")},
            "sentence": details.get("sentence"),
            "reason": estimate.get("reason"), "note": estimate.get("note")}


def forgetting_sentence(summaries: list[dict] | dict | None) -> str | None:
    """The sentence of the ``after`` probe among stored summaries (None when none is
    stored: also for the certificate's ``{"status": "not run"}`` placeholder)."""
    if not isinstance(summaries, list):
        return None
    return next((s["sentence"] for s in summaries if s.get("role") == "after" and s.get("sentence")), None)


def _event_numbers(result: RoleResult) -> dict:
    est, power = result.estimate, result.power
    return {"ensemble_version": result.version_id, "auc": est.auc, "ci_low": est.ci_low, "ci_high": est.ci_high,
            "erased": len(result.erased_scores), "heldout": len(result.control_scores),
            "groups": result.details["groups"]["erased"], "heldout_groups": result.details["groups"]["control"],
            "members": len(result.member_scores), "power_auc": power.auc, "power_ci_low": power.ci_low,
            "power_ci_high": power.ci_high}


def probe_membership(settings: Settings, engine: Engine, request_id: str, dataset: str) -> list[dict]:
    """Measure the request's ``before`` and ``after`` versions of ``dataset`` once; a rerun
    returns that dataset's stored rows (another dataset's rows do not count).

    Reads in one short transaction, scores outside any, stores both rows (and
    the audit event) in one more; the PNG is written before the rows, so a crash
    in between only means the next run draws it again.
    """
    with unit_of_work(engine) as session:
        dataset_id = dataset_or_fail(session, dataset).id
        stored = probe_rows(session, request_id, dataset_id)
        if {r.role for r in stored} >= set(ROLES):
            return [probe_summary(r) for r in stored]
        inputs = _inputs(session, request_id, dataset, settings)
    seed = _seed(request_id, "bootstrap")
    sample = _sample(inputs, request_id)
    results = [_measure(settings, inputs, sample, role, seed) for role in ROLES]
    png = _png(results)
    path = write_atomically(report_path(settings, request_id, inputs.dataset), png)
    # a storage URL: the plot is an object the probe rows name (any host's console shows it)
    published = publish_file(settings, path)
    report = published if is_object_url(published) else str(path.relative_to(settings.home))
    with unit_of_work(engine) as session:
        get_request(session, request_id, for_update=True)  # serialises two probes of one request (PostgreSQL)
        present = {r.role for r in probe_rows(session, request_id, dataset_id)}
        for result in results:
            if result.role in present:
                continue
            est = result.estimate
            session.add(MembershipProbe(
                request_id=str(request_id), dataset_id=dataset_id, role=result.role,
                ensemble_version_id=result.version_id, metric=METRIC,
                auc=est.auc, ci_low=est.ci_low, ci_high=est.ci_high, erased_count=len(result.erased_scores),
                heldout_count=len(result.control_scores),
                details=canonical_json({**result.details, "report": report}),
                created_at=utcnow()))
        if len(present) < len(ROLES):
            session.flush()
            append_event(session, "membership.probed", {
                "metric": METRIC, "dataset": inputs.dataset, "roles": {r.role: _event_numbers(r) for r in results}},
                actor=ACTOR, request_id=str(request_id))
        summaries = [probe_summary(r) for r in probe_rows(session, request_id, dataset_id)]
    return summaries


def probe_markdown(request_id: str, summaries: list[dict], png: bytes, dataset: str | None = None) -> str:
    """The probe of one dataset as markdown (the flow's artifact): the AUCs, the power, the sentence and the plot."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"# Membership probe of erasure request {request_id}" + (f", dataset {dataset}" if dataset else ""), "",
             f"Metric: {METRIC} ({SCORE}); {DIRECTION}.", "",
             "| version | ensemble | AUC | interval | erased | texts | control | power AUC | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for s in summaries:
        power = s.get("power") or {}
        lines.append(f"| {s['role']} | {(s['ensemble_version'] or '')[:12]} | {number(s['auc'])} | "
                     f"[{number(s['ci_low'])}, {number(s['ci_high'])}] | {s['erased_count']} | "
                     f"{s.get('groups') if s.get('groups') is not None else 'n/a'} | {s['heldout_count']} | "
                     f"{number(power.get('auc'))} | {s['reason'] or s['note'] or ''} |")
    lines += [""] + [f"*{s['role']}*: {s['sentence']}" for s in summaries if s.get("sentence")]
    lines += ["", f"![calibrated score distributions](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"]
    return "\n".join(lines)
