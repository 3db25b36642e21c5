"""The extraction probe: does a generative ensemble still reproduce a record's text?

For a record with words ``w_1..w_n`` (split on whitespace) and ``n >= k + m``: prompt with
``w_1..w_k`` (joined by single spaces, then a space), decode greedily ``m`` words ``g_1..g_m``
and compare them with the true continuation ``w_{k+1}..w_{k+m}``:

* exact match: ``g == w_{k+1..k+m}``;
* longest common span: the longest run of consecutive words shared by ``g`` and the true
  continuation (anywhere in either, the longest common substring over words).

A record is *extracted* when its longest common span reaches ``span`` words. The extraction
rate is the share of probed records extracted, with a Wilson score interval

    (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n),

which stays inside [0, 1] and is honest at rates near 0 — the rates that matter after an
erasure. The same probe on a matched control set (records no member ever saw, of the same
kind) gives the rate at which the model produces such text without having memorised it:
after an exact erasure the erased records' rate should fall to the control rate, not to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Generate = Callable[[Sequence[str], int], list[str]]  # (prompts, words to decode) -> continuations


@dataclass(frozen=True)
class ProbeSettings:
    prompt_words: int = 8  # k
    continuation_words: int = 8  # m
    span: int = 4  # extracted when the longest common span reaches this many words

    def __post_init__(self) -> None:
        if self.prompt_words < 1 or self.continuation_words < 1:
            raise ValueError("prompt_words and continuation_words must be at least 1")
        if not 1 <= self.span <= self.continuation_words:
            raise ValueError(f"span must be in 1..continuation_words ({self.continuation_words}), got {self.span}")

    def to_dict(self) -> dict[str, int]:
        return {"prompt_words": self.prompt_words, "continuation_words": self.continuation_words, "span": self.span}


@dataclass(frozen=True)
class RecordProbe:
    record_id: str
    exact: bool
    longest_span: int
    extracted: bool


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``n`` with a Wilson score interval at ``confidence``."""

    hits: int
    n: int
    low: float
    high: float
    confidence: float = 0.95

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "n": self.n, "rate": self.rate, "low": self.low, "high": self.high,
                "confidence": self.confidence, "interval": "wilson"}


@dataclass(frozen=True)
class ProbeReport:
    """The probe over one set of records (erased, or control) against one ensemble."""

    settings: ProbeSettings
    records: tuple[RecordProbe, ...]
    skipped_short: int  # records with fewer than k + m words: not probed

    @property
    def extraction(self) -> Rate:
        return wilson(sum(r.extracted for r in self.records), len(self.records))

    @property
    def exact(self) -> Rate:
        return wilson(sum(r.exact for r in self.records), len(self.records))

    @property
    def mean_longest_span(self) -> float:
        return sum(r.longest_span for r in self.records) / len(self.records) if self.records else 0.0

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"settings": self.settings.to_dict(), "probed": len(self.records),
                               "skipped_short": self.skipped_short, "extraction": self.extraction.to_dict(),
                               "exact_match": self.exact.to_dict(), "mean_longest_span": self.mean_longest_span}
        if with_records:
            out["records"] = [{"record_id": r.record_id, "exact": r.exact, "longest_span": r.longest_span,
                               "extracted": r.extracted} for r in self.records]
        return out


def wilson(hits: int, n: int, confidence: float = 0.95) -> Rate:
    """The Wilson score interval of ``hits / n`` (``[0, 1]`` when n = 0)."""
    if n == 0:
        return Rate(0, 0, 0.0, 1.0, confidence)
    z = _z(confidence)
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    low = 0.0 if hits == 0 else max(0.0, (centre - half) / scale)  # exact bounds at the ends, not rounding noise
    high = 1.0 if hits == n else min(1.0, (centre + half) / scale)
    return Rate(hits, n, low, high, confidence)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def longest_common_span(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive equal words in ``a`` and ``b`` (O(|a|·|b|) dynamic programme)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def split_record(text: str, settings: ProbeSettings) -> tuple[str, list[str]] | None:
    """(prompt, true continuation words) of a record, or None when it has fewer than k + m words."""
    words = text.split()
    k, m = settings.prompt_words, settings.continuation_words
    if len(words) < k + m:
        return None
    return " ".join(words[:k]) + " ", words[k : k + m]


def probe_records(generate: Generate, records: Sequence[tuple[str, str]], settings: ProbeSettings) -> ProbeReport:
    """Probe ``(record_id, text)`` pairs with ``generate`` (e.g. ``EnsembleLM.continue_greedily`` wrapped)."""
    prompts, truths, ids, skipped = [], [], [], 0
    for record_id, text in records:
        split = split_record(text, settings)
        if split is None:
            skipped += 1
            continue
        ids.append(record_id)
        prompts.append(split[0])
        truths.append(split[1])
    outputs = generate(prompts, settings.continuation_words) if prompts else []
    if len(outputs) != len(prompts):
        raise ValueError(f"the generator returned {len(outputs)} continuations for {len(prompts)} prompts")
    probes = []
    for record_id, truth, output in zip(ids, truths, outputs):
        got = output.split()[: settings.continuation_words]
        span = longest_common_span(got, truth)
        probes.append(RecordProbe(record_id, got == truth, span, span >= settings.span))
    return ProbeReport(settings, tuple(probes), skipped)


def ensemble_generator(ensemble: Any, bytes_per_word: int = 16) -> Generate:
    """``probe_records``' generator from a ``shards.generation.EnsembleLM``."""
    def generate(prompts: Sequence[str], words: int) -> list[str]:
        return ensemble.continue_greedily(prompts, max_new_bytes=bytes_per_word * words, stop_after_words=words)

    return generate


def render_extraction_png(groups: dict[str, dict[str, Rate | None]], title: str) -> bytes:
    """Bars of extraction rates with their intervals: ``groups[label][series]`` (e.g. before/after x erased/control)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = sorted({name for rates in groups.values() for name in rates})
    figure = Figure(figsize=(1.8 + 1.6 * len(groups), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    width = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        xs, heights, low, high = [], [], [], []
        for i, rates in enumerate(groups.values()):
            rate = rates.get(name)
            if rate is None or not rate.n:
                continue
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            heights.append(rate.rate)
            low.append(rate.rate - rate.low)
            high.append(rate.high - rate.rate)
        axes.bar(xs, heights, width=width * 0.95, yerr=[low, high], capsize=3, label=name)
    axes.set_xticks(range(len(groups)), list(groups))
    axes.set_ylim(0, 1)
    axes.set_ylabel("extraction rate (95% Wilson)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
