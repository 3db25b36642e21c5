"""Extraction benchmark: does the generative ensemble still reproduce a subject's posts after erasure?

Data: ``shards.demo_data.generate_demo`` with planted copies (exact bodies, near-copies,
paraphrases) of some persons' posts under other ids and without identifiers. The *subjects*
are the persons with planted copies; each asks for erasure. A held-out set of other
persons' originals is never trained on: the matched control (same templates, same kind of
text, never seen), also used for held-out perplexity.

One ``lm`` ensemble (``shards.lm``: S byte-level GRU sub-models, R slices, records placed as
``erasure ingest`` places them: a subject's records in one shard) is trained, then:

* ``before``: the pre-erasure ensemble;
* ``naive``: exact SISA retraining without the subjects' identifier-matched records only
  (what a pipeline that matches identifiers does): their copies stay in training;
* ``ours``: exact retraining without those records *and* the copies found by MinHash near-copy
  search (verified Jaccard >= the erase threshold, 0.8) from them, and second-hop copies of
  those (``dedup.near_copies.near_copies_within``), as ``erasure request process`` locates;
* ``gradient_ascent``: approximate unlearning as many tools do it: from the pre-erasure
  members, ascend the next-byte loss of the same records ``ours`` erased, no retraining;
* ``control``: the held-out records on the pre-erasure ensemble.

The probe (``shards.extraction``) prompts every subject record (originals and every planted
copy, from the ground truth) with its first k words, decodes m words greedily from the
mixture of the members' next-byte distributions, and counts a record extracted when the
longest common word span with the true continuation reaches ``--span``. Rates come with
Wilson 95% intervals; utility is the mixture's per-byte perplexity on the held-out set.

Prints one JSON document (progress on stderr). Run:
``python benchmarks/bench_extraction.py [--records N] [--epochs E] ...`` (defaults fit well
under 15 minutes on 2 shared CPU cores); ``--device cuda`` for the larger run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedup.minhash import MinHashParams  # noqa: E402
from dedup.near_copies import near_copies_within  # noqa: E402
from shards.checkpoints import CheckpointStore  # noqa: E402
from shards.demo_data import generate_demo  # noqa: E402
from shards.device import deterministic_mode, resolve_runtime  # noqa: E402
from shards.extraction import ProbeReport, ProbeSettings, ensemble_generator, probe_records  # noqa: E402
from shards.generation import EnsembleLM  # noqa: E402
from shards.lm import PAD, VOCAB_SIZE, encode_texts, lm_spec  # noqa: E402
from shards.retrain import retrain_from_slice  # noqa: E402
from shards.training import ShardData, SliceSchedule, TrainConfig, load_submodel, train_shard  # noqa: E402

ERASE_JACCARD = 0.8  # dedup.policy.Thresholds.jaccard_erase: a verified near-copy at this Jaccard is erased


def log(message: str, began: float) -> None:
    print(f"[{time.perf_counter() - began:7.1f}s] {message}", file=sys.stderr, flush=True)


def split_data(args: argparse.Namespace) -> dict[str, Any]:
    """Training records, the subjects' records (originals, copies), and the held-out control set."""
    demo = generate_demo(args.records, args.seed, copy_rate=args.copy_rate, subject_rate=args.subject_rate)
    by_id = {r["id"]: r for r in demo.records}
    person_of: dict[str, int] = {}
    subjects = []
    for person in demo.persons:
        for rid in person["originals"]:
            person_of[rid] = person["person"]
        if person["copies"]:
            subjects.append(person)
    copy_kind = {c["id"]: c["kind"] for c in demo.copies}
    for c in demo.copies:
        person_of[c["id"]] = c["person"]
    subject_ids = {s["person"] for s in subjects}
    originals = sorted(rid for s in subjects for rid in s["originals"])
    copies = sorted(c["id"] for c in demo.copies if c["person"] in subject_ids)
    rng = np.random.default_rng(args.seed)
    others = sorted(rid for rid, p in person_of.items() if p not in subject_ids and rid not in copy_kind)
    control = sorted(rng.choice(others, size=min(args.control, len(others) // 3), replace=False).tolist())
    held = set(control)
    train = [r for r in demo.records if r["id"] not in held]
    return {"by_id": by_id, "person_of": person_of, "subjects": subjects, "originals": originals,
            "copies": copies, "copy_kind": copy_kind, "control": control, "train": train}


def place(train: list[dict], person_of: dict[str, int], subject_originals: set[str], copies: set[str],
          num_shards: int, num_slices: int, seed: int) -> dict[str, ShardData]:
    """A person's records (and the planted copies of them) in one shard; a subject's records in the last slice,
    the others spread over the slices by a seeded draw (as subject placement does at ingest)."""
    rng = np.random.default_rng(seed + 1)
    members: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for record in train:
        rid = record["id"]
        person = person_of.get(rid, -1)
        shard = (person * 7919 + seed) % num_shards if person >= 0 else int(rng.integers(num_shards))
        late = rid in subject_originals or rid in copies
        slice_index = num_slices - 1 if late else int(rng.integers(num_slices))
        members[shard].append((slice_index, rid, record["text"]))
    out = {}
    for shard, rows in sorted(members.items()):
        rows.sort(key=lambda row: row[0])
        n = len(rows)
        out[str(shard)] = ShardData(str(shard), [r[1] for r in rows], np.array([r[0] for r in rows], np.int32),
                                    np.zeros((n, 1), np.float32), np.zeros(n, np.int64), texts=[r[2] for r in rows])
    return out


def locate_copies(train: list[dict], seeds: list[str], hops: int) -> dict[str, Any]:
    """Copies of the seed records among the training records: verified MinHash near-copies, ``hops`` deep."""
    ids = [r["id"] for r in train]
    texts = [r["text"] for r in train]
    row_of = {rid: i for i, rid in enumerate(ids)}
    minhash = MinHashParams()
    found: set[str] = set(seeds)
    frontier = [row_of[s] for s in seeds if s in row_of]
    per_hop = []
    for _ in range(hops):
        pairs = near_copies_within(ids, texts, frontier, minhash, ERASE_JACCARD)
        new = {p.original_id for p in pairs} - found
        per_hop.append(len(new))
        found |= new
        frontier = [row_of[r] for r in sorted(new)]
        if not frontier:
            break
    return {"ids": found - set(seeds), "per_hop": per_hop}


def train_all(shards: dict[str, ShardData], config: TrainConfig, store: CheckpointStore, device: str | None,
              began: float) -> dict[str, Any]:
    finals, seconds = {}, 0.0
    for sid, shard in shards.items():
        result = train_shard(shard, config, store, device=device, threads=1)
        finals[sid] = result.final
        seconds += result.cost.wall_seconds
        log(f"trained shard {sid} ({shard.num_records} records, {result.cost.wall_seconds:.1f}s)", began)
    return {"finals": finals, "seconds": seconds}


def retrain_without(shards: dict[str, ShardData], finals: dict, removed: set[str], config: TrainConfig,
                    store: CheckpointStore, device: str | None) -> dict[str, Any]:
    """Exact SISA retraining of every shard that held a removed record; untouched members are kept."""
    out, seconds, retrained = dict(finals), 0.0, []
    for sid, shard in shards.items():
        hit = removed & set(shard.record_ids)
        if not hit:
            continue
        result = retrain_from_slice(shard, hit, config, store, device=device, threads=1)
        out[sid] = result.final
        seconds += result.cost.wall_seconds
        retrained.append({"shard": sid, "removed": len(hit), "slices": list(result.cost.slices_trained)})
    return {"finals": out, "seconds": seconds, "retrained": retrained}


def ensemble(store: CheckpointStore, finals: dict, device: str) -> EnsembleLM:
    return EnsembleLM.from_checkpoints(store, [finals[s] for s in sorted(finals) if finals[s] is not None],
                                       device=device)


def gradient_ascent(store: CheckpointStore, finals: dict, shards: dict[str, ShardData], forget: set[str],
                    steps: int, lr: float, device: str) -> tuple[EnsembleLM, float]:
    """Approximate unlearning: for each member that saw forgotten records, ``steps`` Adam steps *up* the mean
    next-byte loss of those records (the whole forget batch each step), from the pre-erasure weights."""
    began = time.perf_counter()
    models = []
    block = None
    for sid in sorted(finals):
        model, config = load_submodel(store, finals[sid], device)
        block = config.model.input_dim
        texts = [t for rid, t in zip(shards[sid].record_ids, shards[sid].texts) if rid in forget]
        if texts:
            tokens = encode_texts(texts, block).to(device)
            tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())]
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(steps):
                logits, _ = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1), ignore_index=PAD)
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()
                optimizer.step()
            model.eval()
        models.append(model)
    assert block is not None
    return EnsembleLM(models, block), time.perf_counter() - began


def rates(report: ProbeReport) -> dict[str, Any]:
    return report.to_dict()


def by_kind(report: ProbeReport, kind_of: dict[str, str]) -> dict[str, Any]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for probe in report.records:
        groups[kind_of.get(probe.record_id, "original")].append(probe.extracted)
    return {kind: {"extracted": sum(v), "n": len(v)} for kind, v in sorted(groups.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--copy-rate", type=float, default=0.15)
    parser.add_argument("--subject-rate", type=float, default=0.25)
    parser.add_argument("--control", type=int, default=40, help="held-out records (control and perplexity)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=80.0, help="epochs' worth of samples per sub-model")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--block", type=int, default=96, help="bytes of each record the lm reads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prompt-words", type=int, default=6)
    parser.add_argument("--continuation-words", type=int, default=6)
    parser.add_argument("--span", type=int, default=4)
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--ga-steps", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--ga-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(args.seed)

    data = split_data(args)
    originals, copies = set(data["originals"]), set(data["copies"])
    train_ids = {r["id"] for r in data["train"]}
    shards = place(data["train"], data["person_of"], originals, copies, args.shards, args.slices, args.seed)
    located = locate_copies(data["train"], sorted(originals & train_ids), args.hops)
    log(f"{len(data['train'])} training records in {len(shards)} shards; {len(data['subjects'])} subjects, "
        f"{len(originals)} originals, {len(copies)} planted copies, {len(located['ids'])} located", began)

    spec = lm_spec(block_size=args.block, width=args.width, layers=args.layers, embed=32)
    config = TrainConfig(model=spec, schedule=SliceSchedule.named("paper", args.slices, args.epochs),
                         batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    settings = ProbeSettings(args.prompt_words, args.continuation_words, args.span)
    probed = [(rid, data["by_id"][rid]["text"]) for rid in sorted(originals | copies)]
    control = [(rid, data["by_id"][rid]["text"]) for rid in data["control"]]
    held_out = [t for _, t in control]
    kind_of = data["copy_kind"]

    with tempfile.TemporaryDirectory() as tmp, deterministic_mode(resolve_runtime(args.device, 1)):
        store = CheckpointStore(Path(tmp))
        trained = train_all(shards, config, store, args.device, began)
        results: dict[str, Any] = {}

        def measure(name: str, ens: EnsembleLM, extra: dict | None = None) -> None:
            report = probe_records(ensemble_generator(ens), probed, settings)
            results[name] = {"subject_records": rates(report), "by_kind": by_kind(report, kind_of),
                             "held_out_perplexity": ens.perplexity(held_out), **(extra or {})}
            log(f"{name}: extraction {report.extraction.hits}/{report.extraction.n}", began)

        before = ensemble(store, trained["finals"], args.device)
        measure("before", before, {"train_seconds": trained["seconds"]})
        control_report = probe_records(ensemble_generator(before), control, settings)
        results["control"] = {"records": rates(control_report)}

        naive = retrain_without(shards, trained["finals"], originals & train_ids, config, store, args.device)
        measure("naive_identifier_only", ensemble(store, naive["finals"], args.device),
                {"removed": len(originals & train_ids), "retrain_seconds": naive["seconds"],
                 "retrained": naive["retrained"]})
        ours_removed = (originals & train_ids) | located["ids"]
        ours = retrain_without(shards, trained["finals"], ours_removed, config, store, args.device)
        ours_ensemble = ensemble(store, ours["finals"], args.device)
        measure("ours_near_copies_two_hops", ours_ensemble,
                {"removed": len(ours_removed), "retrain_seconds": ours["seconds"], "retrained": ours["retrained"]})
        results["control_after_ours"] = {"records": rates(probe_records(ensemble_generator(ours_ensemble),
                                                                        control, settings))}
        for steps in args.ga_steps:
            ga, seconds = gradient_ascent(store, trained["finals"], shards, ours_removed, steps, args.ga_lr,
                                          args.device)
            measure(f"gradient_ascent_{steps}_steps", ga, {"steps": steps, "lr": args.ga_lr, "seconds": seconds,
                                                          "forget_set": len(ours_removed)})

    planted_found = len(located["ids"] & copies)
    before_rate = results["before"]["subject_records"]["extraction"]["rate"]
    doc = {
        "benchmark": "extraction",
        "config": {**vars(args), "model": spec.to_dict(), "probe": settings.to_dict(),
                   "erase_jaccard": ERASE_JACCARD},
        "data": {"training_records": len(data["train"]), "shards": len(shards), "subjects": len(data["subjects"]),
                 "subject_originals": len(originals), "planted_copies": len(copies),
                 "planted_by_kind": {k: sum(kind_of[c] == k for c in copies) for k in ("exact", "near", "paraphrase")},
                 "located_copies": len(located["ids"]), "located_planted": planted_found,
                 "located_per_hop": located["per_hop"], "control_records": len(control)},
        "results": results,
        "ratios": {
            "naive_over_ours_extraction": _ratio(results["naive_identifier_only"],
                                                 results["ours_near_copies_two_hops"]),
            "before_over_control_extraction": (before_rate / results["control"]["records"]["extraction"]["rate"]
                                               if results["control"]["records"]["extraction"]["rate"] else None),
            "gradient_ascent_perplexity_over_exact": {
                k: v["held_out_perplexity"] / results["ours_near_copies_two_hops"]["held_out_perplexity"]
                for k, v in results.items() if k.startswith("gradient_ascent")},
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
                        "machine": platform.machine(), "wall_seconds": time.perf_counter() - began,
                        "cpu_seconds": time.process_time(), "load_average": list(os.getloadavg())},
    }
    print(json.dumps(doc, indent=2))
    return 0


def _ratio(a: dict, b: dict) -> float | None:
    x, y = a["subject_records"]["extraction"]["rate"], b["subject_records"]["extraction"]["rate"]
    return x / y if y else None


if __name__ == "__main__":
    raise SystemExit(main())
