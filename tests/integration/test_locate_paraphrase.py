"""`erasure locate --json` states, for each paraphrase match, why: cosine, margin, rank and shared spans."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from api.cli import app
from api.demo import DEMO_FIELDS
from db.settings import Settings
from pipeline.ingest import IngestOptions, ingest_source_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import paraphrase_data  # noqa: E402


def test_locate_json_reports_paraphrase_evidence(sqlite_settings: Settings, tmp_path: Path) -> None:
    # Real paraphrases: King James verses ingested, a World English Bible verse as the sample.
    rows = paraphrase_data.load(split="check")[:120]
    source = tmp_path / "verses.jsonl"
    source.write_text("".join(json.dumps({"id": f"v{i}", "text": r["kjv"], "label": r["book"], "email": "",
                                          "user_id": "", "name": ""}) + "\n" for i, r in enumerate(rows)))
    ingest_source_file(source, IngestOptions(dataset="bible", fields=DEMO_FIELDS, n_shards=2), sqlite_settings)
    target = next(i for i, r in enumerate(rows) if r["verse"] > 3 and len(r["web"].split()) > 12)

    flags = ["--database-url", sqlite_settings.resolved_database_url, "--home", str(sqlite_settings.home)]
    out = CliRunner().invoke(app, ["locate", "--dataset", "bible", "--sample", rows[target]["web"], "--hops", "0",
                                   "--show-keep", "--json", *flags])
    assert out.exit_code == 0, out.output
    matches = json.loads(out.stdout)["matches"]
    para = [m for m in matches if "paraphrase" in m]
    assert para, matches
    top = min(para, key=lambda m: m["paraphrase"]["rank"])
    ev = top["paraphrase"]
    assert top["record_id"] == f"v{target}" and ev["rank"] == 1  # the verse itself is the nearest record
    assert ev["cosine"] == top["score"] and ev["margin"] > 1.0  # it stands out of its neighbourhood
    assert ev["shared_spans"] and all(len(s.split()) >= 3 for s in ev["shared_spans"])
    assert ev["reasons"] and 0.0 <= ev["jaccard"] <= 1.0
    assert ev["query_knn_mean"] is not None and ev["record_knn_mean"] is not None  # means stored at ingest
    # the human-readable output says the same
    text = CliRunner().invoke(app, ["locate", "--dataset", "bible", "--sample", rows[target]["web"], "--hops", "0",
                                    "--show-keep", *flags])
    assert "rank 1 among the query's neighbours" in text.output
