"""The int8 ONNX MiniLM: exported offline from the packaged model, cached, and keeping float32's neighbours."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dedup.embeddings import MiniLMEmbedder, embedder_from_spec, embedder_spec, get_embedder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import paraphrase_data  # noqa: E402


@pytest.mark.slow
def test_int8_model_keeps_the_float32_nearest_neighbours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERASURE_MODEL_CACHE", str(tmp_path / "cache"))
    rows = paraphrase_data.load(split="check")[::25][:48]  # spread over the held-out books
    queries, records = [r["web"] for r in rows], [r["kjv"] for r in rows]
    int8 = get_embedder("minilm-int8")
    q8, r8 = int8.embed(queries), int8.embed(records)
    exported = int8.model_file()
    assert exported.is_file() and exported.is_relative_to(tmp_path / "cache")  # exported once, into the cache
    assert not [p for p in exported.parent.iterdir() if p != exported]  # no temporary files left behind
    fp32 = MiniLMEmbedder()
    q32, r32 = fp32.embed(queries), fp32.embed(records)
    assert np.allclose(np.linalg.norm(q8, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(q8 * q32, axis=1))) > 0.97  # the same vectors, up to int8 rounding
    top8, top32 = (q8 @ r8.T).argmax(axis=1), (q32 @ r32.T).argmax(axis=1)
    assert (top8 == top32).mean() >= 0.97
    # an index built with it records its name, and a second instance reuses the cached export
    again = embedder_from_spec(embedder_spec(int8))
    # (activations are quantised per batch: in another batch a text's vector moves by about 1 %)
    assert again.name == "minilm-int8" and np.min(np.sum(again.embed(queries[:3]) * q8[:3], axis=1)) > 0.98
    # rows come back in input order (batches are formed by length)
    reversed_rows = int8.embed(queries[::-1])[::-1]
    assert np.min(np.sum(reversed_rows * q8, axis=1)) > 0.98
    # batches run side by side, one per core: the same vectors as one batch after another
    assert int8.threads >= 1 and np.array_equal(get_embedder("minilm-int8", threads=1).embed(queries), q8)
