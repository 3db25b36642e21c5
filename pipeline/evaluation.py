"""Use the model: score the ensemble in service on a labelled file, or write its predictions.

Files are read with the ingest readers (``shards.sources``: JSONL, CSV, Parquet; the
same field names and row checks) and featurised with the dataset's own embedder
(``pipeline.locate.dataset_embedder``), so a file scores exactly as its records
would train. Labels are integers or the dataset's class names (``pipeline.labels``).
Nothing is written to the database: evaluation and prediction change nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from db.session import unit_of_work
from db.settings import Settings
from pipeline.database import open_database
from pipeline.erasure import dataset_or_fail
from pipeline.labels import vocabulary
from pipeline.locate import dataset_embedder
from pipeline.training import checkpoint_store, current_baseline, current_ensemble_row, read_manifest
from shards.checkpoints import CheckpointStore
from shards.ensemble import Ensemble, EnsembleMember, EnsembleVersion, aggregate
from shards.sources import FieldMap, SourceError, ValidationReport, clean_row, detect_format, read_rows


class EvaluationInputError(ValueError):
    """The file cannot be scored (bad rows, unknown classes): nothing was computed."""


@dataclass(frozen=True)
class _Model:
    dataset: str
    label_kind: str | None
    names: list[str]
    embedder: str
    feature_dim: int
    ensemble_version: str
    ensemble: EnsembleVersion
    store: CheckpointStore
    baseline: dict | None  # {"id", "checkpoint", "records_seen", "created_at"} of the newest live baseline


def _model(settings: Settings, dataset: str) -> _Model:
    engine = open_database(settings)
    try:
        with unit_of_work(engine) as session:
            ds = dataset_or_fail(session, dataset)
            row = current_ensemble_row(session, ds.id)
            if row is None:
                raise LookupError(f"dataset {dataset!r} has no trained ensemble; run `erasure train --dataset {dataset}`")
            baseline = current_baseline(session, ds.id)
            ensemble, store = read_manifest(settings, row, dataset), checkpoint_store(settings, dataset)
            _require_classifier(dataset, ensemble, store)
            return _Model(
                dataset, ds.label_kind, vocabulary(session, ds.id), ds.embedder, ds.feature_dim, row.version_id,
                ensemble, store,
                None if baseline is None else {"id": baseline.id, "checkpoint": baseline.checkpoint_key,
                                               "records_seen": baseline.records_seen,
                                               "created_at": baseline.created_at.isoformat()})
    finally:
        engine.dispose()


def _require_classifier(dataset: str, ensemble: EnsembleVersion, store: CheckpointStore) -> None:
    """Evaluate and predict score classifiers; a generative ensemble is refused with what to use."""
    from shards.families import family_named
    from shards.schedule import TrainConfig

    if not ensemble.members:
        return
    family = TrainConfig.from_dict(store.load(ensemble.members[0].checkpoint)["config"]).model.family
    if family_named(family).kind != "classifier":
        raise ValueError(f"dataset {dataset!r} serves a {family!r} ensemble ({family_named(family).kind}); "
                         "evaluate and predict score classifiers: use `erasure generate` for it")


def read_file(path: Path, fields: FieldMap, fmt: str | None = None) -> tuple[list[str], list[str], list]:
    """(ids, texts, raw labels) of every row, checked as at ingest; any bad row fails the whole file."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"no such file: {path}")
    fmt = detect_format(path, fmt)
    report = ValidationReport()
    ids, texts, labels = [], [], []
    for number, raw in read_rows(path, fmt):
        row = clean_row(number, raw, fields, fmt, report)
        if row is not None:
            ids.append(row.record_id)
            texts.append(row.text)
            labels.append(row.label)
    if report.error_count:
        raise EvaluationInputError(report.summary().replace("nothing was ingested", "nothing was scored"))
    if not ids:
        raise EvaluationInputError(f"{path} holds no records")
    return ids, texts, labels


def _label_indices(model: _Model, labels: list, num_classes: int) -> np.ndarray:
    if model.label_kind == "names":
        index = {n: i for i, n in enumerate(model.names)}
        unknown = sorted({str(v) for v in labels} - set(index))
        if unknown:
            raise EvaluationInputError(
                f"class(es) not in the vocabulary of {model.dataset!r}: {', '.join(repr(u) for u in unknown[:10])}; "
                f"the model knows {len(index)}: {', '.join(repr(n) for n in model.names[:10])}")
        return np.array([index[str(v)] for v in labels], dtype=np.int64)
    bad = [v for v in labels if isinstance(v, str) or not 0 <= int(v) < num_classes]
    if bad:
        raise EvaluationInputError(f"label(s) outside 0..{num_classes - 1} of {model.dataset!r}: "
                                   f"{', '.join(repr(b) for b in bad[:10])}")
    return np.array(labels, dtype=np.int64)


def _name(model: _Model, index: int) -> str | int:
    return model.names[index] if model.label_kind == "names" else int(index)


def _features(model: _Model, texts: list[str]) -> np.ndarray:
    return np.asarray(dataset_embedder(model.embedder, model.feature_dim).embed(texts), dtype=np.float32)


def per_class(truth: np.ndarray, predicted: np.ndarray, num_classes: int, name) -> list[dict]:  # noqa: ANN001
    """Support, recall (the class's accuracy), precision and F1 of every class present in truth or predictions."""
    rows = []
    for c in range(num_classes):
        support, chosen = int((truth == c).sum()), int((predicted == c).sum())
        if not support and not chosen:
            continue
        hits = int(((truth == c) & (predicted == c)).sum())
        recall = hits / support if support else None
        precision = hits / chosen if chosen else None
        f1 = (2 * precision * recall / (precision + recall)) if recall and precision else 0.0
        rows.append({"label": name(c), "index": c, "support": support, "predicted": chosen,
                     "recall": None if recall is None else round(recall, 6),
                     "precision": None if precision is None else round(precision, 6), "f1": round(f1, 6)})
    return rows


def evaluate_file(settings: Settings, dataset: str, path: Path, *, fields: FieldMap = FieldMap(),
                  fmt: str | None = None, device: str | None = "cpu") -> dict:
    """Accuracy of the ensemble in service on the labelled file (every aggregation, per class, per
    sub-model) and of the dataset's newest live baseline, if one was trained (``erasure train --baseline``)."""
    if fields.label_field is None:
        raise EvaluationInputError("evaluation needs labels: name the --label-field")
    model = _model(settings, dataset)
    ids, texts, raw = read_file(path, fields, fmt)
    ensemble = Ensemble(model.ensemble, model.store, device=device)
    truth = _label_indices(model, raw, ensemble.num_classes)
    features = _features(model, texts)
    probabilities = ensemble.predict_proba(features)
    method = model.ensemble.aggregation
    predicted = aggregate(probabilities, method)
    report = ensemble.evaluate(features, truth)
    out = {
        "dataset": dataset, "file": str(path), "records": len(ids), "ensemble_version": model.ensemble_version,
        "aggregation": method, "accuracy": round(float((predicted == truth).mean()), 6),
        "accuracy_by_aggregation": {k: round(v, 6) for k, v in report.accuracy.items()},
        "member_accuracy": {k: round(v, 6) for k, v in report.member_accuracy.items()},
        "per_class": per_class(truth, predicted, ensemble.num_classes, lambda c: _name(model, c)),
        "baseline": None,
    }
    if model.baseline is not None:
        single = EnsembleVersion((EnsembleMember("0", model.store.ref(model.baseline["checkpoint"])),))
        base = Ensemble(single, model.store, device=device)
        accuracy = float((aggregate(base.predict_proba(features)) == truth).mean())
        out["baseline"] = {**model.baseline, "accuracy": round(accuracy, 6),
                           "ensemble_gap_points": round(100 * (accuracy - out["accuracy"]), 3)}
    return out


def predict_file(settings: Settings, dataset: str, path: Path, out: Path | None, *,
                 fields: FieldMap = FieldMap(label_field=None), fmt: str | None = None,
                 device: str | None = "cpu") -> dict:
    """Predictions of the ensemble in service for every row of the file, as JSONL (``out``, or returned
    rows when None): ``{"id", "label", "label_index", "confidence"}`` (confidence: the mean probability
    of the chosen class). Labels in the file, if any field is named, are ignored."""
    model = _model(settings, dataset)
    ids, texts, _ = read_file(path, FieldMap(fields.id_field, fields.text_field, None, ()), fmt)
    ensemble = Ensemble(model.ensemble, model.store, device=device)
    probabilities = ensemble.predict_proba(_features(model, texts))
    predicted = aggregate(probabilities, model.ensemble.aggregation)
    confidence = probabilities.mean(axis=0)[np.arange(len(ids)), predicted]
    rows = [{"id": rid, "label": _name(model, int(p)), "label_index": int(p), "confidence": round(float(c), 6)}
            for rid, p, c in zip(ids, predicted, confidence)]
    summary = {"dataset": dataset, "file": str(path), "records": len(rows), "ensemble_version": model.ensemble_version,
               "aggregation": model.ensemble.aggregation}
    if out is None:
        return {**summary, "predictions": rows}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return {**summary, "out": str(out)}


__all__ = ["EvaluationInputError", "SourceError", "evaluate_file", "predict_file", "read_file"]
