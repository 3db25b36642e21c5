"""The demo dataset generator: determinism, planted copies, ground truth, scale."""

from __future__ import annotations

import json
import math
import random
import re
import time
import unicodedata
from collections import Counter

import pytest

from shards.demo_data import (
    LABELS,
    DemoFiles,
    _jaccard,
    _normalize_text,
    _shingles,
    generate_demo,
    read_ground_truth,
    write_demo,
)


@pytest.fixture(scope="module")
def demo():
    return generate_demo(4000, seed=7)


@pytest.fixture(scope="module")
def by_id(demo):
    return {r["id"]: r for r in demo.records}


@pytest.fixture(scope="module")
def persons(demo):
    return {p["person"]: p for p in demo.persons}


def test_normalisation_and_shingles():
    assert _normalize_text("Ｈｅｌｌｏ,  WORLD!! foo_bar — Straße") == "hello world foo bar strasse"
    assert _shingles("a b c") == {"a b c"}
    assert _shingles("") == set()
    assert _shingles("One two, three four five six!") == {"one two three four five", "two three four five six"}
    assert _jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_fast_normalisation_matches_the_definition(demo):
    def reference(text):  # NFKC, casefold, each run of [\W_] -> one space, strip
        return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()

    samples = [r["text"] for r in demo.records[:300]] + ["A_b--c  d!", " x\ty_ ", "Ünïcode—dash Ⅻ", "", "__"]
    for text in samples:
        assert _normalize_text(text) == reference(text)


def test_same_inputs_give_same_bytes(tmp_path):
    a = write_demo(tmp_path / "a", 1500, seed=3)
    b = write_demo(tmp_path / "b", 1500, seed=3)
    c = write_demo(tmp_path / "c", 1500, seed=4)
    assert isinstance(a, DemoFiles) and a.n_records == 1500
    assert a.records.read_bytes() == b.records.read_bytes()
    assert a.ground_truth.read_bytes() == b.ground_truth.read_bytes()
    assert a.records.read_bytes() != c.records.read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_files_match_memory_and_parse(tmp_path, demo):
    files = write_demo(tmp_path, 4000, seed=7)
    lines = files.records.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == demo.records
    truth = read_ground_truth(files.ground_truth)
    assert truth["meta"] == demo.meta
    assert truth["persons"] == demo.persons
    assert truth["copies"] == demo.copies
    assert files.n_persons == len(demo.persons) and files.n_copies == len(demo.copies)


def test_records_are_well_formed(demo):
    ids = [r["id"] for r in demo.records]
    assert len(ids) == len(set(ids)) == 4000
    assert all(re.fullmatch(r"r\d{7}", i) for i in ids)
    for r in demo.records:
        assert set(r) == {"id", "text", "label", "email", "user_id", "name"}
        assert isinstance(r["label"], int) and 0 <= r["label"] < len(LABELS)
        assert "\n" not in r["text"] and "\r" not in r["text"]  # also loadable as CSV
        assert 25 <= len(r["text"].split()) <= 240
    words = [len(r["text"].split()) for r in demo.records]
    assert 60 <= sum(words) / len(words) <= 130


def test_originals_carry_their_identifiers(demo, persons):
    originals = [r for r in demo.records if r["email"] is not None]
    assert all(r["user_id"] and r["name"] for r in originals)
    assert all(e.rsplit("@", 1)[1] in {"example.com", "example.org", "example.net"} for e in
               (r["email"] for r in originals))
    emails = {p["email"] for p in demo.persons}
    assert len(emails) == len(demo.persons) == len({p["user_id"] for p in demo.persons})
    mentioned = sum(any(x in r["text"] for x in (r["name"], r["email"], r["user_id"])) for r in originals)
    assert 0.6 < mentioned / len(originals) < 0.95  # usually, not always


def test_ground_truth_accounts_for_every_record(demo, by_id, persons):
    seen = []
    for p in demo.persons:
        for rid in p["originals"]:
            assert by_id[rid]["email"] == p["email"] and by_id[rid]["name"] == p["name"]
        seen += p["originals"] + p["copies"]
    assert sorted(seen) == sorted(by_id)
    copy_ids = {c["id"] for c in demo.copies}
    assert copy_ids == {rid for p in demo.persons for rid in p["copies"]}
    for c in demo.copies:
        assert c["id"] in persons[c["person"]]["copies"]
        assert c["original_id"] in persons[c["person"]]["originals"]
        assert by_id[c["id"]]["label"] == by_id[c["original_id"]]["label"] == c["label"]


def test_copies_carry_no_identifiers(demo, by_id, persons):
    assert demo.copies
    for c in demo.copies:
        row, person = by_id[c["id"]], persons[c["person"]]
        assert row["email"] is None and row["user_id"] is None and row["name"] is None
        text = row["text"].casefold()
        for ident in (person["email"], person["name"], person["user_id"], person["name"].split()[-1]):
            assert ident.casefold() not in text, (c, ident)


def test_recorded_jaccards_match_recomputation(demo, by_id):
    for c in demo.copies:
        measured = _jaccard(_shingles(by_id[c["original_id"]]["text"]), _shingles(by_id[c["id"]]["text"]))
        assert c["jaccard"] == measured


def test_exact_copies_are_the_original_body(demo, by_id):
    exact = [c for c in demo.copies if c["kind"] == "exact"]
    assert exact
    for c in exact:
        original, copy = by_id[c["original_id"]]["text"], by_id[c["id"]]["text"]
        assert copy in original and not copy[0].islower()
        assert len(copy.split()) >= len(original.split()) - 20  # only the greeting and signature dropped


def test_near_copies_span_the_thresholds(demo, by_id):
    near = [c for c in demo.copies if c["kind"] == "near"]
    assert len(near) >= 20
    values = [c["jaccard"] for c in near]
    assert sum(v >= 0.8 for v in values) >= len(values) / 3
    assert sum(0.4 <= v < 0.8 for v in values) >= len(values) / 8
    for c in near:
        assert by_id[c["id"]]["text"] not in by_id[c["original_id"]]["text"]


def test_paraphrases_keep_the_facts_but_not_the_words(demo, by_id):
    paraphrases = [c for c in demo.copies if c["kind"] == "paraphrase"]
    assert paraphrases
    for c in paraphrases:
        assert c["jaccard"] < 0.3
        numbers = lambda t: set(re.findall(r"\d+", t))  # noqa: E731
        assert numbers(by_id[c["id"]]["text"]) <= numbers(by_id[c["original_id"]]["text"])


def test_kinds_and_rates_scale(demo):
    assert set(demo.meta["kinds"]) == {"exact", "near", "paraphrase"}
    assert all(v > 0 for v in demo.meta["kinds"].values())
    small = generate_demo(1000, seed=1).meta
    for meta in (small, demo.meta):
        assert meta["n_copies"] == round(0.03 * meta["n_records"])
        assert meta["n_subjects"] == max(1, round(0.01 * meta["n_persons"]))
    assert generate_demo(1, seed=0).records[0]["email"] is not None
    assert generate_demo(200, seed=0, copy_rate=0).copies == []


def test_labels_are_balanced_and_learnable(demo):
    counts = Counter(r["label"] for r in demo.records)
    assert len(counts) == len(LABELS) and min(counts.values()) > 0.05 * len(demo.records)
    train, test = demo.records[:3000], demo.records[3000:]
    words = [Counter() for _ in LABELS]
    for r in train:
        words[r["label"]].update(_normalize_text(r["text"]).split())
    totals = [sum(w.values()) for w in words]

    def predict(text):
        tokens = _normalize_text(text).split()
        return max(range(len(LABELS)),
                   key=lambda k: sum(math.log((words[k][t] + 1) / (totals[k] + 10_000)) for t in tokens))

    accuracy = sum(predict(r["text"]) == r["label"] for r in test) / len(test)
    assert accuracy > 0.8 > max(counts.values()) / len(demo.records)


def test_unrelated_records_share_few_shingles(demo):
    originals = [r for r in demo.records if r["email"] is not None]
    rng = random.Random(0)
    values = []
    for _ in range(400):
        a, b = rng.sample(originals, 2)
        values.append(_jaccard(_shingles(a["text"]), _shingles(b["text"])))
    assert sum(values) / len(values) < 0.05 and max(values) < 0.4


def test_bad_parameters_are_refused():
    for kwargs in ({"n_records": 0}, {"n_records": 10, "seed": -1}, {"n_records": 10, "copy_rate": 0.9}):
        with pytest.raises(ValueError, match="need n_records"):
            generate_demo(**kwargs)


def test_scale_20k_is_fast_and_independent_of_workers(tmp_path):
    start = time.perf_counter()
    two = write_demo(tmp_path / "two", 20_000, seed=11, workers=2)
    elapsed = time.perf_counter() - start
    one = write_demo(tmp_path / "one", 20_000, seed=11, workers=1)
    assert two.records.read_bytes() == one.records.read_bytes()
    assert two.ground_truth.read_bytes() == one.ground_truth.read_bytes()
    assert two.n_copies == 600
    assert elapsed < 30, f"20k records took {elapsed:.1f}s"
