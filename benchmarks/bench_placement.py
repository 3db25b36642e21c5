"""Placement benchmark: what one person's erasure costs under record vs subject placement.

Generates the demo dataset (``shards.demo_data``), places it both ways (the same
functions ingest uses: ``shards.assign.place_record`` and
``shards.placement.place_subjects`` with near-copies from ``dedup.near_copies``),
and prices a request for every person with 3-40 records (their originals and
their copies at Jaccard >= 0.8, what locate erases) with
``shards.retrain.retrain_estimate``, the retrain planner's sums. Prints one JSON
document. No database, no training: placement and cost only.

    python benchmarks/bench_placement.py [--records 20000] [--shards 8] [--slices 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dedup.hashing_embedder import HashingEmbedder  # noqa: E402
from dedup.identifiers import keyed_hash  # noqa: E402
from pipeline.training import TrainingOptions, train_config  # noqa: E402
from shards.assign import Placement  # noqa: E402
from shards.checkpoints import CheckpointStore  # noqa: E402
from shards.ensemble import Ensemble, EnsembleVersion  # noqa: E402
from dedup.minhash import MinHashParams  # noqa: E402
from dedup.near_copies import near_copies_within  # noqa: E402
from shards.assign import place_record  # noqa: E402
from shards.demo_data import LABELS, read_ground_truth, write_demo  # noqa: E402
from shards.placement import BatchRecord, NearCopy, SubjectOptions, place_subjects, placement_skew  # noqa: E402
from shards.retrain import expected_retrain_fraction, retrain_estimate  # noqa: E402
from shards.training import (  # noqa: E402
    DEFAULT_SCHEDULE,
    SCHEDULE_KINDS,
    ShardData,
    SliceSchedule,
    TrainConfig,
    train_shard,
)

KEY = b"bench-placement-key"


def label_distance(labels_by_shard: dict[int, Counter], n_labels: int) -> float:
    """The largest total-variation distance between a shard's label distribution and the whole data's."""
    total = Counter()
    for c in labels_by_shard.values():
        total.update(c)
    n = sum(total.values())
    worst = 0.0
    for c in labels_by_shard.values():
        m = sum(c.values())
        tv = 0.5 * sum(abs(c[y] / m - total[y] / n) for y in range(n_labels)) if m else 0.0
        worst = max(worst, tv)
    return worst


def shards_of(records: list[dict], features: np.ndarray, labels: np.ndarray, train: np.ndarray,
              places: dict[str, Placement], n_shards: int) -> dict[str, ShardData]:
    """The training records of each shard in training order (slice, order key), as ingest writes them."""
    rows: dict[int, list[tuple[int, int, str, int]]] = {s: [] for s in range(n_shards)}
    for i, r in enumerate(records):
        if train[i]:
            p = places[r["id"]]
            rows[p.shard].append((p.slice, p.order_key, r["id"], i))
    out = {}
    for s, members in rows.items():
        members.sort()
        index = np.array([m[3] for m in members], dtype=np.int64)
        out[str(s)] = ShardData(str(s), [m[2] for m in members], np.array([m[0] for m in members], dtype=np.int32),
                                features[index], labels[index])
    return out


def train_and_score(shards: dict[str, ShardData], config: TrainConfig, features: np.ndarray, labels: np.ndarray,
                    work: Path) -> dict:
    """Train every shard from scratch under ``config``; held-out accuracy (mean probability), samples, seconds."""
    store = CheckpointStore(work)
    began = time.perf_counter()
    results = [train_shard(shard, config, store, device="cpu", resume=False) for shard in shards.values()
               if shard.num_records]
    seconds = time.perf_counter() - began
    report = Ensemble(EnsembleVersion.from_results(results), store, device="cpu").evaluate(features, labels)
    return {"accuracy": round(report.accuracy["mean_prob"], 4), "vote": round(report.accuracy["vote"], 4),
            "member_mean": round(statistics.fmean(report.member_accuracy.values()), 4),
            "epochs_per_slice": [round(e, 4) for e in config.schedule.epochs],
            "samples": sum(r.cost.samples_processed for r in results), "train_seconds": round(seconds, 2)}


def accuracy_figures(records: list[dict], places: dict[str, dict[str, Placement]], n_shards: int, n_slices: int,
                     seed: int, epochs: float, hard_dim: int, test_fraction: float = 0.2) -> dict:
    """Held-out accuracy of the S-shard ensemble vs one model (S=1, R=1) with the pipeline's own
    ``train_config``, at the defaults and the alternatives, on the harder variant of the demo task
    (texts hashed into ``hard_dim`` dimensions, as ``bench_sisa.py --hard-dim``)."""
    features = HashingEmbedder(dim=hard_dim).embed([r["text"] for r in records])
    labels = np.array([r["label"] for r in records], dtype=np.int64)
    train = np.random.default_rng(seed).random(len(records)) >= test_fraction
    held_features, held_labels = features[~train], labels[~train]
    num_classes = int(labels.max()) + 1
    variants = {"default (par, equal-samples)": TrainingOptions(epochs=epochs),
                "par, paper": TrainingOptions(epochs=epochs, schedule="paper"),
                "per-shard, paper (before)": TrainingOptions(epochs=epochs, budget="per-shard", schedule="paper")}
    out: dict = {"task": f"demo labels, texts hashed into {hard_dim} dimensions (bench_sisa.py's harder variant)",
                 "train_records": int(train.sum()), "held_out_records": int((~train).sum()), "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        single = {r["id"]: Placement(0, 0, place_record(r["id"], seed, 1, 1).order_key) for r in records}
        one = shards_of(records, features, labels, train, single, 1)
        config = train_config(hard_dim, num_classes, 1, TrainingOptions(epochs=epochs), 1)
        out["single_model"] = train_and_score(one, config, held_features, held_labels, Path(tmp) / "single")
        for mode, where in places.items():
            shards = shards_of(records, features, labels, train, where, n_shards)
            rows = {}
            for name, options in variants.items():
                config = train_config(hard_dim, num_classes, n_slices, options, n_shards)
                row = train_and_score(shards, config, held_features, held_labels, Path(tmp) / f"{mode}-{name}")
                row["gap_points"] = round(100 * (out["single_model"]["accuracy"] - row["accuracy"]), 2)
                rows[name] = row
            out[mode] = rows
    out["goal_within_2_points"] = all(out[m]["default (par, equal-samples)"]["gap_points"] <= 2.0 for m in places)
    return out


def run(n_records: int, n_shards: int, n_slices: int, seed: int, epochs: float = 4.0, hard_dim: int = 32,
        posts_per_person: float = 4.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo(tmp, n_records, seed, posts_per_person=posts_per_person)
        records = [json.loads(line) for line in files.records.read_text(encoding="utf-8").splitlines()]
        truth = read_ground_truth(files.ground_truth)
    labels = {r["id"]: r["label"] for r in records}

    t = time.perf_counter()
    batch = [BatchRecord(r["id"], tuple((k, keyed_hash(KEY, k, r[k])) for k in ("email", "user_id", "name")
                                        if r.get(k))) for r in records]
    options = SubjectOptions()
    query = [i for i, b in enumerate(batch) if not any(k in options.linking_kinds for k, _ in b.identifiers)]
    pairs = near_copies_within([r["id"] for r in records], [r["text"] for r in records], query,
                               MinHashParams(), options.min_copy_jaccard)
    copies_s = time.perf_counter() - t
    t = time.perf_counter()
    subject = place_subjects(batch, n_shards, n_slices, seed,
                             near_copies=[NearCopy(p.copy_id, p.original_id, p.jaccard) for p in pairs],
                             options=options)
    subject_s = time.perf_counter() - t
    full_places = {
        "record": {r["id"]: place_record(r["id"], seed, n_shards, n_slices) for r in records},
        "subject": dict(subject.places),
    }
    placements = {mode: {rid: (p.shard, p.slice) for rid, p in where.items()} for mode, where in full_places.items()}

    erased_copies: dict[int, list[str]] = {}
    for c in truth["copies"]:
        if c["jaccard"] >= options.min_copy_jaccard:
            erased_copies.setdefault(c["person"], []).append(c["id"])
    requests = [p["originals"] + erased_copies.get(p["person"], []) for p in truth["persons"]
                if 3 <= len(p["originals"]) <= 40]
    schedules = {kind: SliceSchedule.named(kind, n_slices, 1.0) for kind in SCHEDULE_KINDS}
    schedule = schedules[DEFAULT_SCHEDULE]
    out: dict = {}
    for mode, where in placements.items():
        counts = {s: [0] * n_slices for s in range(n_shards)}
        by_shard: dict[int, Counter] = {s: Counter() for s in range(n_shards)}
        for rid, (shard, slc) in where.items():
            counts[shard][slc] += 1
            by_shard[shard][labels[rid]] += 1
        fractions, touched, earliest = [], [], []
        by_schedule: dict[str, list[float]] = {kind: [] for kind in schedules}
        for ids in requests:
            est = retrain_estimate(counts, [where[r] for r in ids], schedule)
            fractions.append(est.fraction)
            touched.append(len(est.shards))
            earliest += [s.earliest_slice for s in est.shards]
            for kind, other in schedules.items():
                by_schedule[kind].append(retrain_estimate(counts, [where[r] for r in ids], other).fraction)
        sizes = [sum(v) for v in counts.values()]
        out[mode] = {
            "retrain_fraction_mean": round(statistics.fmean(fractions), 4),
            "retrain_fraction_median": round(statistics.median(fractions), 4),
            "retrain_fraction_p90": round(sorted(fractions)[int(0.9 * (len(fractions) - 1))], 4),
            "retrain_fraction_mean_by_schedule": {k: round(statistics.fmean(v), 4) for k, v in by_schedule.items()},
            "retrain_fraction_median_by_schedule": {k: round(statistics.median(v), 4)
                                                    for k, v in by_schedule.items()},
            "shards_touched_mean": round(statistics.fmean(touched), 3),
            "earliest_slice_histogram": dict(sorted(Counter(earliest).items())),
            "shard_size_max_over_mean": round(placement_skew(sizes), 4),
            "shard_sizes": sizes,
            "slice_sizes_total": [sum(counts[s][r] for s in counts) for r in range(n_slices)],
            "label_tv_distance_max": round(label_distance(by_shard, len(LABELS)), 4),
        }
    k_mean = statistics.fmean(len(ids) for ids in requests)
    accuracy = (accuracy_figures(records, full_places, n_shards, n_slices, seed, epochs, hard_dim)
                if epochs else None)
    return {
        "benchmark": "placement",
        "records": n_records, "posts_per_person": posts_per_person, "shards": n_shards, "slices": n_slices, "seed": seed,
        "persons_requested": len(requests), "records_per_request_mean": round(k_mean, 2),
        "schedule": f"{DEFAULT_SCHEDULE} (the training default; all kinds under *_by_schedule)",
        "record": out["record"],
        "subject": {**out["subject"], **subject.report(), "hubs": len(subject.hubs),
                    "near_copy_pairs": len(pairs)},
        "improvement_mean": round(out["record"]["retrain_fraction_mean"] / out["subject"]["retrain_fraction_mean"], 2),
        "predicted_record_fraction_for_mean_k": round(expected_retrain_fraction(n_shards, n_slices, round(k_mean)), 4),
        "paper_single_deletion_fraction": round((2 / 3 + 1 / (3 * n_slices)) / n_shards, 4),
        "accuracy": accuracy,
        "seconds": {"near_copies": round(copies_s, 2), "place_subjects": round(subject_s, 2)},
        "goals": {"subject_mean_le_0.08": out["subject"]["retrain_fraction_mean"] <= 0.08,
                  "improvement_ge_6x": out["record"]["retrain_fraction_mean"]
                  >= 6 * out["subject"]["retrain_fraction_mean"],
                  "skew_le_1.1": out["subject"]["shard_size_max_over_mean"] <= 1.1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--posts-per-person", type=float, default=4.0,
                        help="the demo generator's mean records per person (4: the demo; 8: persons as in the real data)")
    parser.add_argument("--epochs", type=float, default=4.0,
                        help="training epochs (TrainingOptions.epochs) for the accuracy figures; 0 skips them")
    parser.add_argument("--hard-dim", type=int, default=32, help="dimensions of the harder task's features")
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.records, args.shards, args.slices, args.seed, args.epochs, args.hard_dim, args.posts_per_person)
    result["seconds"]["total"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
