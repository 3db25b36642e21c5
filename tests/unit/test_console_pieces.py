"""The console's pure pieces: the shared-span highlighting of the review queue, the
session cookie's seal, and the lineage picture."""

from __future__ import annotations

from datetime import datetime, timezone

from api.console_auth import csrf_token, csrf_valid, seal, unseal
from db.console_queries import DatasetLineage, EnsembleInfo, ShardVersionInfo, SourceFileInfo
from dedup.normalize import exact_jaccard, shingle_set
from pipeline.lineage_picture import lineage_svg
from pipeline.review_queue import shared_segments

KEY = b"k" * 32


def _marked(segments) -> str:  # noqa: ANN001
    return "".join(s.text for s in segments if s.shared)


def test_highlights_exactly_the_words_of_shared_five_word_runs() -> None:
    original = "the quick brown fox jumps over the lazy dog near the old river bank today"
    edited = "the quick brown fox jumps over the sleepy dog near the old river bank today"
    segments = shared_segments(edited, original)
    assert "".join(s.text for s in segments) == edited  # nothing lost or added
    assert _marked(segments) == "the quick brown fox jumps over thedog near the old river bank today"
    assert not any("sleepy" in s.text for s in segments if s.shared)
    # what is highlighted is what Jaccard counts: no shared 5-gram, no highlight
    assert exact_jaccard(shingle_set("a b c d e f"), shingle_set("f e d c b a")) == 0.0
    assert _marked(shared_segments("a b c d e f", "f e d c b a")) == ""


def test_highlighting_follows_normalisation_and_keeps_punctuation() -> None:
    segments = shared_segments("Hello, THERE my dear friend!", "hello there my dear friend")
    assert _marked(segments) == "Hello, THERE my dear friend"
    assert segments[-1].text == "!" and not segments[-1].shared


def test_a_sealed_cookie_refuses_edits_other_purposes_and_expiry() -> None:
    cookie = seal(KEY, "console-session", {"t": 1, "e": 4_000_000_000, "n": "abc"})
    assert unseal(KEY, "console-session", cookie) == {"t": 1, "e": 4_000_000_000, "n": "abc"}
    assert unseal(KEY, "console-signin", cookie) is None
    assert unseal(b"x" * 32, "console-session", cookie) is None
    value, _, mac = cookie.rpartition(".")
    assert unseal(KEY, "console-session", value[:-1] + ("A" if value[-1] != "A" else "B") + "." + mac) is None
    expired = seal(KEY, "console-session", {"t": 1, "e": 1, "n": "abc"})
    assert unseal(KEY, "console-session", expired) is None
    assert csrf_valid(KEY, "abc", csrf_token(KEY, "abc")) and not csrf_valid(KEY, "abd", csrf_token(KEY, "abc"))
    assert not csrf_valid(KEY, "abc", None) and not csrf_valid(KEY, "abc", "")


def test_the_lineage_picture_draws_every_step_and_escapes_names() -> None:
    now = datetime.now(timezone.utc)
    lineage = DatasetLineage(
        name="demo", n_shards=1, n_slices=2, embedder="hashing", placement="subject",
        source_files=(SourceFileInfo(7, "<b>records</b>.jsonl", "ab" * 32, 10, 10, now),),
        shard_versions=(ShardVersionInfo(0, 1, 10, "cd" * 32, "ingest:source_file:7", now, True, 2),
                        ShardVersionInfo(0, 2, 9, "ef" * 32, "erasure:request:x", now, False, 2)),
        ensembles=(EnsembleInfo("aaa111", None, "train", now, {0: "c1"}, {0: 1}),
                   EnsembleInfo("bbb222", "aaa111", "retrain", now, {0: "c2"}, {0: 2})),
    )
    svg = lineage_svg(lineage)
    assert svg.startswith("<svg") and "<b>" not in svg and "&lt;b&gt;records" in svg
    for text in ("shard 0 · v1", "shard 0 · v2", "files purged", "ensemble bbb222", "in service", "2 checkpoint(s)"):
        assert text in svg
    # file -> v1, v1 -> v2 (dashed), two version -> checkpoints, two checkpoints -> ensemble
    assert svg.count('class="edge"') == 6 and svg.count("stroke-dasharray") == 1


def test_a_paraphrase_is_shown_against_the_bar_of_its_rank() -> None:
    from dedup.policy import default_thresholds
    from pipeline.review_queue import paraphrase_bar

    minilm, hashing = default_thresholds("minilm").to_dict(), default_thresholds("hashing").to_dict()
    assert paraphrase_bar({"rank": 1, "cosine": 0.7}, minilm) == minilm["margin_review"] == 1.325
    assert paraphrase_bar({"rank": 2, "cosine": 0.7}, minilm) is None  # MiniLM's margin rule reviews rank 1 only
    assert paraphrase_bar({"rank": 1, "cosine": 0.4}, minilm) is None  # under the cosine floor
    assert paraphrase_bar({"rank": 1, "cosine": 0.9}, hashing) is None  # the rule is off: the cosine decides
