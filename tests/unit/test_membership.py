"""The membership probe's math: AUC against a brute-force pair count (pooled and
within strata), the bootstrap interval's coverage on a case with a known AUC,
groups of near-duplicates as the bootstrap's unit, the reference calibration on
real sub-models (power on members, ~0.5 on two sets of non-members), degenerate
inputs, and the plain sentence built from the numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shards.membership import (
    ScorePanel,
    calibrated_scores,
    centre_per_label,
    cross_entropy_losses,
    estimate_auc,
    group_labels,
    logit_confidences,
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


# ---------------------------------------------------------------- strata, groups, calibration


def brute_force_stratified_auc(members, m_strata, nonmembers, n_strata) -> float:  # noqa: ANN001
    wins = pairs = 0.0
    for m, sm in zip(members, m_strata):
        for n, sn in zip(nonmembers, n_strata):
            if sm == sn:
                wins += (m > n) + 0.5 * (m == n)
                pairs += 1
    return wins / pairs


stratified = st.lists(st.tuples(st.integers(-4, 4).map(float), st.sampled_from("ab")), min_size=2, max_size=25)


@given(stratified, stratified)
def test_stratified_auc_counts_only_pairs_within_a_stratum(members, nonmembers) -> None:  # noqa: ANN001
    m, sm = zip(*members)
    n, sn = zip(*nonmembers)
    if not set(sm) & set(sn):
        assert estimate_auc(m, n, member_strata=sm, nonmember_strata=sn, resamples=100).auc is None
        return
    est = estimate_auc(m, n, member_strata=sm, nonmember_strata=sn, resamples=100)
    assert est.auc == pytest.approx(brute_force_stratified_auc(m, sm, n, sn), abs=1e-12)


def test_an_offset_between_strata_does_not_pass_for_membership() -> None:
    """Two sub-models (strata) with different score levels; within each, members and
    non-members come from one distribution. Pooled, the stratum mix reads as signal."""
    rng = np.random.default_rng(0)
    members = np.concatenate([rng.normal(0, 1, 150), rng.normal(3, 1, 50)])
    m_strata = ["easy"] * 150 + ["hard"] * 50
    nonmembers = np.concatenate([rng.normal(0, 1, 50), rng.normal(3, 1, 150)])
    n_strata = ["easy"] * 50 + ["hard"] * 150
    assert estimate_auc(members, nonmembers).auc < 0.3  # pooled: an artefact of the mix
    est = estimate_auc(members, nonmembers, member_strata=m_strata, nonmember_strata=n_strata)
    assert est.ci_low < 0.5 < est.ci_high and abs(est.auc - 0.5) < 0.08
    assert est.strata == 2
    with pytest.raises(ValueError, match="both sides"):
        estimate_auc(members, nonmembers, member_strata=m_strata)


def test_grouping_changes_the_bootstraps_effective_n() -> None:
    """Twenty member scores that are five copies each of four texts are four observations."""
    rng = np.random.default_rng(3)
    texts = rng.normal(0.5, 1, 4)
    members = np.repeat(texts, 5) + rng.normal(0, 0.01, 20)
    nonmembers = rng.normal(0, 1, 300)
    singletons = estimate_auc(members, nonmembers, seed=1)
    grouped = estimate_auc(members, nonmembers, seed=1, member_groups=np.repeat(np.arange(4), 5))
    assert grouped.auc == singletons.auc  # the point estimate does not change ...
    assert (grouped.member_groups, singletons.member_groups) == (4, 20)
    assert grouped.width > 1.5 * singletons.width  # ... its uncertainty does
    assert "4 distinct text" in grouped.note
    one = estimate_auc(members, nonmembers, member_groups=["same"] * 20)
    assert one.auc is None and "distinct texts" in one.reason


def test_calibrated_scores_use_only_the_references_given() -> None:
    own = np.array([1.0, 2.0, 3.0])
    refs = np.array([[0.0, 2.0], [np.nan, 1.0], [np.nan, np.nan]])
    out = calibrated_scores(own, refs)
    assert out[0] == 0.0 and out[1] == 1.0 and np.isnan(out[2])
    with pytest.raises(ValueError, match="reference"):
        calibrated_scores(own, refs[:2])


def test_centring_per_model_and_label_keeps_a_models_bias_from_passing_for_membership() -> None:
    """No record is a member of the probed model 0 here (a null case). Model 1 is less
    confident than the others on everything. Controls come mostly from shard 1, so their
    references leave model 1 out while the "erased" records' references include it:
    uncentred, the erased records look like members; centred, they do not."""
    rng = np.random.default_rng(5)
    shard = np.concatenate([np.zeros(60, int), np.full(300, 1), np.full(30, 2), np.full(30, 3)])
    labels = rng.integers(0, 2, len(shard))
    difficulty = rng.normal(0, 1, len(shard))
    phi = difficulty[:, None] + rng.normal(0, 0.3, (len(shard), 4)) + np.array([0.0, -2.0, 0.0, 0.0])
    seen = shard[:, None] == np.arange(4)[None, :]
    seen[:, 0] = False  # model 0 saw none of these records
    population = ~seen

    def auc(values: np.ndarray) -> float:
        refs = np.where(seen, np.nan, values)
        refs[:, 0] = np.nan
        scores = calibrated_scores(values[:, 0], refs)
        return estimate_auc(scores[shard == 0], scores[shard > 0], member_strata=labels[shard == 0],
                            nonmember_strata=labels[shard > 0], resamples=200).auc

    assert auc(phi) > 0.75
    centred = centre_per_label(phi, labels, population)
    assert abs(auc(centred) - 0.5) < 0.1
    for k in range(4):
        for label in (0, 1):
            assert np.median(centred[(labels == label) & population[:, k], k]) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(centre_per_label(phi, labels, np.zeros_like(population))).all()


def test_group_labels_are_connected_components() -> None:
    assert group_labels(6, [(0, 2), (2, 4), (5, 1)]).tolist() == [0, 1, 0, 2, 0, 1]
    assert group_labels(3, []).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        group_labels(2, [(0, 2)])


def test_logit_confidence_is_the_log_odds_of_the_true_label() -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    x = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    y = np.array([0, 1, 2] * 3)
    p = torch.softmax(model(torch.from_numpy(x)), dim=1).detach().numpy()[np.arange(9), y]
    assert np.allclose(logit_confidences(model, x, y, batch_size=4), np.log(p / (1 - p)), atol=1e-5)


def _overfit_model(x: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 3))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(80):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        optimiser.step()
    return model


def test_reference_calibration_tells_members_from_non_members_of_real_models() -> None:
    """Four sub-models on four disjoint shards (SISA), each overfitting noisy labels.
    Under sub-model 0: its own records (members) against other shards' records
    (non-members), each calibrated on the sub-models that never saw it, give high
    power; two sets of non-members give an AUC near 0.5."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * 60 + 60, 8)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (rng.random(len(x)) < 0.5) * rng.integers(1, 3, len(x))) % 3
    shard = np.repeat(np.arange(5), 60)  # shard 4: never trained on
    models = [_overfit_model(x[shard == s], y[shard == s], seed=s) for s in range(4)]
    trained_on = shard[:, None] == np.arange(4)[None, :]
    phi = centre_per_label(np.stack([logit_confidences(m, x, y) for m in models], axis=1), y, ~trained_on)

    def scores(rows: np.ndarray) -> np.ndarray:
        refs = phi[rows].copy()
        refs[:, 0] = np.nan  # the probed model is no reference
        for k in range(1, 4):
            refs[shard[rows] == k, k] = np.nan  # nor is the model that trained on the record
        return calibrated_scores(phi[rows, 0], refs)

    members = scores(np.flatnonzero(shard == 0))
    others = scores(np.flatnonzero((shard == 1) | (shard == 2)))
    unseen = scores(np.flatnonzero((shard == 3) | (shard == 4)))
    power = estimate_auc(members, others)
    assert power.auc > 0.75 and power.ci_low > 0.65
    null = estimate_auc(unseen, others)
    assert null.ci_low < 0.5 < null.ci_high and abs(null.auc - 0.5) < 0.1


# ---------------------------------------------------------------- the sentence and the grouping (service side)


def _est(auc, low, high):  # noqa: ANN001, ANN202
    return {"auc": auc, "ci_low": low, "ci_high": high, "confidence": 0.95, "reason": None}


def test_the_sentence_says_it_could_have_noticed_only_when_the_interval_excludes_the_power() -> None:
    from pipeline.membership import probe_sentence

    noticed = probe_sentence("after", _est(0.47, 0.30, 0.64), _est(0.80, 0.76, 0.84), 3)
    assert noticed.startswith("After retraining") and "no better than chance" in noticed
    assert "AUC 0.47, 95 % CI 0.30–0.64; 3 distinct texts, so the interval is wide" in noticed
    assert "AUC 0.80" in noticed and "could have noticed" in noticed

    inside = probe_sentence("after", _est(0.47, 0.40, 0.53), _est(0.55, 0.52, 0.58), 3)
    assert "cannot show whether they are still remembered" in inside and "could have noticed" not in inside

    blind = probe_sentence("after", _est(0.47, 0.30, 0.64), _est(0.51, 0.48, 0.54), 3)
    assert blind.startswith("A reference-calibrated membership test cannot tell") and "says nothing" in blind

    remembered = probe_sentence("after", _est(0.75, 0.62, 0.86), _est(0.80, 0.76, 0.84), 5)
    assert "still tells" in remembered and "look for copies" in remembered

    unmeasured = probe_sentence("after", _est(0.5, 0.4, 0.6), None, 4)
    assert "says nothing" in unmeasured and "could not be measured" in unmeasured

    missing = probe_sentence("after", {"auc": None, "reason": "the files are gone"}, None, 0)
    assert missing == "After retraining, the membership test could not be run: the files are gone."

    # the verdict compares the figures as printed: a lower bound of 0.5004 reads 0.50, not above chance
    borderline = probe_sentence("after", _est(0.59, 0.5004, 0.65), _est(0.77, 0.75, 0.79), 3)
    assert "no better than chance" in borderline and "CI 0.50–0.65" in borderline

    before = probe_sentence("before", _est(0.48, 0.41, 0.53), _est(0.55, 0.52, 0.58), 3)
    assert before.startswith("Before erasure, while the models still trained on them") and "AUC 0.55" in before


def test_near_duplicate_pairs_join_copies_and_nothing_else() -> None:
    from pipeline.membership import near_duplicate_pairs

    base = ("my parcel with the blue kettle was left at the wrong door on tuesday and the courier "
            "never answered the phone when I called about it twice")
    texts = [base, base.upper() + "!!", base.replace("tuesday", "friday"),
             "the app crashes whenever I open the settings page after the latest update on my phone",
             "I was charged twice for the same subscription this month and want a refund please"]
    groups = group_labels(len(texts), near_duplicate_pairs(texts))
    assert groups.tolist() == [0, 0, 0, 1, 2]
