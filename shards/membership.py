"""Membership inference as a measurement: how well per-record scores tell the
records a model trained on ("members") from records it never saw.

Score (reference-calibrated, offline LiRA/RMIA style). A raw loss mostly says
how *typical* a text is: an easy text has a low loss under any model, seen or
not. So a record's confidence under the model being probed is compared with
its confidence under *reference* models that never saw it. With ``p`` the
probability a model gives the record's true label and the logit-scaled
confidence ``phi = log(p / (1 - p))`` (close to normal across models, Carlini
et al. 2022), first centred per model and label on records that model never
saw (:func:`centre_per_label`: a model's bias toward a label is not
membership), a record's score under the probed model ``m`` is

    score(x) = phi_m(x) - mean over references t of phi_t(x)

(:func:`calibrated_scores`): how much more confident ``m`` is on ``x`` than
models that never saw it. Higher = "looks like a member". Under SISA the
references come for free: a record of shard s was seen by sub-model s only.

AUC. For member scores ``m_1..m_a`` and non-member scores ``n_1..n_b``,

    AUC = (1 / ab) * sum_i sum_j [ 1(m_i > n_j) + 1/2 * 1(m_i = n_j) ]

the Mann-Whitney U statistic over ``ab``: the probability that a random member
outscores a random non-member, ties counted half, from mid-ranks in
O((a+b) log(a+b)). AUC 0.5: no membership signal; 1.0: every member above
every non-member. *Stratified* (``*_strata``): only pairs in the same stratum
(the same scoring model and label) count, ``AUC = sum_k wins_k / sum_k a_k b_k``,
so a stratum's offset (one model more confident, one label easier) cannot pass
for membership.

Interval. A seeded cluster bootstrap: ``resamples`` times, draw as many
*groups* as there are with replacement on each side apart (a group: records
that are copies or near-copies of one text, ``*_groups``; by default every
record is its own group), weight each record by its group's draw count, and
recompute the (weighted, stratified) AUC; the interval is the (1-c)/2 and
(1+c)/2 percentiles. Sixteen copies of three texts are three observations, not
sixteen: the interval is as wide as the number of groups makes it. It is a
percentile bootstrap: with a handful of groups it is too narrow, and with
perfectly separated samples it collapses to a point. Read it with the counts.

Fewer than two scores or two groups on either side, or no stratum with both,
give no AUC (``auc is None`` and a ``reason``): one text says nothing about a
distribution.

:func:`cross_entropy_losses` and :func:`logit_confidences` score records under a
classifier; :func:`group_labels` turns near-duplicate pairs into groups;
:func:`render_membership_png` draws the score distributions (matplotlib, Agg).
No database, no Prefect: callers pass arrays.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_PER_SIDE = 2
SMALL_SAMPLE = 10
CI_METHOD = "cluster bootstrap percentile (groups resampled on each side apart)"
_DRAWS_PER_CHUNK = 256  # bootstrap draws per vectorised block: bounds the (draws x scores) temporaries


@dataclass(frozen=True)
class AucEstimate:
    """An AUC with its interval, or ``auc is None`` and the ``reason``.

    ``member_groups`` / ``nonmember_groups``: the distinct groups (near-duplicate
    texts) behind the scores, the bootstrap's effective sample sizes; ``strata``:
    the strata that had scores on both sides."""

    auc: float | None
    ci_low: float | None
    ci_high: float | None
    members: int
    nonmembers: int
    confidence: float
    resamples: int
    seed: int
    reason: str | None = None
    note: str | None = None
    member_groups: int | None = None
    nonmember_groups: int | None = None
    strata: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "ci_low": self.ci_low, "ci_high": self.ci_high, "members": self.members,
                "nonmembers": self.nonmembers, "member_groups": self.member_groups,
                "nonmember_groups": self.nonmember_groups, "strata": self.strata, "confidence": self.confidence,
                "ci_method": f"{CI_METHOD}, {self.resamples} resamples, seed {self.seed}",
                "reason": self.reason, "note": self.note}

    @property
    def width(self) -> float | None:
        return None if self.ci_low is None or self.ci_high is None else self.ci_high - self.ci_low


def _finite(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} scores must be finite numbers; drop or clip NaN/inf before estimating")
    return array


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse]


def mann_whitney_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member > non-member) + P(tie) / 2, from mid-ranks (both sides non-empty)."""
    a, b = len(members), len(nonmembers)
    ranks = _midranks(np.concatenate([members, nonmembers]))
    return float((ranks[:a].sum() - a * (a + 1) / 2.0) / (a * b))


def _codes(labels: Sequence[Hashable] | np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Labels -> integer codes 0..k-1 (None: every item its own code)."""
    if labels is None:
        return np.arange(n)
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{what} must give one label per score: {len(labels)} labels for {n} scores")
    index: dict[Hashable, int] = {}
    return np.fromiter((index.setdefault(v, len(index)) for v in labels), dtype=np.int64, count=n)


@dataclass(frozen=True)
class _Stratum:
    members: np.ndarray  # positions into the member scores
    lo: np.ndarray  # per member: non-members (sorted) strictly below
    hi: np.ndarray  # per member: non-members (sorted) at or below
    nonmembers_sorted: np.ndarray  # positions into the non-member scores, by score


def _strata(m: np.ndarray, n: np.ndarray, ms: np.ndarray, ns: np.ndarray) -> list[_Stratum]:
    out = []
    for k in np.intersect1d(ms, ns):
        mi, ni = np.flatnonzero(ms == k), np.flatnonzero(ns == k)
        order = ni[np.argsort(n[ni], kind="stable")]
        sorted_scores = n[order]
        out.append(_Stratum(mi, np.searchsorted(sorted_scores, m[mi], "left"),
                            np.searchsorted(sorted_scores, m[mi], "right"), order))
    return out


def _weighted_auc(strata: list[_Stratum], wm: np.ndarray, wn: np.ndarray) -> np.ndarray:
    """AUCs for rows of record weights ``wm`` (draws x a) and ``wn`` (draws x b): pairs within strata only."""
    num = np.zeros(len(wm))
    den = np.zeros(len(wm))
    for s in strata:
        w_m = wm[:, s.members]
        cum = np.zeros((len(wn), len(s.nonmembers_sorted) + 1))
        np.cumsum(wn[:, s.nonmembers_sorted], axis=1, out=cum[:, 1:])
        wins = cum[:, s.lo] + 0.5 * (cum[:, s.hi] - cum[:, s.lo])
        num += (w_m * wins).sum(axis=1)
        den += w_m.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def estimate_auc(
    members: Sequence[float] | np.ndarray,
    nonmembers: Sequence[float] | np.ndarray,
    *,
    higher_is_member: bool = True,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    member_groups: Sequence[Hashable] | np.ndarray | None = None,
    nonmember_groups: Sequence[Hashable] | np.ndarray | None = None,
    member_strata: Sequence[Hashable] | np.ndarray | None = None,
    nonmember_strata: Sequence[Hashable] | np.ndarray | None = None,
) -> AucEstimate:
    """The membership AUC of the scores and its cluster-bootstrap interval (see the module doc).

    ``higher_is_member=False`` for scores where members score lower (a loss).
    Groups: one label per score, records of a group resampled together (labels
    are compared within a side only). Strata: one label per score, pairs counted
    only within a stratum; give both or neither.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; use e.g. 0.95")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a percentile interval, got {resamples}")
    if (member_strata is None) != (nonmember_strata is None):
        raise ValueError("give strata for both sides or for neither")
    m, n = _finite(members, "member"), _finite(nonmembers, "non-member")
    if not higher_is_member:
        m, n = -m, -n
    a, b = len(m), len(n)
    gm, gn = _codes(member_groups, a, "member_groups"), _codes(nonmember_groups, b, "nonmember_groups")
    count_m, count_n = len(np.unique(gm)), len(np.unique(gn))
    if member_strata is None:
        sm, sn = np.zeros(a, np.int64), np.zeros(b, np.int64)
    else:
        both = _codes([*member_strata, *nonmember_strata], a + b, "strata")
        sm, sn = both[:a], both[a:]
    base = dict(members=a, nonmembers=b, confidence=confidence, resamples=resamples, seed=seed,
                member_groups=count_m, nonmember_groups=count_n)
    if a < MIN_PER_SIDE or b < MIN_PER_SIDE:
        return AucEstimate(None, None, None, **base, reason=f"{a} member and {b} non-member score(s): an AUC "
                                                           f"needs at least {MIN_PER_SIDE} of each")
    if count_m < MIN_PER_SIDE or count_n < MIN_PER_SIDE:
        return AucEstimate(None, None, None, **base,
                           reason=f"{count_m} member and {count_n} non-member group(s) of near-duplicate texts: "
                                  f"an AUC needs at least {MIN_PER_SIDE} distinct texts on each side")
    strata = _strata(m, n, sm, sn)
    base["strata"] = len(strata)
    if not strata:
        return AucEstimate(None, None, None, **base, reason="no stratum (scoring model and label) has scores on "
                                                           "both sides: nothing comparable")
    auc = float(_weighted_auc(strata, np.ones((1, a)), np.ones((1, b)))[0])
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _DRAWS_PER_CHUNK):
        k = min(_DRAWS_PER_CHUNK, resamples - start)
        wm = rng.multinomial(count_m, np.full(count_m, 1.0 / count_m), size=k).astype(np.float64)[:, gm]
        wn = rng.multinomial(count_n, np.full(count_n, 1.0 / count_n), size=k).astype(np.float64)[:, gn]
        draws.append(_weighted_auc(strata, wm, wn))
    values = np.concatenate(draws)
    values = values[np.isfinite(values)]  # a draw with no pair in any stratum has no AUC
    if len(values) < resamples // 2:
        return AucEstimate(None, None, None, **base, reason="most bootstrap draws left no comparable pair "
                                                           "(too few groups per stratum): no AUC to report")
    tail = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(values, [tail, 1.0 - tail]))
    note = None
    if min(count_m, count_n) < SMALL_SAMPLE:
        note = (f"only {min(count_m, count_n)} distinct text(s) on the smaller side: the interval is wide and a "
                "percentile bootstrap understates it at this size")
    elif low == high:
        note = "the samples are perfectly separated or identical: the bootstrap interval is a point"
    return AucEstimate(auc, low, high, **base, note=note)


def summarize(values: Sequence[float] | np.ndarray, digits: int = 6) -> dict[str, float | int | None]:
    """Count, mean and quantiles (5, 25, 50, 75, 95 %): a distribution without its records."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return {"n": 0, "mean": None, "q05": None, "q25": None, "q50": None, "q75": None, "q95": None}
    q = np.quantile(array, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(array.size), "mean": round(float(array.mean()), digits),
            **{name: round(float(v), digits) for name, v in zip(("q05", "q25", "q50", "q75", "q95"), q)}}


def _logits(model: nn.Module, features: np.ndarray, labels: np.ndarray, batch_size: int):  # noqa: ANN202
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"need (n, d) features and n labels, got {features.shape} and {labels.shape}")
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for begin in range(0, labels.shape[0], batch_size):
            x = torch.from_numpy(features[begin:begin + batch_size]).to(device)
            y = torch.from_numpy(labels[begin:begin + batch_size]).to(device)
            yield begin, model(x).double(), y


def cross_entropy_losses(model: nn.Module, features: np.ndarray, labels: np.ndarray,
                         batch_size: int = 8192) -> np.ndarray:
    """Per-record cross-entropy loss ``-log p(y|x)`` of a classifier (eval mode, no gradients)."""
    out = np.empty(len(np.asarray(labels).reshape(-1)), dtype=np.float64)
    for begin, logits, y in _logits(model, features, labels, batch_size):
        out[begin:begin + len(y)] = nn.functional.cross_entropy(logits, y, reduction="none").cpu().numpy()
    return out


def logit_confidences(model: nn.Module, features: np.ndarray, labels: np.ndarray,
                      batch_size: int = 8192) -> np.ndarray:
    """Per-record ``phi = log(p_y / (1 - p_y))`` of a classifier, computed stably from
    its logits as ``z_y - logsumexp_{j != y} z_j`` (eval mode, no gradients)."""
    out = np.empty(len(np.asarray(labels).reshape(-1)), dtype=np.float64)
    for begin, logits, y in _logits(model, features, labels, batch_size):
        if logits.shape[1] < 2:
            raise ValueError("a confidence margin needs a classifier with at least 2 classes")
        true = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf"))
        out[begin:begin + len(y)] = (true - torch.logsumexp(others, dim=1)).cpu().numpy()
    return out


def calibrated_scores(own: Sequence[float] | np.ndarray, references: np.ndarray) -> np.ndarray:
    """``own - mean(references)`` per record; ``references`` is (n, k) with NaN where a
    model is no reference for that record (it saw it, or is the probed model).
    A record without any reference gets NaN (the caller leaves it out and counts it)."""
    own = np.asarray(own, dtype=np.float64).reshape(-1)
    refs = np.asarray(references, dtype=np.float64)
    if refs.ndim != 2 or refs.shape[0] != own.shape[0]:
        raise ValueError(f"need n own scores and (n, k) reference scores, got {own.shape} and {refs.shape}")
    counts = np.sum(~np.isnan(refs), axis=1)
    sums = np.nansum(refs, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, own - sums / np.maximum(counts, 1), np.nan)


def centre_per_label(scores: np.ndarray, labels: Sequence[int] | np.ndarray, population: np.ndarray) -> np.ndarray:
    """Each column's scores minus that column's median over its ``population`` rows of
    the same label. ``scores`` and ``population`` are (n, k): column k is a model, and
    ``population[:, k]`` marks the records model k never saw that stand for "any record"
    (RMIA's population). Centred so, a model's general bias toward a label (one
    sub-model is more confident on "billing" than another) cannot pass for
    membership. A label without population rows in a column gives NaN there."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    population = np.asarray(population, dtype=bool)
    if scores.ndim != 2 or population.shape != scores.shape or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"need (n, k) scores and population and n labels, got {scores.shape}, "
                         f"{population.shape} and {labels.shape}")
    out = np.full_like(scores, np.nan)
    for label in np.unique(labels):
        rows = labels == label
        for k in range(scores.shape[1]):
            reference = scores[rows & population[:, k], k]
            if reference.size:
                out[rows, k] = scores[rows, k] - np.median(reference)
    return out


def group_labels(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components of ``n`` items joined by ``pairs``: labels 0..g-1 by first appearance."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"pair ({i}, {j}) is outside 0..{n - 1}")
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    labels: dict[int, int] = {}
    return np.fromiter((labels.setdefault(root(i), len(labels)) for i in range(n)), dtype=np.int64, count=n)


@dataclass(frozen=True)
class ScorePanel:
    """One panel of the plot: a model's scores of members and non-members, and
    optionally of records known to be members (the probe's power)."""

    title: str
    members: np.ndarray
    nonmembers: np.ndarray
    estimate: AucEstimate
    known_members: np.ndarray | None = None
    power: AucEstimate | None = None


def _auc_text(est: AucEstimate | None) -> str:
    if est is None or est.auc is None:
        return "n/a"
    if est.ci_low is None:
        return f"{est.auc:.3f}"
    return f"{est.auc:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]"


def render_membership_png(panels: Sequence[ScorePanel], score_label: str, member_label: str = "erased (members)",
                          nonmember_label: str = "held out (never seen)",
                          known_member_label: str = "still trained on (members)") -> bytes:
    """Side-by-side histograms of the member and non-member scores of each panel, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("give at least one panel to draw")
    figure = Figure(figsize=(5.0 * len(panels), 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    every = np.concatenate([np.concatenate([p.members, p.nonmembers,
                                            p.known_members if p.known_members is not None else np.zeros(0)])
                            for p in panels])
    edges = np.histogram_bin_edges(every if every.size else np.zeros(1), bins=30)
    for ax, panel in zip(axes, panels):
        series = [(panel.nonmembers, nonmember_label, "tab:blue"),
                  (panel.known_members, known_member_label, "tab:green"),
                  (panel.members, member_label, "tab:red")]
        for values, label, colour in series:
            if values is not None and len(values):
                ax.hist(values, bins=edges, density=True, alpha=0.45, color=colour, label=f"{label}, n={len(values)}")
        title = f"{panel.title}\nAUC {_auc_text(panel.estimate)}"
        if panel.power is not None:
            title += f"; power {_auc_text(panel.power)}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(score_label)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
