"""Paraphrase benchmark on real paraphrases: the old absolute cosine cut against the neighbourhood score,
and embedding speed; ONE JSON document on stdout, progress on stderr.

    python benchmarks/bench_paraphrase.py  # 20k background records (~30 min on 2 busy cores; --vector-cache DIR reuses embeddings)
    python benchmarks/bench_paraphrase.py --background 1000 --max-pairs 150 --speed-texts 100   # a quick look

Data: ``tests/resources/paraphrase/bible_kjv_web.jsonl.gz`` (``benchmarks/paraphrase_data.py``):
the same verse in the King James and the World English Bible, two independent
human translations. Per split (``tune``: even books, ``check``: odd books, never
tuned on) the KJV verses are ingested together with ``--background`` demo records
(``shards.demo_data``) into ``--shards`` shard indexes, and each WEB verse is a
query (a ``--sample``). A query is *found* when its own verse is flagged (review);
every other flagged record is a false review item. The chapter's other verses are
in the corpus: the hard negatives (same topic, other content). For every
``--absent-every``-th query its own verse is left out of the corpus: a request
whose text the dataset does not hold, which must flag nothing (otherwise "flag
the nearest record" would look perfect).

* ``curves.tune``: precision / recall / false items per request of the old rule
  (``cosine >= t``) over ``t``; of the previous margin rule (margin at rank 1) over
  its threshold; of the new score (:mod:`dedup.paraphrase`: margin + lead weight x
  the rank-1 record's cosine lead over the runner-up, near-copy net 0.95) over its
  threshold; and of the span tier (a lower score with a shared word span).
* ``operating_point``: chosen on ``tune`` only (most recall at precision >= 0.9, at
  least 0.85 when a third of the requests hold nothing, and at most 5 false items
  per request at 100k records), in two steps for the new rule: the lead weight and
  score by the embedding alone, then the span tier's lower score with those fixed
  (kept only if it adds recall); the old rules' best points under the same
  constraints. ``held_out``: all of them on the check books.
* ``false_reviews``: false items per request for demo queries (held-out demo posts;
  their planted copies are not counted as false) at the chosen point, measured on
  the background and extrapolated to 100k records (the margin rule flags at most
  ``margin_max_rank`` records per sample by construction; the absolute part grows
  with the corpus, so it is scaled linearly).
* ``locate_check``: the same decisions through ``dedup.locate.locate_matches``
  (the code path of ``erasure locate``), on a subset of check queries.
* ``speed``: measured in one run on the same texts, interleaved: the packaged
  MiniLM's raw ``SentenceTransformer.encode``, our ingest's embedding phase
  (``embed_in_chunks`` + ``MiniLMEmbedder``), and ``minilm-int8`` (ONNX Runtime,
  int8); the ratios within each round and their median over the rounds. Beside
  it, the int8 model's top-1 agreement with float32 on the calibration queries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import paraphrase_data  # noqa: E402

from dedup.embeddings import Embedder, MiniLMEmbedder, embed_in_chunks, get_embedder  # noqa: E402
from dedup.locate import LocateRequest, locate_matches  # noqa: E402
from dedup.paraphrase import DEFAULT_K, knn_means, lead_over_runner_up, shared_spans  # noqa: E402
from dedup.policy import Decision, Method, Thresholds, default_thresholds  # noqa: E402
from dedup.shard_index import build_shard_index  # noqa: E402
from shards.demo_data import generate_demo  # noqa: E402

console = Console(stderr=True)
TOP_K = 8  # per shard; ranks above this are reached only through the absolute cut
OLD_FLOOR = 0.5  # the lowest absolute cut swept
PRECISION_GOAL, RECALL_GOAL, FALSE_GOAL = 0.9, 0.9, 5.0
# With a third of the requests holding nothing in the data, "review the nearest record" has precision
# ~0.7 while it looks perfect when every request's text is there: the chosen point must keep this much.
ABSENT_PRECISION_FLOOR = 0.85


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")


VECTOR_CACHE: Path | None = None  # --vector-cache: reuse embeddings between runs (analysis only)


def embed_timed(embedder: Embedder, texts: list[str], what: str) -> tuple[np.ndarray, float]:
    if VECTOR_CACHE is not None:
        digest = hashlib.sha256("\x00".join([embedder.name, *texts]).encode()).hexdigest()[:20]
        path = VECTOR_CACHE / f"{embedder.name}-{digest}.npy"
        if path.exists():
            log(f"{what}: {len(texts)} vectors from {path}")
            return np.load(path), float("nan")
        vectors, secs = _embed_timed(embedder, texts, what)
        VECTOR_CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        return vectors, secs
    return _embed_timed(embedder, texts, what)


def _embed_timed(embedder: Embedder, texts: list[str], what: str) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        secs = time.perf_counter() - t
        rate = done[0] / secs
        log(f"{what}: {done[0]}/{len(texts)} ({rate:.0f}/s, ETA {(len(texts) - done[0]) / rate:.0f} s)")

    vectors = embed_in_chunks(embedder, texts, progress, chunk=1024)
    return vectors, time.perf_counter() - t


# ------------------------------------------------------------------ candidates
def candidates(indexes, query_vectors: np.ndarray, embedder: Embedder, query_texts: list[str],
               text_of: dict[str, str]) -> list[dict]:
    """Per query: every record within its top TOP_K per shard or at cosine >= OLD_FLOOR, with
    cosine, rank over all shards, both neighbourhood means, the rank-1 record's lead over the
    runner-up and the longest word span it shares with the query (as dedup.locate computes them)."""
    per_query: list[dict] = [{} for _ in range(len(query_vectors))]
    for s, idx in enumerate(indexes):
        rows, sims = idx.nearest(query_vectors, TOP_K, embedder)
        query_means = knn_means(sims[:, :idx.knn_k])
        ranged = idx.embedding_neighbours(query_vectors, OLD_FLOOR, embedder)
        for q in range(len(query_vectors)):
            found = {int(r): float(c) for r, c in zip(rows[q], sims[q]) if r >= 0}
            found.update((int(r), float(c)) for r, c in zip(*ranged[q]))
            for r, c in found.items():
                per_query[q][(s, idx.record_ids[r])] = (c, float(query_means[q]), float(idx.knn_mean[r]))
    out = []
    for q, cands in enumerate(per_query):
        keys = list(cands)
        cos = np.array([cands[k][0] for k in keys], np.float64)
        order = np.sort(cos)[::-1]
        rank = np.searchsorted(-order, -cos, side="left") + 1
        r_q = np.array([cands[k][1] for k in keys])
        r_c = np.array([cands[k][2] for k in keys])
        lead = np.where(rank == 1, lead_over_runner_up(order), 0.0)
        span = np.array([max((len(x.split()) for x in shared_spans(query_texts[q], text_of[k[1]])), default=0)
                         if r == 1 else 0 for k, r in zip(keys, rank)], np.int64)
        out.append({"ids": [k[1] for k in keys], "cos": cos, "rank": rank, "lead": lead, "span": span,
                    "margin": cos / np.maximum((r_q + r_c) / 2, 0.05)})
    return out


def flatten(cands: list[dict], truth: list[str | None]) -> dict:
    """All (query, candidate) rows in flat arrays, so that a rule is evaluated in one pass."""
    q = np.concatenate([np.full(len(c["ids"]), i) for i, c in enumerate(cands)]) if cands else np.zeros(0, int)
    true = np.concatenate([np.array([x == t for x in c["ids"]], bool) for c, t in zip(cands, truth)])
    return {"q": q, "true": true, "n": len(cands), "present": sum(t is not None for t in truth),
            **{k: np.concatenate([c[k] for c in cands]) for k in ("cos", "rank", "margin", "lead", "span")}}


def evaluate(cands, truth: list[str | None] | None, flag) -> dict:
    """Precision (true flags / flags), recall (queries whose own record is in the corpus and flagged),
    false flags per query (all queries, those without their record too). ``cands`` may be flattened."""
    flat = cands if isinstance(cands, dict) else flatten(cands, truth)
    f = flag(flat)
    flags, hits = int(f.sum()), int((f & flat["true"]).sum())
    false_per_query = np.bincount(flat["q"], weights=(f & ~flat["true"]).astype(float), minlength=flat["n"])
    return {"precision": round(hits / flags, 4) if flags else 1.0,
            "recall": round(hits / max(1, flat["present"]), 4),
            "false_per_request": round((flags - hits) / max(1, flat["n"]), 3),
            "max_false_per_request": int(false_per_query.max()) if flat["n"] else 0}


def old_rule(t: float):
    return lambda c: c["cos"] >= t


def margin_rule(m: float, m_lower: float, max_rank: int, floor: float, absolute: float):
    def flag(c):
        need = np.where(c["rank"] == 1, m, m_lower)
        return ((c["rank"] <= max_rank) & (c["margin"] >= need) & (c["cos"] >= floor)) | (c["cos"] >= absolute)
    return flag


def score_rule(lead_weight: float, score: float, spans_score: float, floor: float, absolute: float,
               span_words: int = 3):
    """The new rule (dedup.policy.Thresholds.decide_paraphrase, margin_max_rank 1): the rank-1 record
    when margin + lead_weight * lead >= score, or >= spans_score with a shared span of span_words words."""
    def flag(c):
        s = c["margin"] + lead_weight * c["lead"]
        by_score = (s >= score) | ((spans_score > 0) & (c["span"] >= span_words) & (s >= spans_score))
        return ((c["rank"] == 1) & (c["cos"] >= floor) & by_score) | (c["cos"] >= absolute)
    return flag


def flatten_demo(cands: list[dict], related: list[set[str]]) -> dict:
    """Demo queries' candidates, flat; ``true`` marks the query's planted copies (not false reviews)."""
    flat = flatten(cands, [None] * len(cands))
    flat["true"] = np.concatenate([np.array([x in rel for x in c["ids"]], bool) for c, rel in zip(cands, related)])
    return flat


def false_at_100k(demo: dict | None, records: int, flag, absolute_only, worst: bool = False) -> float | None:
    """False review items per request at 100k records (mean, or the worst request with ``worst``), from
    demo queries at ``records``: what the rank-capped margin part flags stays (at most margin_max_rank
    per sample, whatever the size); what only an absolute cut flags grows with the corpus, linearly."""
    if demo is None:
        return None
    false = flag(demo) & ~demo["true"]
    grows = absolute_only(demo) & false
    per_query = (np.bincount(demo["q"], weights=(false & ~grows).astype(float), minlength=demo["n"])
                 + np.bincount(demo["q"], weights=grows.astype(float), minlength=demo["n"]) * 100_000 / records)
    return round(float(per_query.max() if worst else per_query.mean()), 3) if demo["n"] else 0.0


def sweep(cands, truth, demo: dict | None = None, records: int = 1) -> dict:
    cands = flatten(cands, truth)
    old = [{"cosine": round(t, 3), **evaluate(cands, truth, old_rule(t)),
            "est_false_100k": false_at_100k(demo, records, old_rule(t), old_rule(t)),
            "est_max_false_100k": false_at_100k(demo, records, old_rule(t), old_rule(t), worst=True)}
           for t in np.arange(OLD_FLOOR, 0.951, 0.025)]
    new = []
    for max_rank in (1, 2, 3):
        for lower_extra in ((0.0,) if max_rank == 1 else (0.0, 0.1)):
            for m in np.arange(0.95, 1.61, 0.025):
                for absolute in (1.01, 0.9):
                    for floor in (0.5, 0.6, 0.65, 0.7):
                        point = {"margin_review": round(m, 3), "margin_review_lower": round(m + lower_extra, 3),
                                 "margin_max_rank": max_rank, "cosine_floor": floor,
                                 "cosine_review": round(min(absolute, 1.0), 3)}
                        rule = margin_rule(m, m + lower_extra, max_rank, floor, absolute)
                        by_margin = margin_rule(m, m + lower_extra, max_rank, floor, 9.0)
                        grows = lambda c, r=rule, b=by_margin: r(c) & ~b(c)  # noqa: E731
                        new.append({**point, **evaluate(cands, truth, rule),
                                    "est_false_100k": false_at_100k(demo, records, rule, grows),
                                    "est_max_false_100k": false_at_100k(demo, records, rule, grows, worst=True)})
    return {"old_cosine": old, "margin": new}


NET = 0.95  # the near-copy net of the MiniLM defaults (dedup.policy), kept in the new rule
SCORE_KEYS = ("lead_weight", "margin_review", "margin_review_spans", "cosine_floor", "cosine_review")


def _score_point(cands, truth, demo, records, w, hi, lo, floor) -> dict:
    rule = score_rule(w, hi, lo, floor, NET)
    grows = lambda c, r=rule: r(c) & ~score_rule(w, hi, lo, floor, 9.0)(c)  # noqa: E731
    return {"lead_weight": w, "margin_review": round(hi, 4), "margin_review_spans": round(lo, 4),
            "cosine_floor": floor, "cosine_review": NET, **evaluate(cands, truth, rule),
            "est_false_100k": false_at_100k(demo, records, rule, grows),
            "est_max_false_100k": false_at_100k(demo, records, rule, grows, worst=True)}


def sweep_score(protocols: dict, demo: dict | None, ok_absent) -> dict:
    """The new rule on the tune split, in two steps: (1) the lead weight and the score by the embedding
    alone (no span tier); (2) with those fixed, the lower score a shared span suffices for. The span
    tier can only add reviews to step 1's: on texts that share no words the embedding score decides."""
    flat = {p: flatten(protocols[p]["tune"]["cands"], protocols[p]["tune"]["truth"]) for p in protocols}
    recs = {p: len(protocols[p]["tune"]["ids"]) for p in protocols}
    grid = {p: [] for p in protocols}
    for w in (0.0, 1.0, 2.0, 3.0, 4.0):
        for hi in np.arange(0.95, 2.0, 0.0125):
            for floor in (0.5, 0.6):
                for p in protocols:
                    grid[p].append(_score_point(flat[p], None, demo, recs[p], w, float(hi), 0.0, floor))
    step1 = choose([x for x, a in zip(grid["all"], grid["absent"]) if ok_absent(a)])
    spans = {p: [] for p in protocols}
    if step1:
        for lo in np.arange(0.95, step1["margin_review"], 0.0125):
            for p in protocols:
                spans[p].append(_score_point(flat[p], None, demo, recs[p], step1["lead_weight"],
                                             step1["margin_review"], float(lo), step1["cosine_floor"]))
    step2 = choose([x for x, a in zip(spans["all"], spans["absent"]) if ok_absent(a)])
    chosen = step2 if step2 and step2["recall"] > step1["recall"] else step1
    absent = None
    if chosen:
        absent = next(a for x, a in zip(grid["all"] + spans["all"], grid["absent"] + spans["absent"]) if x is chosen)
    return {"grid": grid, "spans": spans, "embedding_only": step1, "chosen": chosen, "chosen_absent": absent}


def choose(points: list[dict]) -> dict | None:
    ok = [p for p in points if p["precision"] >= PRECISION_GOAL and p["false_per_request"] <= FALSE_GOAL
          and (p.get("est_max_false_100k") is None or p["est_max_false_100k"] <= FALSE_GOAL)]
    return max(ok, key=lambda p: (p["recall"], p["precision"], p.get("margin_review", 0))) if ok else None


# ------------------------------------------------------------------ corpus
def build_indexes(ids: list[str], texts: list[str], vectors: np.ndarray, embedder: Embedder, shards: int):
    indexes = []
    for s in range(shards):
        rows = np.arange(s, len(ids), shards)
        indexes.append(build_shard_index(s, 1, [ids[i] for i in rows], [texts[i] for i in rows],
                                         np.zeros(len(rows), np.int32), embedder=embedder,
                                         vectors=vectors[rows], knn_k=DEFAULT_K))
    return indexes


def speed(texts: list[str], rounds: int = 5) -> dict:
    """Raw encode, our ingest's embedding phase and the int8 model, interleaved on the same texts.

    The cores are shared, so the load changes from one pass to the next: each round times the three
    back to back (in a rotating order) and the ratios are taken within a round; the median over the
    rounds is reported (and each round's, to show the spread)."""
    ours = MiniLMEmbedder()
    raw_model = ours._load()  # the same packaged model object: only the path around it differs
    int8 = get_embedder("minilm-int8")
    int8.embed(texts[:8])
    raw_model.encode(texts[:8])
    runs = {
        "raw_encode": lambda: raw_model.encode(texts, batch_size=64, normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False),
        "ingest_minilm": lambda: embed_in_chunks(ours, texts),
        "minilm_int8": lambda: embed_in_chunks(int8, texts),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    per_round = {
        "ingest_over_raw": [times["raw_encode"][i] / times["ingest_minilm"][i] for i in range(rounds)],
        "int8_over_today": [times["ingest_minilm"][i] / times["minilm_int8"][i] for i in range(rounds)],
        "int8_over_raw": [times["raw_encode"][i] / times["minilm_int8"][i] for i in range(rounds)],
    }
    rate = {k: round(len(texts) / float(np.median(v)), 1) for k, v in times.items()}
    return {"texts": len(texts), "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 1),
            "texts_per_s_median": rate, "rounds": rounds, "threads": int8.threads,
            **{k: round(float(np.median(v)), 3) for k, v in per_round.items()},
            "per_round": {k: [round(x, 2) for x in v] for k, v in per_round.items()},
            "how": "ratios of the times within each round (the three run back to back), median over rounds"}


def top1_agreement(rows: list[dict], fp32: dict, int8: dict) -> dict:
    agree = total = 0
    for split in ("tune", "check"):
        sel = [i for i, r in enumerate(rows) if r["split"] == split]
        for a, b in ((fp32, int8),):
            sa = a["web"][sel] @ a["kjv"][sel].T
            sb = b["web"][sel] @ b["kjv"][sel].T
            agree += int((sa.argmax(1) == sb.argmax(1)).sum())
            total += len(sel)
    return {"queries": total, "agree": agree, "rate": round(agree / total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedder", default="minilm-int8",
                        help="the embedder the quality figures are for (minilm: the same neighbours, ~3x slower)")
    parser.add_argument("--background", type=int, default=20_000, help="demo records ingested beside each split")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--demo-queries", type=int, default=200)
    parser.add_argument("--speed-texts", type=int, default=200, help="0 skips the speed figures")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--locate-queries", type=int, default=100)
    parser.add_argument("--absent-every", type=int, default=3, help="every n-th query's own verse is not ingested")
    parser.add_argument("--agreement-pairs", type=int, default=1000,
                        help="pairs embedded by float32 MiniLM too, for the int8 top-1 agreement")
    parser.add_argument("--max-pairs", type=int, default=None, help="at most this many pairs per split (a quick look)")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--vector-cache", type=Path, default=None,
                        help="keep the embeddings here and reuse them (the speed figures are always measured)")
    args = parser.parse_args()
    global VECTOR_CACHE
    VECTOR_CACHE = args.vector_cache
    t0 = time.perf_counter()
    rows = paraphrase_data.load()
    if args.max_pairs:
        rows = [r for s in ("tune", "check") for r in [x for x in rows if x["split"] == s][: args.max_pairs]]
    embedder = get_embedder(args.embedder)

    # Speed first, on a mix of calibration and demo texts, before anything else loads the cores.
    demo = generate_demo(args.background + 4 * args.demo_queries, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    mix = [r["web"] for r in rows[: args.speed_texts // 2]] + \
        [demo.records[i]["text"] for i in rng.choice(len(demo.records), args.speed_texts - args.speed_texts // 2,
                                                     replace=False)]
    speed_out = None
    if args.speed_texts:
        log(f"speed: {len(mix)} texts, raw encode / ingest / int8, interleaved")
        speed_out = speed(mix, args.speed_rounds)
        log(f"speed: {speed_out['texts_per_s_median']}, int8/today {speed_out['per_round']['int8_over_today']}")

    vecs = {args.embedder: {side: embed_timed(embedder, [r[side] for r in rows], f"{args.embedder} {side}")[0]
                            for side in ("kjv", "web")}}
    # int8 against float32 on a spread of the calibration pairs (every m-th, both splits)
    step = max(1, len(rows) // max(1, args.agreement_pairs))
    sub = rows[::step]
    pair_vecs = {}
    for name in ("minilm", "minilm-int8"):
        emb = embedder if name == args.embedder else get_embedder(name)
        pair_vecs[name] = {side: (vecs[name][side][::step] if name in vecs else
                                  embed_timed(emb, [r[side] for r in sub], f"{name} {side} (agreement)")[0])
                           for side in ("kjv", "web")}
    agreement = top1_agreement(sub, pair_vecs["minilm"], pair_vecs["minilm-int8"])

    # Background: demo records; held-out demo originals with planted copies are the demo queries.
    copies_of: dict[str, set[str]] = {}
    for c in demo.copies:
        copies_of.setdefault(c["original_id"], set()).add(c["id"])
    held = [r for r in demo.records if r["id"] in copies_of][: args.demo_queries]
    held_ids = {r["id"] for r in held}
    background = [r for r in demo.records if r["id"] not in held_ids][: args.background]
    bg_vectors, bg_secs = embed_timed(embedder, [r["text"] for r in background], f"{args.embedder} background")
    demo_q_vectors = embedder.embed([r["text"] for r in held])

    out: dict = {"benchmark": "paraphrase", "embedder": args.embedder, "background_records": len(background),
                 "shards": args.shards, "k": DEFAULT_K, "absent_every": args.absent_every, "pairs": {s: sum(r["split"] == s for r in rows)
                                                                 for s in ("tune", "check")},
                 "data": "KJV vs WEB verse pairs, tests/resources/paraphrase (benchmarks/paraphrase_data.py)",
                 "speed": speed_out, "int8_top1_agreement": agreement,
                 "background_embedding_texts_per_s": (round(len(background) / bg_secs, 1)
                                                      if bg_secs == bg_secs else None)}
    v = vecs[args.embedder]
    # Two protocols per split: "all" (every verse ingested, as in the held-back set) and
    # "absent" (every absent_every-th verse left out: requests the dataset holds nothing for).
    protocols: dict[str, dict] = {"all": {}, "absent": {}}
    for split in ("tune", "check"):
        sel = [i for i, r in enumerate(rows) if r["split"] == split]
        for protocol in protocols:
            present = ([i for n, i in enumerate(sel) if (n + 1) % args.absent_every]
                       if protocol == "absent" and args.absent_every else sel)
            ids = [f"v{i}" for i in present] + [r["id"] for r in background]
            texts = [rows[i]["kjv"] for i in present] + [r["text"] for r in background]
            vectors = np.vstack([v["kjv"][present], bg_vectors])
            log(f"{split}/{protocol}: indexing {len(ids)} records in {args.shards} shards")
            indexes = build_indexes(ids, texts, vectors, embedder, args.shards)
            cands = candidates(indexes, v["web"][sel], embedder, [rows[i]["web"] for i in sel], dict(zip(ids, texts)))
            kept = set(present)
            truth = [f"v{i}" if i in kept else None for i in sel]
            protocols[protocol][split] = {"indexes": indexes, "cands": cands, "truth": truth, "sel": sel,
                                          "texts": texts, "ids": ids}

    # Demo queries (held-out demo posts; their planted copies are not false) against the tune corpus.
    related = [copies_of[r["id"]] for r in held]
    tune_all = protocols["all"]["tune"]
    held_texts = [r["text"] for r in held]
    demo_flat = flatten_demo(candidates(tune_all["indexes"], demo_q_vectors, embedder, held_texts,
                                        dict(zip(tune_all["ids"], tune_all["texts"]))), related)
    curves = {p: sweep(protocols[p]["tune"]["cands"], protocols[p]["tune"]["truth"], demo_flat,
                       len(protocols[p]["tune"]["ids"])) for p in protocols}
    # Chosen under the protocol (every request's text is in the data), with false review
    # items at 100k records within the goal; the "absent" figures at the same point are reported beside.
    # "margin": the previous rule (margin at rank 1 alone), kept for comparison; "score": the new rule.
    keys = ("margin_review", "margin_review_lower", "margin_max_rank", "cosine_floor", "cosine_review")
    absent_of = {tuple(x[k] for k in keys): x for x in curves["absent"]["margin"]}
    absent_old = {x["cosine"]: x for x in curves["absent"]["old_cosine"]}
    ok_absent = lambda a: a["precision"] >= ABSENT_PRECISION_FLOOR  # noqa: E731
    chosen_margin = choose([x for x in curves["all"]["margin"] if ok_absent(absent_of[tuple(x[k] for k in keys)])])
    chosen_old = choose([x for x in curves["all"]["old_cosine"] if ok_absent(absent_old[x["cosine"]])])
    if chosen_margin:
        chosen_margin = {**chosen_margin, "tune_absent": absent_of[tuple(chosen_margin[k] for k in keys)]}
    if chosen_old:
        chosen_old = {**chosen_old, "tune_absent": absent_old[chosen_old["cosine"]]}
    score = sweep_score(protocols, demo_flat, ok_absent)
    chosen_new = score["chosen"]
    if chosen_new:
        chosen_new = {**chosen_new, "tune_absent": score["chosen_absent"]}
    w_best = chosen_new["lead_weight"] if chosen_new else 0.0
    floor_best = chosen_new["cosine_floor"] if chosen_new else 0.5
    out["curves"] = {"tune": {p: {
        "old_cosine": curves[p]["old_cosine"],
        # the previous rule: margin at rank 1, near-copy net off
        "margin": [x for x in curves[p]["margin"] if x["cosine_review"] == 1.0
                   and x["margin_review_lower"] == x["margin_review"]
                   and x["margin_max_rank"] == 1 and x["cosine_floor"] == 0.5],
        # the new rule over its score threshold (chosen lead weight and floor, no span tier, net 0.95) ...
        "score": [x for x in score["grid"][p] if x["lead_weight"] == w_best and x["cosine_floor"] == floor_best],
        # ... and over the lower score that a shared span suffices for (step 2, chosen score)
        "score_with_spans": score["spans"][p]}
        for p in protocols}}
    out["operating_point"] = {
        "chosen_on": "tune: most recall at precision >= 0.9 (protocol 'all'), "
                     f">= {ABSENT_PRECISION_FLOOR} (protocol 'absent'), worst request <= 5 false items at 100k",
        "score": chosen_new, "score_embedding_only": score["embedding_only"], "margin": chosen_margin,
        "old_cosine": chosen_old, "current_default": default_thresholds(args.embedder).to_dict()}
    held_out: dict = {}
    rule = None
    if chosen_new:
        rule = score_rule(chosen_new["lead_weight"], chosen_new["margin_review"], chosen_new["margin_review_spans"],
                          chosen_new["cosine_floor"], chosen_new["cosine_review"])
        by_embedding = score["embedding_only"]
        rule_embedding = score_rule(by_embedding["lead_weight"], by_embedding["margin_review"], 0.0,
                                    by_embedding["cosine_floor"], by_embedding["cosine_review"])
    for protocol in protocols:
        c = protocols[protocol]["check"]
        h = held_out[protocol] = {}
        if chosen_old:
            h["old_cosine"] = {"cosine": chosen_old["cosine"], **evaluate(c["cands"], c["truth"],
                                                                          old_rule(chosen_old["cosine"]))}
        h["old_cosine_0.85"] = evaluate(c["cands"], c["truth"], old_rule(0.85))
        if chosen_margin:
            h["margin"] = evaluate(c["cands"], c["truth"], margin_rule(
                chosen_margin["margin_review"], chosen_margin["margin_review_lower"], chosen_margin["margin_max_rank"],
                chosen_margin["cosine_floor"], chosen_margin["cosine_review"] if chosen_margin["cosine_review"] < 1.0
                else 1.01))
            h["margin_1.2_net_0.95"] = evaluate(c["cands"], c["truth"], margin_rule(1.2, 1.2, 1, 0.5, 0.95))
        if rule is not None:
            h["score_embedding_only"] = evaluate(c["cands"], c["truth"], rule_embedding)
            h["score"] = evaluate(c["cands"], c["truth"], rule)
            if protocol == "all":  # the protocol: every request's text is in the data
                h["score"]["goal_met"] = (h["score"]["recall"] >= RECALL_GOAL
                                          and h["score"]["precision"] >= PRECISION_GOAL)
    check = protocols["absent"]["check"]
    if chosen_new:
        # Demo queries: their planted copies are true; everything else flagged is a false review item.
        demo_check = flatten_demo(candidates(check["indexes"], demo_q_vectors, embedder, held_texts,
                                             dict(zip(check["ids"], check["texts"]))), related)
        false = np.bincount(demo_check["q"], weights=(rule(demo_check) & ~demo_check["true"]).astype(float),
                            minlength=demo_check["n"])
        no_net = score_rule(chosen_new["lead_weight"], chosen_new["margin_review"], chosen_new["margin_review_spans"],
                            chosen_new["cosine_floor"], 9.0)
        demo_100k = false_at_100k(demo_check, len(check["ids"]), rule, lambda c: rule(c) & ~no_net(c))
        demo_100k_worst = false_at_100k(demo_check, len(check["ids"]), rule, lambda c: rule(c) & ~no_net(c),
                                        worst=True)
        bible_false = held_out["absent"]["score"]["false_per_request"]
        out["false_reviews"] = {
            "records": len(check["ids"]), "demo_queries": len(held),
            "demo_false_per_request": round(float(false.mean()), 3), "demo_max_false": int(false.max()),
            "calibration_false_per_request": bible_false, "demo_estimate_100k_per_request": demo_100k,
            "demo_estimate_100k_worst_request": demo_100k_worst,
            "estimate_100k_per_request": round(max(demo_100k, bible_false), 3),
            "goal_met": bool(demo_100k_worst <= FALSE_GOAL and bible_false <= FALSE_GOAL),
            "how": "measured at 'records' (the check corpus); what the rank-1 score rule flags stays "
                   "(at most one record per sample whatever the size), what only the near-copy net "
                   "flags is scaled linearly to 100k; demo queries' planted copies are not false"}
    out["held_out"] = held_out

    # The same decisions through the locate code path (what `erasure locate` runs).
    if chosen_new:
        thresholds = Thresholds(cosine_review=chosen_new["cosine_review"], margin_review=chosen_new["margin_review"],
                                margin_review_lower=chosen_new["margin_review"], margin_max_rank=1,
                                cosine_floor=chosen_new["cosine_floor"], lead_weight=chosen_new["lead_weight"],
                                margin_review_spans=chosen_new["margin_review_spans"])
        text_of = dict(zip(check["ids"], check["texts"]))
        by_shard = {idx.shard: idx for idx in check["indexes"]}
        n = min(args.locate_queries, len(check["sel"]))
        agree = found = extra = 0
        for q in range(n):
            i = check["sel"][q]
            res = locate_matches(LocateRequest(samples=(rows[i]["web"],)), by_shard,
                                 lambda s, rids: [text_of[r] for r in rids], embedder=embedder,
                                 thresholds=thresholds, hops=0)
            flagged = {m.record_id for m in res.matches if m.decision is not Decision.KEEP}
            by_margin = {m.record_id for m in res.matches if m.method is Method.EMBEDDING
                         and m.decision is Decision.REVIEW}
            expected = {rid for rid, x in zip(check["cands"][q]["ids"], rule(check["cands"][q])) if x}
            # A record MinHash also found keeps its (stronger) Jaccard match: compare all flags.
            agree += expected <= flagged and by_margin <= expected
            extra += len(flagged - expected)
            found += check["truth"][q] is not None and check["truth"][q] in flagged
        out["locate_check"] = {"note": "a query embedded alone may swap near-tied rank-1 records (int8 quantises "
                                       "activations per batch)", "queries": n, "with_their_verse": sum(t is not None for t in check["truth"][:n]), "same_flags_as_bench": agree, "found": found,
                               "extra_flags_from_minhash": extra}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["platform"] = {"python": platform.python_version(), "machine": platform.machine()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
