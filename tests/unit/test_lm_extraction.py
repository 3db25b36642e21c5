"""The lm family memorises, the extraction probe sees it, and exact retraining removes it."""

from __future__ import annotations

import numpy as np
import pytest

from shards.checkpoints import CheckpointStore
from shards.extraction import ProbeSettings, ensemble_generator, longest_common_span, probe_records, wilson
from shards.generation import EnsembleLM
from shards.lm import lm_spec
from shards.retrain import retrain_from_slice
from shards.training import ShardData, SliceSchedule, TrainConfig, train_shard

WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow nectar onyx "
         "pepper quartz raven saffron tundra umber velvet willow xenon yarrow zephyr").split()


def random_texts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


def lm_shard(texts: list[str], slices: list[int]) -> ShardData:
    n = len(texts)
    return ShardData("0", [f"r{i}" for i in range(n)], slices, np.zeros((n, 1), np.float32), np.zeros(n, np.int64),
                     texts=texts)


def test_memorised_record_is_extracted_until_exact_retraining_removes_it(tmp_path):
    texts = random_texts(4, 10, 3)
    shard = lm_shard(texts, [0, 0, 1, 1])
    config = TrainConfig(model=lm_spec(block_size=80, width=64, layers=1, embed=16),
                         schedule=SliceSchedule.paper(2, 120), batch_size=4, learning_rate=1e-2)
    store = CheckpointStore(tmp_path)
    trained = train_shard(shard, config, store, threads=1)
    settings = ProbeSettings(prompt_words=3, continuation_words=5, span=5)
    records = list(zip(shard.record_ids, texts))
    before = probe_records(ensemble_generator(EnsembleLM.from_checkpoints(store, [trained.final])), records, settings)
    assert before.extraction.hits == 4 and before.exact.hits == 4  # random words: only memorisation predicts them

    result = retrain_from_slice(shard, {"r3"}, config, store, threads=1)
    after = probe_records(ensemble_generator(EnsembleLM.from_checkpoints(store, [result.final])), records, settings)
    extracted = {r.record_id for r in after.records if r.extracted}
    assert "r3" not in extracted and {"r0", "r1"} <= extracted  # r2 trained again from the slice-0 checkpoint


def test_an_ensemble_averages_its_members_distributions(tmp_path):
    # two members, each memorised a different record: a record's likelihood under the mixture is diluted, by at
    # most a factor S = 2 per byte, never removed
    texts = random_texts(2, 10, 9)
    config = TrainConfig(model=lm_spec(block_size=80, width=64, layers=1, embed=16),
                         schedule=SliceSchedule.paper(1, 120), batch_size=2, learning_rate=1e-2)
    store = CheckpointStore(tmp_path)
    finals = [train_shard(ShardData(str(s), [f"r{s}"], [0], np.zeros((1, 1), np.float32), [0], texts=[texts[s]]),
                          config, store, threads=1).final for s in (0, 1)]
    ensemble = EnsembleLM.from_checkpoints(store, finals)
    nll_mix, count = ensemble.byte_nll([texts[0]])
    nll_own, _ = EnsembleLM.from_checkpoints(store, finals[:1]).byte_nll([texts[0]])
    # the mixture gives each byte at least half of the memorising member's probability: at most log 2 per byte more
    assert nll_own < nll_mix <= nll_own + count * np.log(2) + 1e-6
    nll_other, _ = EnsembleLM.from_checkpoints(store, finals[1:]).byte_nll([texts[0]])
    assert nll_mix < nll_other  # the member that saw it still lifts the mixture above one that never did


def test_longest_common_span_and_wilson_interval():
    assert longest_common_span("a b c d".split(), "x b c d y".split()) == 3
    assert longest_common_span([], ["a"]) == 0
    zero = wilson(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.2775, abs=1e-4)
    half = wilson(5, 10)
    assert (half.low, half.high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    with pytest.raises(ValueError, match="span"):
        ProbeSettings(prompt_words=3, continuation_words=4, span=5)


def test_short_records_are_skipped_and_counted():
    settings = ProbeSettings(prompt_words=3, continuation_words=3, span=2)
    report = probe_records(lambda prompts, m: ["x y z"] * len(prompts), [("a", "one two"), ("b", "1 2 3 x y q")],
                           settings)
    assert report.skipped_short == 1 and len(report.records) == 1
    assert report.records[0].longest_span == 2 and report.records[0].extracted and not report.records[0].exact
