"""Membership inference as a measurement: how well per-record scores tell the
records a model trained on ("members") from records it never saw.

AUC. For member scores ``m_1..m_a`` and non-member scores ``n_1..n_b`` (higher
= "looks like a member"),

    AUC = (1 / ab) * sum_i sum_j [ 1(m_i > n_j) + 1/2 * 1(m_i = n_j) ]

the Mann-Whitney U statistic over ``ab``: the probability that a random member
outscores a random non-member, ties counted half. It is computed from mid-ranks
of the pooled scores, ``AUC = (R_m - a(a+1)/2) / ab`` with ``R_m`` the sum of
the members' mid-ranks, in O((a+b) log(a+b)). AUC 0.5: the scores carry no
membership signal; 1.0: every member scores above every non-member.

Interval. A stratified, seeded bootstrap: ``resamples`` times, draw ``a``
members and ``b`` non-members with replacement (each group apart, so the group
sizes stay fixed), recompute the AUC; the interval is the (1-c)/2 and (1+c)/2
percentiles of those AUCs. It makes no assumption about the score distributions
(Hanley-McNeil's closed form assumes exponential ones), but it is a
percentile bootstrap: with a handful of members it is too narrow, and with
perfectly separated samples it collapses to a point. Read it with the counts.

Fewer than two scores on either side give no AUC at all (``auc is None`` and a
``reason``): one record says nothing about a distribution.

``cross_entropy_losses`` is the usual score (Yeom et al., 2018): a model's loss
on a record it trained on tends to be lower, so ``-loss`` is the member score.
``render_membership_png`` draws the score distributions (matplotlib, Agg; no
pyplot state). No database, no Prefect: callers pass arrays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_PER_SIDE = 2
SMALL_SAMPLE = 10
CI_METHOD = "stratified bootstrap percentile"


@dataclass(frozen=True)
class AucEstimate:
    """An AUC with its interval, or ``auc is None`` and the ``reason``."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "ci_low": self.ci_low, "ci_high": self.ci_high, "members": self.members,
                "nonmembers": self.nonmembers, "confidence": self.confidence,
                "ci_method": f"{CI_METHOD}, {self.resamples} resamples, seed {self.seed}",
                "reason": self.reason, "note": self.note}


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


def estimate_auc(
    members: Sequence[float] | np.ndarray,
    nonmembers: Sequence[float] | np.ndarray,
    *,
    higher_is_member: bool = True,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> AucEstimate:
    """The membership AUC of the scores and its bootstrap interval (see the module doc).

    ``higher_is_member=False`` for scores where members score lower (a loss).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; use e.g. 0.95")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a percentile interval, got {resamples}")
    m, n = _finite(members, "member"), _finite(nonmembers, "non-member")
    if not higher_is_member:
        m, n = -m, -n
    a, b = len(m), len(n)
    if a < MIN_PER_SIDE or b < MIN_PER_SIDE:
        return AucEstimate(None, None, None, a, b, confidence, resamples, seed,
                           reason=f"{a} member and {b} non-member score(s): an AUC needs at least "
                                  f"{MIN_PER_SIDE} of each")
    auc = mann_whitney_auc(m, n)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for k in range(resamples):
        draws[k] = mann_whitney_auc(m[rng.integers(0, a, a)], n[rng.integers(0, b, b)])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    note = None
    if min(a, b) < SMALL_SAMPLE:
        note = (f"only {min(a, b)} score(s) on the smaller side: the interval is wide and a percentile "
                "bootstrap understates it at this size")
    elif low == high:
        note = "the samples are perfectly separated or identical: the bootstrap interval is a point"
    return AucEstimate(auc, float(low), float(high), a, b, confidence, resamples, seed, note=note)


def summarize(values: Sequence[float] | np.ndarray, digits: int = 6) -> dict[str, float | int | None]:
    """Count, mean and quantiles (5, 25, 50, 75, 95 %): a distribution without its records."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return {"n": 0, "mean": None, "q05": None, "q25": None, "q50": None, "q75": None, "q95": None}
    q = np.quantile(array, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(array.size), "mean": round(float(array.mean()), digits),
            **{name: round(float(v), digits) for name, v in zip(("q05", "q25", "q50", "q75", "q95"), q)}}


def cross_entropy_losses(model: nn.Module, features: np.ndarray, labels: np.ndarray,
                         batch_size: int = 8192) -> np.ndarray:
    """Per-record cross-entropy loss ``-log p(y|x)`` of a classifier (eval mode, no gradients)."""
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"need (n, d) features and n labels, got {features.shape} and {labels.shape}")
    device = next(model.parameters()).device
    out = np.empty(labels.shape[0], dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for begin in range(0, labels.shape[0], batch_size):
            x = torch.from_numpy(features[begin:begin + batch_size]).to(device)
            y = torch.from_numpy(labels[begin:begin + batch_size]).to(device)
            loss = nn.functional.cross_entropy(model(x), y, reduction="none")
            out[begin:begin + batch_size] = loss.double().cpu().numpy()
    return out


@dataclass(frozen=True)
class ScorePanel:
    """One panel of the plot: a model's scores of members and non-members."""

    title: str
    members: np.ndarray
    nonmembers: np.ndarray
    estimate: AucEstimate


def render_membership_png(panels: Sequence[ScorePanel], score_label: str, member_label: str = "erased (members)",
                          nonmember_label: str = "held out (never seen)") -> bytes:
    """Side-by-side histograms of the member and non-member scores of each panel, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("give at least one panel to draw")
    figure = Figure(figsize=(5.0 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    every = np.concatenate([np.concatenate([p.members, p.nonmembers]) for p in panels])
    edges = np.histogram_bin_edges(every if every.size else np.zeros(1), bins=30)
    for ax, panel in zip(axes, panels):
        for values, label, colour in ((panel.nonmembers, nonmember_label, "tab:blue"),
                                      (panel.members, member_label, "tab:red")):
            if len(values):
                ax.hist(values, bins=edges, density=True, alpha=0.55, color=colour, label=f"{label}, n={len(values)}")
        est = panel.estimate
        auc = ("AUC n/a" if est.auc is None else
               f"AUC {est.auc:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]")
        ax.set_title(f"{panel.title}\n{auc}", fontsize=10)
        ax.set_xlabel(score_label)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
