"""What the console's request page shows, gathered from the same service functions
the API and the CLI use: status and timeline, matches per method with the policy's
thresholds, the retrain estimate, the review queue, and once completed the
certificate (verified with this service's own public key) and the membership probe.

Data minimisation: texts (samples, records) only while the request is open and only
for a reviewer; otherwise ids, scores and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from db.audit_queries import RequestTimeline, request_timeline
from db.models import Dataset
from db.settings import Settings
from dedup.policy import default_thresholds
from pipeline.certificate import CertificateVerdict, IssuedCertificate, stored_certificate, verify_certificate
from pipeline.erasure import per_method_counts, request_matches
from pipeline.lifecycle import CLOSED_STATES, REVIEWABLE_STATES, RequestStatus, describe_request
from pipeline.placement import request_retrain_estimates
from pipeline.review_queue import ReviewItem, review_items


@dataclass(frozen=True)
class MatchLine:
    match_ref: str
    dataset: str
    method: str
    metric: str
    score: float
    policy: str  # what the thresholds decided: erase or review
    final_decision: str | None
    erased: bool
    provenance: str


@dataclass(frozen=True)
class RequestView:
    status: RequestStatus
    timeline: RequestTimeline
    is_open: bool
    reviewable: bool
    texts_shown: bool
    methods: dict[str, dict[str, int]]  # method -> found / erased / kept
    matches: tuple[MatchLine, ...]
    thresholds: dict[str, dict]  # dataset -> the policy's thresholds
    retrain_estimate: dict[str, dict]  # dataset -> the estimate (shards, slices, samples, fraction)
    review: tuple[ReviewItem, ...]
    undecided: int
    certificate: IssuedCertificate | None
    certificate_verdict: CertificateVerdict | None
    probes: tuple[dict, ...]  # probe summaries (role, auc, sentence, ...), with "dataset"
    probe_plots: tuple[str, ...] = field(default=())  # datasets with a plot file


def request_view(settings: Settings, session: Session, request_id: str, *, reviewer: bool) -> RequestView:
    """The request page's content; texts only when ``reviewer`` and the request is open."""
    status = describe_request(session, request_id)
    is_open = status.state not in CLOSED_STATES
    texts_shown = reviewer and is_open and status.samples_purged_at is None
    matches = request_matches(session, request_id)
    names = {d: session.get(Dataset, d) for d in {m.dataset_id for m in matches}}
    lines = tuple(MatchLine(m.match_ref, names[m.dataset_id].name, m.method, m.metric, m.score, m.decision,
                            m.final_decision, m.erased_in_shard_version is not None, m.provenance or "seed")
                  for m in matches)
    review = tuple(review_items(session, request_id, with_texts=texts_shown, settings=settings))
    certificate = stored_certificate(session, request_id)
    verdict = None
    if certificate is not None:
        from pipeline.signing import load_or_create_signing_key

        verdict = verify_certificate(certificate.envelope, load_or_create_signing_key(settings).public_key_pem)
    from pipeline.membership import probe_rows, probe_summary, report_file  # imports torch: only when a page asks

    probes, plots = [], []
    for row in probe_rows(session, request_id):
        dataset = session.get(Dataset, row.dataset_id) if row.dataset_id is not None else None
        probes.append({**probe_summary(row), "dataset": dataset.name if dataset else None})
    for dataset in sorted({p["dataset"] for p in probes if p["dataset"]}):
        if report_file(settings, session, request_id, dataset) is not None:
            plots.append(dataset)
    return RequestView(
        status=status, timeline=request_timeline(session, request_id), is_open=is_open,
        reviewable=status.state in REVIEWABLE_STATES, texts_shown=texts_shown,
        methods=per_method_counts(matches), matches=lines,
        thresholds={d.name: default_thresholds(d.embedder).to_dict() for d in names.values()},
        retrain_estimate=request_retrain_estimates(settings, session, matches),
        review=review, undecided=sum(1 for item in review if item.decision is None),
        certificate=certificate, certificate_verdict=verdict, probes=tuple(probes), probe_plots=tuple(plots),
    )
