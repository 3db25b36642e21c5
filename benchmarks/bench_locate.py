"""Locate benchmark: recall, precision, latency, throughput and memory, as ONE JSON document on stdout.

    python benchmarks/bench_locate.py            # 100k and 1M records (~15-20 min on 2 cores)
    python benchmarks/bench_locate.py --quick    # 20k records, small samples (~2 min)

Progress goes to stderr. Figures:

* ``signatures``: docs/s for ~200-word documents at 128 permutations: ours
  (1 and 2 threads), ``datasketch.MinHash.bulk`` with the same hash function, and
  rensa (if installed: ``pip install rensa``) on the same 5-gram shingles and on
  pre-split words, its best case; plus a check that ours equal datasketch's.
* ``embedders``: texts/s of each embedder.
* ``near_copies``: the originals that have planted copies are queries; the truth is
  every record with exact word-5-gram Jaccard >= 0.8 (exhaustive: an inverted
  index over 64-bit shingle hashes gives the overlap with every record that shares
  a shingle, and all others have Jaccard 0); ours are the LSH candidates verified
  by exact Jaccard.
* ``paraphrases``: per embedder, recall of the planted paraphrases and precision
  (found records that are planted copies of the query) at its review cosine, and a
  threshold sweep; MiniLM on a subset (queries, their copies and random others).
* ``latency``: one request = one person's email; seeds by lookup, second hop from
  their texts, LSH + exact verification + hashing-embedder range search over all
  shards. p50/p95 over the requests, and the same walk as a linear scan (exact
  Jaccard against every record's shingle set, cosine against every vector).
* ``memory``: bytes of each index part and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dedup.embeddings import MiniLMEmbedder  # noqa: E402
from dedup.hashing_embedder import HashingEmbedder  # noqa: E402
from dedup.locate import LocateRequest, SeedRecord, locate_matches  # noqa: E402
from dedup.lsh import candidate_probability  # noqa: E402
from dedup.minhash import (  # noqa: E402
    MinHashParams,
    datasketch_minhash,
    minhash_signatures,
    shingle_hash,
    shingle_hashes,
)
from dedup.normalize import exact_jaccard, shingle_set, shingles, tokenize_batch  # noqa: E402
from dedup.policy import default_thresholds  # noqa: E402
from dedup.shard_index import ShardIndex, build_shard_index  # noqa: E402
from dedup.vector_index import VectorIndexParams  # noqa: E402
from shards.demo_data import read_ground_truth, write_demo  # noqa: E402

console = Console(stderr=True)
SLICES = 4


def log(msg: str) -> None:
    console.log(msg)


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- data
class Corpus:
    def __init__(self, n: int, seed: int, workdir: Path, shards: int) -> None:
        t = time.perf_counter()
        files = write_demo(workdir / f"demo-{n}", n, seed)
        self.gen_seconds = time.perf_counter() - t
        self.ids, self.texts, emails = [], [], []
        with open(files.records, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                self.ids.append(r["id"])
                self.texts.append(r["text"])
                emails.append(r["email"])
        truth = read_ground_truth(files.ground_truth)
        self.persons, self.copies = truth["persons"], truth["copies"]
        self.n, self.shards = n, shards
        self.pos = {rid: i for i, rid in enumerate(self.ids)}
        self.seeds: dict[str, list[SeedRecord]] = {}
        for i, email in enumerate(emails):
            if email:
                self.seeds.setdefault(email, []).append(SeedRecord(i % shards, self.ids[i], "email"))

    def shard_rows(self, s: int) -> np.ndarray:
        return np.arange(s, self.n, self.shards)

    def lookup(self, kind: str, value: str) -> list[SeedRecord]:
        return self.seeds.get(value, []) if kind == "email" else []

    def fetch(self, shard: int, record_ids) -> list[str]:
        return [self.texts[self.pos[r]] for r in record_ids]


def _embed_chunk(texts: list[str]) -> np.ndarray:
    return HashingEmbedder().embed(texts)


def embed_parallel(texts: list[str], workers: int) -> np.ndarray:
    """The hashing embedder is pure Python per text: spread it over processes."""
    if workers <= 1:
        return HashingEmbedder().embed(texts)
    step = 5000
    chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return np.concatenate(pool.map(_embed_chunk, chunks, chunksize=1))


def build_indexes(corpus: Corpus, vectors: np.ndarray, workers: int):
    emb = HashingEmbedder()
    indexes, t0 = {}, time.perf_counter()
    for s in range(corpus.shards):
        rows = corpus.shard_rows(s)
        indexes[s] = build_shard_index(
            s, 1, [corpus.ids[i] for i in rows], [corpus.texts[i] for i in rows],
            (np.arange(len(rows)) * SLICES // max(1, len(rows))).astype(np.int32),
            embedder=emb, vectors=vectors[rows], vector_params=VectorIndexParams(), workers=workers)
    return indexes, time.perf_counter() - t0


class ShingleTable:
    """Every record's set of shingle hashes, sorted by (record, hash): for the truth and the linear scan.

    A shingle's hash is the top ``64 - doc_bits`` bits of two xxh32-based shingle
    hashes (44 bits at a million records): two different shingles match by mistake
    with probability 2^-44, far below one in the whole benchmark.
    """

    def __init__(self, texts: list[str], k: int = 5, batch: int = 4096) -> None:
        self.k = k
        self.doc_bits = max(1, (len(texts) - 1).bit_length())
        hash_bits = np.uint64(64 - self.doc_bits)
        keys = []
        for start in range(0, len(texts), batch):
            wb = tokenize_batch(texts[start : start + batch])
            h, off = self._hashes(wb)
            owner = np.repeat(np.arange(start, start + len(off) - 1, dtype=np.uint64), np.diff(off))
            keys.append((owner << hash_bits) | h)
        key = np.sort(np.concatenate(keys))
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        self.doc = (key >> hash_bits).astype(np.int64)
        self.hash = key & ((np.uint64(1) << hash_bits) - np.uint64(1))
        del key
        self.size = np.bincount(self.doc, minlength=len(texts))
        self.low = (self.hash & np.uint64((1 << 22) - 1)).astype(np.uint32)
        self._inverted = None

    def _hashes(self, wb) -> tuple[np.ndarray, np.ndarray]:
        h0, off = shingle_hashes(wb, self.k, 0)
        h1, _ = shingle_hashes(wb, self.k, 1)
        full = (h0.astype(np.uint64) << np.uint64(32)) | h1.astype(np.uint64)
        return full >> np.uint64(self.doc_bits), off

    def query_set(self, text: str) -> np.ndarray:
        return np.unique(self._hashes(tokenize_batch([text]))[0])

    def jaccard_scan(self, q: np.ndarray) -> np.ndarray:
        """Linear scan: exact Jaccard of ``q`` with every record (bitmap prefilter, then exact membership)."""
        bits = np.zeros(1 << 22, dtype=bool)
        bits[(q & np.uint64((1 << 22) - 1)).astype(np.int64)] = True
        maybe = np.flatnonzero(bits[self.low])
        hit = maybe[np.isin(self.hash[maybe], q)]
        inter = np.bincount(self.doc[hit], minlength=len(self.size))
        union = self.size + len(q) - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)

    def jaccard_exhaustive(self, q: np.ndarray) -> dict[int, float]:
        """Exact Jaccard with every record sharing a shingle (all others have 0), via the hash order."""
        if self._inverted is None:
            order = np.argsort(self.hash, kind="stable")
            self._inverted = (self.hash[order], self.doc[order])
        inv_hash, inv_doc = self._inverted
        lo = np.searchsorted(inv_hash, q, side="left")
        hi = np.searchsorted(inv_hash, q, side="right")
        if not (hi > lo).any():
            return {}
        docs = np.concatenate([inv_doc[a:b] for a, b in zip(lo.tolist(), hi.tolist()) if b > a])
        uniq, inter = np.unique(docs, return_counts=True)
        jac = inter / (self.size[uniq] + len(q) - inter)
        return dict(zip(uniq.tolist(), jac.tolist()))


# ---------------------------------------------------------------- figures
def bench_signatures(corpus_texts: list[str], n_docs: int, workers: int, with_rensa: bool) -> dict:
    # ~200-word documents from the demo texts (joined until 200 words)
    docs, cur, words = [], [], 0
    for text in corpus_texts:
        cur.append(text)
        words += len(text.split())
        if words >= 200:
            docs.append(" ".join(cur))
            cur, words = [], 0
            if len(docs) == n_docs:
                break
    params = MinHashParams()
    avg_words = float(np.mean([len(d.split()) for d in docs]))
    log(f"signatures: {len(docs)} docs of ~{avg_words:.0f} words")
    minhash_signatures(docs[:500], params)  # warm up
    out = {"docs": len(docs), "avg_words": round(avg_words, 1), "num_perm": 128, "shingle": "word 5-gram",
           "ours_docs_per_s": {}}
    for w in sorted({1, workers}):
        secs = best_of(lambda: minhash_signatures(docs, params, workers=w))
        out["ours_docs_per_s"][f"threads_{w}"] = round(len(docs) / secs)
    sub = docs[: min(len(docs), 2000)]
    from datasketch import MinHash

    secs = best_of(lambda: MinHash.bulk([[s.encode() for s in shingles(d)] for d in sub], num_perm=128, seed=1,
                                        hashfunc=shingle_hash), repeat=1)
    out["datasketch_bulk_docs_per_s"] = round(len(sub) / secs)
    ours = minhash_signatures(sub[:300], params)
    out["equal_to_datasketch"] = bool(all(np.array_equal(s, datasketch_minhash(d, params).hashvalues)
                                          for s, d in zip(ours, sub[:300])))
    out["rensa"] = None
    if with_rensa:
        try:
            import importlib.metadata

            import rensa
        except ImportError:
            out["rensa"] = "not installed (pip install rensa)"
        else:
            def per_doc(token_lists):
                for toks in token_lists:
                    m = rensa.RMinHash(num_perm=128, seed=42)
                    m.update(toks)
                    m.digest()

            split = [d.split() for d in docs]
            r = {"version": importlib.metadata.version("rensa")}
            r["shingles_5gram_incl_shingling_docs_per_s"] = round(
                len(sub) / best_of(lambda: per_doc([shingles(d) for d in sub]), repeat=1))
            r["words_incl_split_docs_per_s"] = round(len(docs) / best_of(lambda: per_doc([d.split() for d in docs])))
            r["words_presplit_docs_per_s"] = round(len(docs) / best_of(lambda: per_doc(split)))
            r["words_presplit_matrix_docs_per_s"] = round(len(docs) / best_of(
                lambda: rensa.RMinHash.digest_matrix_from_token_sets(split, num_perm=128, seed=42)))
            r["note"] = ("rensa hashes the tokens it is given; 5-gram shingles must be built in Python first. "
                         "Its signatures are not datasketch's.")
            out["rensa"] = r
    return out


def bench_embedders(texts: list[str], minilm_n: int) -> dict:
    out = {}
    sample = texts[:20000]
    secs = best_of(lambda: HashingEmbedder().embed(sample), repeat=2)
    out["hashing"] = {"texts_per_s": round(len(sample) / secs), "dim": 256,
                      "avg_words": round(float(np.mean([len(t.split()) for t in sample])), 1)}
    if minilm_n:
        emb = MiniLMEmbedder()
        emb.embed(texts[:8])
        sub = texts[:minilm_n]
        secs = best_of(lambda: emb.embed(sub), repeat=1)
        short = [" ".join(t.split()[:20]) for t in sub]
        short_secs = best_of(lambda: emb.embed(short), repeat=1)
        out["minilm"] = {"texts_per_s": round(len(sub) / secs, 1), "dim": 384, "texts": len(sub),
                         "avg_words": round(float(np.mean([len(t.split()) for t in sub])), 1),
                         "sentences_of_20_words_per_s": round(len(short) / short_secs, 1),
                         "torch_threads": __import__("torch").get_num_threads()}
    return out


def bench_near_copies(corpus: Corpus, indexes, table: ShingleTable, threshold: float = 0.8) -> dict:
    sources = sorted({c["original_id"] for c in corpus.copies if c["kind"] in ("exact", "near")})
    texts = [corpus.texts[corpus.pos[o]] for o in sources]
    sigs = minhash_signatures(texts)
    truth, ours, candidates = set(), set(), 0
    t = time.perf_counter()
    for qi, text in enumerate(texts):
        qpos = corpus.pos[sources[qi]]
        for d, j in table.jaccard_exhaustive(table.query_set(text)).items():
            if j >= threshold and d != qpos:
                truth.add((qi, d))
    truth_secs = time.perf_counter() - t
    t = time.perf_counter()
    qsets = [shingle_set(x) for x in texts]
    for s, idx in indexes.items():
        for qi, rows in enumerate(idx.minhash_candidates(sigs)):
            candidates += len(rows)
            for r in rows.tolist():
                d = corpus.pos[idx.record_ids[r]]
                if d != corpus.pos[sources[qi]] and exact_jaccard(qsets[qi], shingle_set(corpus.texts[d])) >= threshold:
                    ours.add((qi, d))
    ours_secs = time.perf_counter() - t
    hit = len(truth & ours)
    planted = [c for c in corpus.copies if c["kind"] in ("exact", "near") and c["jaccard"] >= threshold]
    lsh = next(iter(indexes.values())).bands.params
    return {"records": corpus.n, "queries": len(sources), "truth_pairs": len(truth),
            "planted_copies_at_or_above": len(planted), "found_pairs": len(ours),
            "recall": round(hit / max(1, len(truth)), 6), "precision": round(hit / max(1, len(ours)), 6),
            "threshold": threshold, "lsh": {"bands": lsh.bands, "rows": lsh.rows,
                                            "p_candidate_at_threshold": candidate_probability(threshold, lsh.bands, lsh.rows)},
            "candidates_per_query": round(candidates / max(1, len(sources)), 2),
            "seconds": {"ours": round(ours_secs, 2), "exhaustive_truth": round(truth_secs, 2)}}


def _paraphrase_scores(query_vecs, vectors, query_pos, related, para, thresholds):
    sims = query_vecs @ vectors.T
    sweep = {}
    for th in thresholds:
        found = tp = hit = total = 0
        for qi, qp in enumerate(query_pos):
            got = set(np.flatnonzero(sims[qi] >= th).tolist()) - {qp}
            found += len(got)
            tp += len(got & related[qp])
            hit += len(got & para[qp])
            total += len(para[qp])
        sweep[str(th)] = {"recall": round(hit / max(1, total), 4), "precision": round(tp / max(1, found), 4),
                          "found": found}
    return sweep


def bench_paraphrases(corpus: Corpus, vectors: np.ndarray, minilm_subset: int, seed: int,
                      minilm_queries: int = 200) -> dict:
    by_orig_para, by_orig_all = {}, {}
    for c in corpus.copies:
        o, p = corpus.pos[c["original_id"]], corpus.pos[c["id"]]
        by_orig_all.setdefault(o, set()).add(p)
        if c["kind"] == "paraphrase":
            by_orig_para.setdefault(o, set()).add(p)
    queries = sorted(by_orig_para)
    sweep_at = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    out = {"queries": len(queries), "planted_paraphrases": sum(len(v) for v in by_orig_para.values())}
    hashing = _paraphrase_scores(vectors[queries], vectors, queries, by_orig_all, by_orig_para, sweep_at)
    review = default_thresholds("hashing").cosine_review
    out["hashing"] = {"records": corpus.n, "cosine_review": review, **hashing[str(review)], "sweep": hashing}
    if minilm_subset:
        rng = np.random.default_rng(seed)
        queries = sorted(rng.choice(queries, min(len(queries), minilm_queries), replace=False).tolist())
        rel = set(queries) | {p for o in queries for p in by_orig_all[o]}
        others = rng.choice(corpus.n, min(corpus.n, minilm_subset), replace=False).tolist()
        subset = sorted(rel | set(others))
        where = {p: i for i, p in enumerate(subset)}
        log(f"paraphrases: MiniLM on {len(subset)} texts")
        vecs = MiniLMEmbedder().embed([corpus.texts[p] for p in subset])
        q_local = [where[q] for q in queries]
        rel_local = {where[o]: {where[p] for p in by_orig_all[o]} for o in queries}
        para_local = {where[o]: {where[p] for p in by_orig_para[o]} for o in queries}
        minilm = _paraphrase_scores(vecs[q_local], vecs, q_local, rel_local, para_local, sweep_at)
        review = default_thresholds("minilm").cosine_review
        for th, row in minilm.items():  # false finds grow with the number of unrelated records
            false = row["found"] * (1 - row["precision"])
            row["false_per_query_scaled_to_all_records"] = round(
                false / len(queries) * (corpus.n - len(rel)) / max(1, len(subset) - len(rel)), 1)
        out["minilm"] = {"records": len(subset), "queries": len(queries), "cosine_review": review,
                         **minilm.get(str(review), {}), "sweep": minilm,
                         "note": "subset: the queries, all their copies and random others; the MiniLM default "
                                 "reviews by neighbourhood margin (bench_paraphrase), the sweep is the absolute "
                                 "cut alone"}
        hashing_sub = _paraphrase_scores(vectors[subset][q_local], vectors[subset], q_local, rel_local, para_local,
                                         sweep_at)
        out["hashing_on_minilm_subset"] = {"cosine_review": default_thresholds("hashing").cosine_review,
                                           **hashing_sub[str(default_thresholds("hashing").cosine_review)]}
    return out


def bench_vector_recall(corpus: Corpus, indexes, vectors: np.ndarray, n_queries: int, seed: int) -> dict:
    """IVF range search against the exact answer (every vector), per nprobe, at the hashing review cosine."""
    rng = np.random.default_rng(seed)
    sources = sorted({corpus.pos[c["original_id"]] for c in corpus.copies})
    queries = rng.choice(sources, min(len(sources), n_queries), replace=False)
    threshold = default_thresholds("hashing").cosine_review
    qv = vectors[queries]
    exact = [set(np.flatnonzero(vectors @ q >= threshold).tolist()) for q in qv]
    kinds = {idx.vectors.kind for idx in indexes.values()}
    out = {"queries": len(queries), "threshold": threshold, "layout": sorted(kinds),
           "exact_results": sum(len(e) for e in exact), "by_nprobe": {}}
    for nprobe in ([2, 4, 8, 16, 32] if "ivf" in kinds else [None]):
        found = [set() for _ in queries]
        t = time.perf_counter()
        for idx in indexes.values():
            for qi, (rows, _) in enumerate(idx.vectors.range_search(qv, threshold, nprobe)):
                found[qi] |= {corpus.pos[idx.record_ids[r]] for r in np.searchsorted(idx.vector_ids, rows)}
        secs = time.perf_counter() - t
        hit = sum(len(f & e) for f, e in zip(found, exact))
        out["by_nprobe"][str(nprobe or "flat")] = {
            "recall": round(hit / max(1, out["exact_results"]), 5),
            "ms_per_query_all_shards": round(secs * 1000 / len(queries), 3)}
    out["default_nprobe"] = next(iter(indexes.values())).vectors.nprobe
    return out


def linear_scan_request(corpus: Corpus, table: ShingleTable, vectors: np.ndarray, email: str, emb,
                        thresholds) -> int:
    """The same walk as locate (seeds, then one hop from their texts) with no index: scan everything."""
    seeds = corpus.lookup("email", email)
    found = {corpus.pos[s.record_id] for s in seeds}
    texts = [corpus.texts[p] for p in sorted(found)]
    qv = emb.embed(texts)
    for qi, text in enumerate(texts):
        jac = table.jaccard_scan(table.query_set(text))
        cos = vectors @ qv[qi]
        found |= set(np.flatnonzero((jac >= thresholds.jaccard_review) | (cos >= thresholds.cosine_review)).tolist())
    return len(found)


def bench_latency(corpus: Corpus, indexes, table: ShingleTable | None, vectors: np.ndarray, n_requests: int,
                  n_scan: int, seed: int, nprobe: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    with_copies = [p for p in corpus.persons if p["copies"]]
    others = [p for p in corpus.persons if not p["copies"]]
    half = min(len(with_copies), n_requests // 2)
    chosen = [with_copies[i] for i in rng.choice(len(with_copies), half, replace=False)]
    chosen += [others[i] for i in rng.choice(len(others), n_requests - half, replace=False)]
    emb = HashingEmbedder()
    thresholds = default_thresholds("hashing")
    times, counts, queries = [], [], []
    for p in chosen[:3]:  # warm-up
        locate_matches(LocateRequest.parse([f"email={p['email']}"]), indexes, corpus.fetch, lookup=corpus.lookup,
                       embedder=emb, nprobe=nprobe)
    for p in chosen:
        t = time.perf_counter()
        res = locate_matches(LocateRequest.parse([f"email={p['email']}"]), indexes, corpus.fetch,
                             lookup=corpus.lookup, embedder=emb, thresholds=thresholds, nprobe=nprobe)
        times.append(time.perf_counter() - t)
        counts.append(len(res.matches))
        queries.append(len(res.queries))
    ms = np.array(times) * 1000
    out = {"records": corpus.n, "shards": corpus.shards, "requests": len(chosen),
           "requests_with_planted_copies": half, "p50_ms": round(float(np.percentile(ms, 50)), 2),
           "p95_ms": round(float(np.percentile(ms, 95)), 2), "max_ms": round(float(ms.max()), 2),
           "mean_queries_per_request": round(float(np.mean(queries)), 2),
           "mean_matches_per_request": round(float(np.mean(counts)), 2),
           "vector_index": next(iter(indexes.values())).vectors.kind,
           "nprobe": nprobe or next(iter(indexes.values())).vectors.nprobe, "embedder": "hashing"}
    if table is not None and n_scan:
        scan = []
        for p in chosen[:n_scan]:
            t = time.perf_counter()
            linear_scan_request(corpus, table, vectors, p["email"], emb, thresholds)
            scan.append(time.perf_counter() - t)
        scan_ms = np.array(scan) * 1000
        idx_ms = ms[:n_scan]
        out["linear_scan"] = {"requests": n_scan, "p50_ms": round(float(np.percentile(scan_ms, 50)), 1),
                              "p95_ms": round(float(np.percentile(scan_ms, 95)), 1),
                              "speedup_p50": round(float(np.percentile(scan_ms, 50) / np.percentile(idx_ms, 50)), 1),
                              "speedup_same_requests_mean": round(float(np.mean(scan_ms / idx_ms)), 1)}
    return out


def index_memory(indexes) -> dict:
    sig = sum(i.signatures.nbytes for i in indexes.values())
    bands = sum(i.bands.keys.nbytes + i.bands.rows.nbytes for i in indexes.values())
    vec = sum(i.vectors.ntotal * i.vectors.dim * 4 + i.vectors.ntotal * 8 for i in indexes.values())
    ids = sum(i.record_ids.nbytes + i.slices.nbytes + i.vector_ids.nbytes for i in indexes.values())
    mb = 1024 * 1024
    return {"signatures_mb": round(sig / mb, 1), "lsh_band_table_mb": round(bands / mb, 1),
            "faiss_vectors_and_ids_mb": round(vec / mb, 1), "record_table_mb": round(ids / mb, 1),
            "total_mb": round((sig + bands + vec + ids) / mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k records and small samples (~2 min)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF cells read per vector search (default: the index's)")
    ap.add_argument("--sizes", default=None, help="comma-separated record counts (default 100000,1000000)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--scan-requests", type=int, default=None, help="requests also run as a linear scan")
    ap.add_argument("--sig-docs", type=int, default=None, help="~200-word documents for the throughput figure")
    ap.add_argument("--minilm", type=int, default=None, help="texts for MiniLM throughput; 0 skips MiniLM")
    ap.add_argument("--minilm-subset", type=int, default=None, help="distractor texts in the MiniLM paraphrase test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-rensa", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="signatures,embedders,sizes,quality",
                    help="which figures to produce (comma-separated subset of the default)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    sizes = [int(s) for s in (args.sizes or ("20000" if args.quick else "100000,1000000")).split(",")]
    sig_docs = args.sig_docs or (3000 if args.quick else 20000)
    minilm_n = args.minilm if args.minilm is not None else (100 if args.quick else 500)
    minilm_subset = args.minilm_subset if args.minilm_subset is not None else (300 if args.quick else 1500)
    shards = 4 if args.quick and args.shards == 8 else args.shards

    import datasketch
    import faiss

    report: dict = {
        "benchmark": "locate", "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "datasketch": datasketch.__version__, "faiss": faiss.__version__,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "config": {"sizes": sizes, "shards": shards, "slices": SLICES, "requests": args.requests,
                   "workers": args.workers, "seed": args.seed, "minhash": MinHashParams().to_dict(),
                   "thresholds": {"hashing": default_thresholds("hashing").to_dict(),
                                  "minilm": default_thresholds("minilm").to_dict()}},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-locate-") as tmp:
        for n in sizes:
            log(f"[bold]{n:,} records[/bold]: generating the demo data")
            corpus = Corpus(n, args.seed, Path(tmp), shards)
            entry: dict = {"demo_generation_s": round(corpus.gen_seconds, 1), "planted_copies": len(corpus.copies)}
            first = n == sizes[0]
            if first and "signatures" in parts:
                report["signatures"] = bench_signatures(corpus.texts, sig_docs, args.workers, not args.no_rensa)
                log(f"signatures: {report['signatures']['ours_docs_per_s']}")
            if first and "embedders" in parts:
                report["embedders"] = bench_embedders(corpus.texts, minilm_n)
                log(f"embedders: {report['embedders']}")
            if "sizes" not in parts:
                break
            log("embedding all records (hashing)")
            t = time.perf_counter()
            vectors = embed_parallel(corpus.texts, args.workers)
            embed_s = time.perf_counter() - t
            log("building the shard indexes")
            rss_before = peak_rss_mb()
            indexes, build_s = build_indexes(corpus, vectors, args.workers)
            entry["build"] = {"embed_s": round(embed_s, 1), "signatures_lsh_faiss_s": round(build_s, 1),
                              "records_per_s": round(n / (embed_s + build_s))}
            entry["memory"] = {**index_memory(indexes), "peak_rss_mb": round(peak_rss_mb(), 1),
                               "peak_rss_before_indexes_mb": round(rss_before, 1)}
            log("saving and loading the indexes")
            t = time.perf_counter()
            for s, idx in indexes.items():
                idx.save(Path(tmp) / f"idx-{n}" / f"shard-{s}" / "v1.parquet")
            save_s = time.perf_counter() - t
            disk = sum(f.stat().st_size for f in (Path(tmp) / f"idx-{n}").rglob("*") if f.is_file())
            t = time.perf_counter()
            loaded = {s: ShardIndex.load(Path(tmp) / f"idx-{n}" / f"shard-{s}" / "v1.parquet", mmap=True)
                      for s in indexes}
            entry["files"] = {"disk_mb": round(disk / 2**20, 1), "save_s": round(save_s, 1),
                              "load_s": round(time.perf_counter() - t, 1)}
            del loaded
            shutil.rmtree(Path(tmp) / f"idx-{n}")
            log("vector index recall against the exact answer")
            entry["vector_recall"] = bench_vector_recall(corpus, indexes, vectors, 200, args.seed)
            log(f"vector recall: {entry['vector_recall']['by_nprobe']}")
            n_scan = args.scan_requests if args.scan_requests is not None else (20 if n <= 200_000 else 5)
            quality = first and "quality" in parts
            table = None
            if quality or n_scan:
                log("shingle table for the exhaustive truth and the linear scan")
                table = ShingleTable(corpus.texts)
            if quality:
                log("near-copy recall and precision")
                entry["near_copies"] = bench_near_copies(corpus, indexes, table)
                log(f"near copies: recall {entry['near_copies']['recall']} precision {entry['near_copies']['precision']}")
                entry["paraphrases"] = bench_paraphrases(corpus, vectors, minilm_subset if minilm_n else 0, args.seed)
            log("latency")
            entry["latency"] = bench_latency(corpus, indexes, table, vectors, args.requests, n_scan, args.seed,
                                             args.nprobe)
            log(f"latency: p50 {entry['latency']['p50_ms']} ms, p95 {entry['latency']['p95_ms']} ms")
            report["sizes"][str(n)] = entry
            del corpus, indexes, table, vectors
            gc.collect()
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
