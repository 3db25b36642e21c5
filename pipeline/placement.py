"""Placement at ingest (``shards.placement``) with what the dataset already holds, and cost estimates.

Subject placement needs, besides the batch: where the dataset's live records with
the batch's identifier values are, how full each (shard, slice) is, and the
verified near-copies of the batch's identifier-less records (in the batch and in
the current shard versions, found by ``dedup.near_copies``). ``retrain_estimate_for``
prices the removal of given records with the planner's sums (``shards.retrain``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.lineage import get_dataset
from db.models import Dataset, Record, RecordIdentifier
from db.settings import Settings
from dedup.near_copies import near_copies_in_index, near_copies_within
from dedup.minhash import minhash_signatures
from dedup.policy import Thresholds
from dedup.shard_index import texts_from_parquet
from pipeline.locate import current_indexes, dataset_minhash
from shards.placement import (
    PLACEMENT_MODES,
    BatchRecord,
    ExistingState,
    NearCopy,
    Place,
    SubjectOptions,
    SubjectPlacement,
    place_subjects,
    summarise_identifiers,
)
from shards.schedule import DEFAULT_SCHEDULE, RetrainEstimate, SliceSchedule, retrain_estimate


@dataclass(frozen=True)
class NewRecord:
    record_id: str
    identifiers: tuple[tuple[str, str], ...]  # (kind, keyed hash)
    text: str


def resolve_placement(requested: str | None, dataset: Dataset | None, has_identifier_fields: bool) -> str:
    """The dataset's placement if it exists (a different request is refused by ``ensure_dataset``), else the
    requested one, else ``subject`` when the data has identifier fields and ``record`` otherwise."""
    if requested is not None and requested not in PLACEMENT_MODES:
        raise ValueError(f"--placement must be one of {', '.join(PLACEMENT_MODES)}, got {requested!r}")
    if dataset is not None:
        return requested or dataset.placement
    return requested or ("subject" if has_identifier_fields else "record")


def live_slice_counts(session: Session, dataset_id: int) -> dict[Place, int]:
    """Records not erased, per (shard, slice)."""
    rows = session.execute(
        select(Record.shard, Record.slice, func.count())
        .where(Record.dataset_id == dataset_id, Record.erased_in_shard_version.is_(None))
        .group_by(Record.shard, Record.slice)
    ).all()
    return {Place(int(s), int(r)): int(n) for s, r, n in rows}


def _existing_identifiers(session: Session, dataset_id: int, wanted: set[tuple[str, str]], kinds: Sequence[str]):
    rows = session.execute(
        select(RecordIdentifier.kind, RecordIdentifier.keyed_hash, Record.shard, Record.slice)
        .join(Record, (Record.dataset_id == RecordIdentifier.dataset_id)
              & (Record.record_id == RecordIdentifier.record_id))
        .where(RecordIdentifier.dataset_id == dataset_id, RecordIdentifier.kind.in_(list(kinds)),
               Record.erased_in_shard_version.is_(None))
    )
    return summarise_identifiers(row for row in rows if (row[0], row[1]) in wanted)


def place_batch_by_subject(
    settings: Settings,
    session: Session,
    dataset_name: str,
    batch: Sequence[NewRecord],
    n_shards: int,
    n_slices: int,
    seed: int,
    options: SubjectOptions = SubjectOptions(),
) -> SubjectPlacement:
    """Subject placement of ``batch`` given what ``dataset_name`` (if it exists) already holds."""
    linking = set(options.linking_kinds)
    query_rows = [i for i, r in enumerate(batch) if not any(k in linking for k, _ in r.identifiers)]
    minhash = dataset_minhash(settings, dataset_name)
    ids, texts = [r.record_id for r in batch], [r.text for r in batch]
    copies: list[NearCopy] = []
    if query_rows:
        signatures = minhash_signatures(texts, minhash)
        for pair in near_copies_within(ids, texts, query_rows, minhash, options.min_copy_jaccard, signatures):
            copies.append(NearCopy(pair.copy_id, pair.original_id, pair.jaccard))
    dataset = get_dataset(session, dataset_name)
    existing = ExistingState()
    if dataset is not None:
        wanted = {key for r in batch for key in r.identifiers if key[0] in linking}
        records: dict[str, Place] = {}
        if query_rows:
            indexes, paths, _ = current_indexes(settings, session, dataset)
            fetch = texts_from_parquet(paths)
            q_ids, q_texts = [ids[i] for i in query_rows], [texts[i] for i in query_rows]
            q_sigs = signatures[query_rows]
            for shard in sorted(indexes):
                for pair in near_copies_in_index(indexes[shard], fetch, q_ids, q_texts, options.min_copy_jaccard,
                                                 q_sigs):
                    records[pair.original_id] = Place(pair.shard, pair.slice)
                    copies.append(NearCopy(pair.copy_id, pair.original_id, pair.jaccard))
        existing = ExistingState(
            identifiers=_existing_identifiers(session, dataset.id, wanted, options.linking_kinds),
            records=records, counts=live_slice_counts(session, dataset.id))
    return place_subjects([BatchRecord(r.record_id, r.identifiers) for r in batch], n_shards, n_slices, seed,
                          near_copies=copies, existing=existing, options=options)


def subject_options(linking_kinds: Iterable[str] | None = None, max_records_per_identifier: int | None = None,
                    thresholds: Thresholds | None = None) -> SubjectOptions:
    """Placement options with the dataset's erase threshold for verified copies."""
    defaults = SubjectOptions()
    return SubjectOptions(
        linking_kinds=tuple(linking_kinds) if linking_kinds is not None else defaults.linking_kinds,
        max_records_per_identifier=max_records_per_identifier or defaults.max_records_per_identifier,
        min_copy_jaccard=(thresholds or Thresholds()).jaccard_erase,
    )


def estimate_schedule(settings: Settings, session: Session, dataset: Dataset) -> SliceSchedule:
    """The slice schedule the dataset's ensemble in service was trained with, or the default schedule's
    shape when nothing was trained yet (the fraction does not depend on the number of epochs)."""
    from db.training import Checkpoint, EnsembleMemberRow, EnsembleVersionRow
    from shards.checkpoint_config import read_train_config

    # the ensemble in service (the newest version) and one member's checkpoint, read without torch
    # (a fast `erasure locate`): the config is all the estimate needs
    newest = (select(EnsembleVersionRow.id).where(EnsembleVersionRow.dataset_id == dataset.id)
              .order_by(EnsembleVersionRow.id.desc()).limit(1).scalar_subquery())
    found = session.execute(
        select(Checkpoint.path, Checkpoint.sha256, Checkpoint.key)
        .join(EnsembleMemberRow, (EnsembleMemberRow.dataset_id == Checkpoint.dataset_id)
              & (EnsembleMemberRow.checkpoint_key == Checkpoint.key))
        .where(EnsembleMemberRow.ensemble_id == newest).order_by(EnsembleMemberRow.shard).limit(1)).first()
    if found is not None:
        from pipeline.object_store import local_copy

        # a storage URL: the checkpoint fetched (verified) into this host's cache of the dataset's checkpoints
        path = local_copy(settings, found.path, found.sha256,
                          settings.home / "checkpoints" / dataset.name / found.key[:2] / f"{found.key}.pt")
        # the schedule alone (TrainConfig.from_dict would build the model spec, which imports torch)
        schedule = SliceSchedule(tuple(float(e) for e in read_train_config(path)["epochs_per_slice"]))
        if schedule.num_slices == dataset.n_slices:
            return schedule
    return SliceSchedule.named(DEFAULT_SCHEDULE, dataset.n_slices, 1.0)


def retrain_estimate_for(settings: Settings, session: Session, dataset: Dataset,
                         places: Iterable[tuple[int, int]], *,
                         erased_places: Iterable[tuple[int, int]] = ()) -> RetrainEstimate:
    """What removing records at ``places`` ((shard, slice) each) would retrain: the planner's sums on the
    dataset's live per-slice counts (plus ``erased_places``: records of the same removal already erased,
    counted as the shards held them before) and its training schedule."""
    counts = {s: [0] * dataset.n_slices for s in range(dataset.n_shards)}
    for place, n in live_slice_counts(session, dataset.id).items():
        counts[place.shard][place.slice] = n
    for shard, slc in erased_places:
        counts[shard][slc] += 1
    return retrain_estimate(counts, list(places), estimate_schedule(settings, session, dataset))


def request_retrain_estimates(settings: Settings, session: Session, matches: Sequence) -> dict[str, dict]:
    """Per dataset name, the estimate for a request's matches decided for erasure (erased or not yet)."""
    by_dataset: dict[int, list] = {}
    for m in matches:
        if m.erased_in_shard_version is not None or m.final_decision == "erase":
            by_dataset.setdefault(m.dataset_id, []).append(m)
    out = {}
    for dataset_id, found in sorted(by_dataset.items()):
        dataset = session.get(Dataset, dataset_id)
        erased = [(m.shard, m.slice) for m in found if m.erased_in_shard_version is not None]
        estimate = retrain_estimate_for(settings, session, dataset, [(m.shard, m.slice) for m in found],
                                        erased_places=erased)
        out[dataset.name] = estimate.to_dict()
    return out


def matches_retrain_estimate(settings: Settings, session: Session, dataset_name: str, matches: Iterable) -> dict:
    """The estimate for a locate result's matches decided ``erase`` (``dedup.policy.Match``), as a dict."""
    dataset = get_dataset(session, dataset_name)
    if dataset is None:
        raise LookupError(f"no dataset named {dataset_name!r}; ingest a file first")
    places = [(m.shard, m.slice) for m in matches if m.decision.value == "erase"]
    return retrain_estimate_for(settings, session, dataset, places).to_dict()


def subject_placement_view(settings: Settings, session: Session,
                           live_records: Iterable[tuple[str, int, int]]) -> list[dict]:
    """Per dataset, where a subject's live records ((dataset name, shard, slice) each) are, the dataset's
    placement mode and what erasing them would retrain (``erasure audit subject``)."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, shard, slc in live_records:
        by_name.setdefault(name, []).append((int(shard), int(slc)))
    out = []
    for name in sorted(by_name):
        dataset = get_dataset(session, name)
        if dataset is None:
            raise LookupError(f"no dataset named {name!r}")
        per_shard: dict[int, list[int]] = {}
        for shard, slc in by_name[name]:
            per_shard.setdefault(shard, []).append(slc)
        out.append({
            "dataset": name, "placement": dataset.placement,
            "shards": [{"shard": s, "slices": sorted(set(v)), "records": len(v)} for s, v in sorted(per_shard.items())],
            "retrain_estimate": retrain_estimate_for(settings, session, dataset, by_name[name]).to_dict(),
        })
    return out
