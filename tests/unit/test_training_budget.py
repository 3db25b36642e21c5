"""Trained to par by default (issue 11, point 3): the sub-models' budget and the slice schedule
that makes retraining from a late slice cheap."""

from __future__ import annotations

import pytest

from pipeline.training import TrainingOptions, train_config
from shards.retrain import retrain_estimate
from shards.training import DEFAULT_SCHEDULE, SliceSchedule


def test_equal_samples_spends_the_same_samples_on_every_slice_and_as_many_as_the_paper() -> None:
    R, n_per_slice, e = 4, 1000, 3.0
    cumulative = [n_per_slice * (r + 1) for r in range(R)]
    schedule = SliceSchedule.equal_samples(R, e)
    per_slice = [sum(schedule.passes(r, cumulative[r])) for r in range(R)]
    assert max(per_slice) - min(per_slice) <= 1  # rounding of a partial pass only
    assert schedule.samples(cumulative) == pytest.approx(SliceSchedule.paper(R, e).samples(cumulative), abs=R)
    assert schedule.epochs == pytest.approx((3.0, 1.5, 1.0, 0.75))


def test_retraining_from_slice_i_costs_r_minus_i_over_r_of_the_shard() -> None:
    S, R = 8, 4
    counts = {s: [500] * R for s in range(S)}
    for i in range(R):
        est = retrain_estimate(counts, [(0, i)], SliceSchedule.equal_samples(R, 1.0))
        assert est.fraction == pytest.approx((R - i) / (R * S), rel=1e-2)
        paper = retrain_estimate(counts, [(0, i)], SliceSchedule.paper(R, 1.0))
        assert est.fraction <= paper.fraction + 1e-9  # never dearer than the paper's, cheaper for i > 0
    # the mean over a subject's slice: 0.078 for S=8, R=4 (the paper's 0.094)
    mean = sum(retrain_estimate(counts, [(0, i)], SliceSchedule.equal_samples(R, 1.0)).fraction
               for i in range(R)) / R
    assert mean < 0.08


def test_par_budget_gives_each_sub_model_a_single_models_updates() -> None:
    S, R, e = 8, 4, 4.0
    default = TrainingOptions(epochs=e)
    assert default.budget == "par" and default.schedule == DEFAULT_SCHEDULE == "equal-samples"
    config = train_config(16, 3, R, default, S)
    n_shard = 1000
    cumulative = [n_shard * (r + 1) // R for r in range(R)]
    # each sub-model processes e epochs of the whole dataset (S shards of n_shard records)
    assert config.schedule.samples(cumulative) == pytest.approx(e * S * n_shard, abs=R)
    single = train_config(16, 3, 1, default, 1)
    assert single.schedule.epochs == (e,)
    per_shard = train_config(16, 3, R, TrainingOptions(epochs=e, budget="per-shard", schedule="paper"), S)
    assert per_shard.schedule == SliceSchedule.paper(R, e)  # the old behaviour, on request
    assert per_shard.digest != config.digest  # the budget is part of every checkpoint address


@pytest.mark.parametrize("bad", [{"budget": "huge"}, {"schedule": "random"}, {"epochs": 0}])
def test_bad_training_options_are_refused_with_the_choices(bad: dict) -> None:
    with pytest.raises(ValueError, match="must be"):
        TrainingOptions(**bad)
