"""The membership probe's math: AUC against a brute-force pair count, the
bootstrap interval's coverage on a case with a known AUC, degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shards.membership import (
    ScorePanel,
    cross_entropy_losses,
    estimate_auc,
    mann_whitney_auc,
    render_membership_png,
    summarize,
)


def brute_force_auc(members, nonmembers) -> float:  # noqa: ANN001
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=30)  # small range: many ties


@given(scores, scores)
def test_auc_equals_the_pair_count_ties_counted_half(members, nonmembers) -> None:  # noqa: ANN001
    assert mann_whitney_auc(np.array(members), np.array(nonmembers)) == pytest.approx(
        brute_force_auc(members, nonmembers), abs=1e-12)


def test_known_values() -> None:
    assert estimate_auc([3, 4], [1, 2]).auc == 1.0
    assert estimate_auc([1, 2], [3, 4]).auc == 0.0
    assert estimate_auc([1, 1], [1, 1]).auc == 0.5
    # a loss: members score lower
    assert estimate_auc([0.1, 0.2], [0.5, 0.9], higher_is_member=False).auc == 1.0


def test_interval_contains_the_true_auc_on_a_seeded_synthetic_case() -> None:
    """Normal scores with a mean shift d: the true AUC is Phi(d / sqrt(2))."""
    shift = 0.8
    true_auc = 0.5 * (1 + math.erf(shift / 2))  # Phi(d/sqrt2) = (1 + erf(d/2)) / 2
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(20):
        est = estimate_auc(rng.normal(shift, 1, 60), rng.normal(0, 1, 200), seed=trial, resamples=500)
        assert est.ci_low <= est.auc <= est.ci_high
        covered += est.ci_low <= true_auc <= est.ci_high
    assert covered >= 16  # nominal 95 %: 19 of 20 expected; leave room for chance
    one = estimate_auc(np.random.default_rng(1).normal(shift, 1, 80), np.random.default_rng(2).normal(0, 1, 300))
    assert one.ci_low < true_auc < one.ci_high
    assert one.ci_high - one.ci_low < 0.2


def test_the_interval_is_reproducible_by_seed() -> None:
    m, n = np.arange(20.0), np.arange(5.0, 45.0)
    assert estimate_auc(m, n, seed=3) == estimate_auc(m, n, seed=3)


@pytest.mark.parametrize("members, nonmembers", [([], [1.0, 2.0]), ([1.0], [1.0, 2.0]), ([1.0, 2.0], [3.0]),
                                                 ([], [])])
def test_too_few_scores_give_no_auc_and_say_why(members, nonmembers) -> None:  # noqa: ANN001
    est = estimate_auc(members, nonmembers)
    assert est.auc is None and est.ci_low is None and est.ci_high is None
    assert "at least 2" in est.reason
    assert (est.members, est.nonmembers) == (len(members), len(nonmembers))


def test_small_and_separated_samples_are_flagged() -> None:
    assert "smaller side" in estimate_auc([5.0, 6.0, 7.0], np.arange(50.0) - 100).note
    separated = estimate_auc(np.arange(20.0) + 100, np.arange(50.0))
    assert separated.auc == 1.0 and separated.ci_low == separated.ci_high == 1.0
    assert "point" in separated.note


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        estimate_auc([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        estimate_auc([1.0, 2.0], [1.0, 2.0], confidence=1.5)


def test_summary_holds_only_counts_and_quantiles() -> None:
    summary = summarize(np.arange(101.0))
    assert summary == {"n": 101, "mean": 50.0, "q05": 5.0, "q25": 25.0, "q50": 50.0, "q75": 75.0, "q95": 95.0}
    assert summarize([])["n"] == 0


def test_losses_of_a_classifier_and_the_plot() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.array([0, 1] * 5)
    losses = cross_entropy_losses(model, x, y, batch_size=4)
    expected = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none")
    assert np.allclose(losses, expected.detach().numpy(), atol=1e-6)
    panel = ScorePanel("before", losses[:5], losses[5:], estimate_auc(-losses[:5], -losses[5:]))
    png = render_membership_png([panel, panel], "loss")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
