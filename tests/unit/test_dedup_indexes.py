"""FAISS vector index, shard index files, index maintenance and tombstones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dedup.embeddings import EMBEDDER_NAMES, embedder_from_spec, embedder_spec, get_embedder
from dedup.hashing_embedder import HashingEmbedder
from dedup.locate import embedder_for
from dedup.minhash import MinHashKeyMismatch, MinHashParams, estimate_jaccard, minhash_signatures
from dedup.shard_index import ShardIndex, artefact_dir, build_shard_index, texts_from_parquet
from dedup.tombstones import TombstoneSet, UnkeyedTombstones
from dedup.vector_index import VectorIndex, VectorIndexParams


KEY = b"unit-test-minhash-key-0123456789"
KEYED = MinHashParams.keyed(KEY)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_range_search_finds_everything_above_the_threshold_and_removal_works(kind, tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng, 4000, 32)
    ids = np.arange(4000, dtype=np.int64) * 10 + 3
    index = VectorIndex.build(x, ids, VectorIndexParams(kind=kind, nlist=32, nprobe=32))
    assert index.kind == kind and index.ntotal == 4000
    queries = x[:20]
    exact = queries @ x.T
    for q, (got_ids, sims) in enumerate(index.range_search(queries, 0.5)):
        expected = set(ids[exact[q] >= 0.5].tolist())
        assert set(got_ids.tolist()) == expected  # nprobe = nlist: IVF is exact here
        assert np.all(sims >= 0.5) and np.all(np.diff(sims) <= 0)
    smaller = index.without(ids[:5])
    assert smaller.ntotal == 3995 and index.ntotal == 4000  # the original is unchanged
    assert ids[0] not in smaller.range_search(queries[:1], 0.99)[0][0]
    smaller.save(tmp_path / "v.faiss")
    loaded = VectorIndex.load(tmp_path / "v.faiss", kind, smaller.nprobe)
    assert loaded.ntotal == 3995
    assert np.allclose(loaded.reconstruct(ids[5:7]), x[5:7])
    assert not list(tmp_path.glob("*.tmp"))


def test_vector_index_rejects_bad_input():
    with pytest.raises(ValueError, match="kind"):
        VectorIndexParams(kind="hnsw")
    with pytest.raises(ValueError, match="ids"):
        VectorIndex.build(np.zeros((3, 4), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="unique"):
        VectorIndex.build(np.zeros((2, 4), np.float32), np.array([1, 1]))


def test_embedder_registry_and_specs():
    assert set(EMBEDDER_NAMES) >= {"hashing", "minilm"}
    emb = get_embedder("hashing", dim=64)
    assert embedder_spec(emb) == {"name": "hashing", "dim": 64, "seed": 0}
    assert embedder_spec(embedder_from_spec(embedder_spec(emb))) == embedder_spec(emb)
    v = emb.embed(["the cat sat on the mat", ""])
    assert v.shape == (2, 64) and v.dtype == np.float32
    assert np.isclose(np.linalg.norm(v[0]), 1.0) and not v[1].any()
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("word2vec")


def _corpus():
    base = [f"post {i} " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(40)) for i in range(60)]
    return [f"r{i:03d}" for i in range(60)], base


def test_shard_index_round_trip_and_removal(tmp_path):
    ids, texts = _corpus()
    emb = HashingEmbedder(dim=64)
    index = build_shard_index(2, 1, ids, texts, [i % 3 for i in range(60)], embedder=emb)
    path = tmp_path / "shard-2" / "v0001.parquet"
    where = index.save(path)
    assert where == artefact_dir(path) and (where / "manifest.json").is_file()
    assert not [p for p in where.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileExistsError, match="immutable"):
        index.save(path)
    loaded = ShardIndex.load(path, mmap=True)
    assert loaded.record_ids.tolist() == ids and loaded.embedder == embedder_spec(emb)
    assert embedder_spec(embedder_for({2: loaded})) == embedder_spec(emb)
    assert np.array_equal(loaded.signatures, index.signatures)
    q = minhash_signatures([texts[7]])
    assert 7 in loaded.minhash_candidates(q)[0].tolist()
    rows, sims = loaded.embedding_neighbours(emb.embed([texts[7]]), 0.99, emb)[0]
    assert rows.tolist()[0] == 7 and sims[0] > 0.999

    nxt, removed = loaded.without(["r007", "r010"], new_version=2)
    assert removed.record_ids == ("r007", "r010") and removed.signatures.shape == (2, 128)
    assert nxt.n == 58 and "r007" not in nxt.record_ids.tolist() and nxt.row("r011") == 9
    assert all(nxt.record_ids[r] != "r007" for r in nxt.minhash_candidates(q)[0])
    rows, _ = nxt.embedding_neighbours(emb.embed([texts[7]]), 0.99, emb)[0]
    assert rows.size == 0
    rows, _ = nxt.embedding_neighbours(emb.embed([texts[11]]), 0.99, emb)[0]
    assert nxt.record_ids[rows[0]] == "r011"  # FAISS ids survive the renumbering of rows
    nxt.save(tmp_path / "shard-2" / "v0002.parquet")
    again = ShardIndex.load(tmp_path / "shard-2" / "v0002.parquet")
    assert again.version == 2 and again.n == 58 and again.vectors.ntotal == 58
    with pytest.raises(ValueError, match="not in shard"):
        again.without(["r007"], new_version=3)
    with pytest.raises(ValueError, match="embedder"):
        again.embedding_neighbours(HashingEmbedder(dim=32).embed(["x"]), 0.5, HashingEmbedder(dim=32))


def test_damaged_or_missing_index_files_say_rebuild(tmp_path):
    ids, texts = _corpus()
    path = tmp_path / "v1.parquet"
    build_shard_index(0, 1, ids, texts, [0] * 60).save(path)
    with open(artefact_dir(path) / "signatures.npy", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="rebuild"):
        ShardIndex.load(path)
    with pytest.raises(FileNotFoundError, match="build_shard_index"):
        ShardIndex.load(tmp_path / "v2.parquet")
    with pytest.raises(ValueError, match="unique"):
        build_shard_index(0, 1, ["a", "a"], ["x", "y"], [0, 0])


def test_texts_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"record_id": ["a", "b"], "slice": pa.array([0, 1], pa.int32()), "text": ["x", "y"]}),
                   tmp_path / "s.parquet")
    fetch = texts_from_parquet({0: tmp_path / "s.parquet"})
    assert fetch(0, ["b", "a"]) == ["y", "x"]


def test_texts_from_parquet_reads_the_groups_a_shard_index_points_at_and_falls_back_when_it_is_wrong(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"r{i:04d}" for i in range(1000)]
    with pq.ParquetWriter(tmp_path / "s.parquet", pa.schema([("record_id", pa.string()), ("text", pa.string())])) as w:
        w.write_table(pa.table({"record_id": ids, "text": [f"text of {r}" for r in ids]}), row_group_size=100)
    paths = {0: tmp_path / "s.parquet"}
    asked = ["r0999", "r0005", "r0512"]
    expected = [f"text of {r}" for r in asked]
    row = {r: i for i, r in enumerate(ids)}
    assert texts_from_parquet(paths, row_of=lambda s, r: row[r])(0, asked) == expected
    # an index that places rows wrongly (a stale one), or does not know a record: the whole file is read
    assert texts_from_parquet(paths, row_of=lambda s, r: (row[r] + 300) % 1000)(0, asked) == expected
    assert texts_from_parquet(paths, row_of=lambda s, r: None)(0, asked) == expected
    fetch = texts_from_parquet(paths, row_of=lambda s, r: row.get(r))
    assert fetch(0, ["r0001"]) == ["text of r0001"] and fetch(0, ["r0002", "r0001"]) == ["text of r0002", "text of r0001"]
    with pytest.raises(KeyError):
        fetch(0, ["nobody"])
    with pytest.raises(KeyError, match="no shard file"):
        fetch(1, ["r0001"])


def test_tombstones_screen_erased_content_without_keeping_text(tmp_path):
    ids, texts = _corpus()
    index = build_shard_index(0, 1, ids, texts, [0] * 60, minhash=KEYED)
    _, removed = index.without(["r003", "r004"], new_version=2)
    stones = TombstoneSet.empty(KEYED).added(removed.signatures, ["req-1", "req-1"], removed.minhash)
    assert len(stones) == 2
    reworded = texts[3].replace("w", "w", 1).upper() + " thanks"
    hits = stones.screen([texts[3], reworded, texts[20], "nothing like it"])
    assert {h.text_index for h in hits} == {0, 1}
    assert all(h.key == "req-1" and h.estimated_jaccard >= 0.7 for h in hits)
    (tmp_path / "tombstones.npz").write_bytes(stones.to_bytes())
    again = TombstoneSet.load(tmp_path / "tombstones.npz", KEYED)
    assert again.keys == stones.keys and np.array_equal(again.signatures, stones.signatures)
    assert [h.to_dict() for h in again.screen([texts[4]])] == [
        {"text_index": 0, "key": "req-1", "estimated_jaccard": 1.0}]
    raw = (tmp_path / "tombstones.npz").read_bytes()
    assert texts[3][:16].encode() not in raw and texts[4][-16:].encode() not in raw  # signatures only
    assert KEY.hex().encode() not in raw and KEY not in raw  # the key's fingerprint only
    assert TombstoneSet.empty(KEYED).screen(["anything"]) == []
    with pytest.raises(ValueError, match="keys"):
        stones.added(removed.signatures, ["only-one"], removed.minhash)


def test_tombstones_are_kept_only_under_a_key(tmp_path):
    """Unkeyed signatures would confirm a guessed text to anyone holding the file: refused, and an
    old unkeyed file (format 1) is a clear error, never read as if it were keyed."""
    ids, texts = _corpus()
    with pytest.raises(ValueError, match="keyed MinHash parameters"):
        TombstoneSet.empty(MinHashParams())
    unkeyed = minhash_signatures(texts[:3], MinHashParams())
    np.savez(tmp_path / "old.npz", signatures=unkeyed, keys=np.array(["a", "b", "c"]),
             meta=np.array(json.dumps({"format": 1, "minhash": MinHashParams().to_dict()})))
    with pytest.raises(UnkeyedTombstones, match="3 unkeyed tombstones") as caught:
        TombstoneSet.load(tmp_path / "old.npz", KEYED)
    assert caught.value.count == 3
    # a file written under another key is refused too (its signatures are not comparable)
    other = MinHashParams.keyed(b"another-key-of-32-bytes-01234567")
    (tmp_path / "other.npz").write_bytes(
        TombstoneSet.empty(other).added(minhash_signatures(texts[:2], other), ["x", "y"], other).to_bytes())
    with pytest.raises(MinHashKeyMismatch, match="restore the original secret key"):
        TombstoneSet.load(tmp_path / "other.npz", KEYED)
    # and a screen under the key finds a guessed erased text; the file alone (no key) cannot
    stones = TombstoneSet.load(tmp_path / "other.npz", other)
    assert {h.text_index for h in stones.screen([texts[0], texts[1]])} == {0, 1}
    unkeyed_guess = minhash_signatures([texts[0]], MinHashParams())[0]
    assert estimate_jaccard(unkeyed_guess, stones.signatures).max() < 0.05


def test_a_keyed_index_loads_only_under_its_parameters(tmp_path):
    ids, texts = _corpus()
    path = tmp_path / "v1.parquet"
    build_shard_index(0, 1, ids, texts, [0] * 60, minhash=KEYED).save(path)
    plain = ShardIndex.load(path)
    assert plain.minhash == KEYED and plain.minhash.key is None
    with pytest.raises(ValueError, match="hold no key"):
        minhash_signatures(["a query"], plain.minhash)
    assert ShardIndex.load(path, minhash=KEYED).minhash.key == KEY
    with pytest.raises(MinHashKeyMismatch, match="rebuild the index"):
        ShardIndex.load(path, minhash=MinHashParams())
