"""Labels as people have them: integers, or class names through the dataset's label vocabulary.

A dataset's ``label_kind`` is fixed at its first labelled ingest: ``integer`` when every
label of that file is an integer (a CSV cell that reads as one counts), else ``names``.
Under ``names`` each class name has an index (``label_vocabulary``): the first file's
names in sorted order get 0..K-1; a later file's new names are refused unless the ingest
allows new labels, and then get the next indices in sorted order. The model's number of
classes is the vocabulary's size. Integer datasets keep their integers as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Dataset, utcnow
from db.training import LabelName

LABEL_KINDS = ("integer", "names")


class LabelVocabularyError(ValueError):
    """A file's labels do not fit the dataset's labels (bad input: nothing was written)."""


class LabelVocabularyChanged(RuntimeError):
    """Another ingest changed the vocabulary meanwhile (a race: run the ingest again)."""


def file_label_kind(labels: Iterable[int | str]) -> str | None:
    """``integer`` when every label is an integer, ``names`` when any is a string, None when there are none."""
    kind = None
    for label in labels:
        if isinstance(label, str):
            return "names"
        kind = "integer"
    return kind


def vocabulary(session: Session, dataset_id: int) -> list[str]:
    """The dataset's class names in index order (empty for an integer or unlabelled dataset)."""
    return list(session.scalars(select(LabelName.name).where(LabelName.dataset_id == dataset_id)
                                .order_by(LabelName.label_index)))


@dataclass(frozen=True)
class LabelPlan:
    """How one file's labels are stored: the dataset's label kind and, for names, every name's index."""

    kind: str | None
    indices: dict[str, int] = field(default_factory=dict)
    added: tuple[tuple[str, int], ...] = ()  # (name, index) new with this file

    def index(self, label: int | str | None) -> int | None:
        """The integer a label is trained as."""
        if label is None:
            return None
        if self.kind == "names":
            return self.indices[str(label)]
        return int(label)

    def summary(self) -> dict:
        return {"kind": self.kind, "classes": len(self.indices) if self.kind == "names" else None,
                "added": [name for name, _ in self.added]}


def plan_labels(session: Session, dataset: Dataset | None, labels: set[int | str], *,
                allow_new_labels: bool = False, dataset_name: str = "") -> LabelPlan:
    """The plan for a file whose (valid) labels are ``labels``, before anything is written.

    Raises LabelVocabularyError for class names in an integer dataset, and for names the
    dataset has not seen unless ``allow_new_labels``."""
    name = dataset.name if dataset is not None else dataset_name
    kind = dataset.label_kind if dataset is not None else None
    seen_kind = file_label_kind(labels)
    if seen_kind is None:
        return LabelPlan(kind)
    if kind is None:
        kind = seen_kind
    if kind == "integer":
        names = sorted(str(label) for label in labels if isinstance(label, str))
        if names:
            raise LabelVocabularyError(
                f"dataset {name!r} has integer labels, but this file has class names "
                f"({', '.join(repr(n) for n in names[:5])}{', …' if len(names) > 5 else ''}); "
                "give integer labels, or ingest named labels into a new --dataset")
        return LabelPlan("integer")
    known = {n: i for i, n in enumerate(vocabulary(session, dataset.id))} if dataset is not None else {}
    new = sorted({str(label) for label in labels} - set(known))
    if new and known and not allow_new_labels:
        raise LabelVocabularyError(
            f"dataset {name!r} knows {len(known)} class(es); this file has {len(new)} new one(s): "
            f"{', '.join(repr(n) for n in new[:10])}{', …' if len(new) > 10 else ''}. A new class changes "
            "the model's outputs: pass --allow-new-labels to add them, or fix the labels")
    added = tuple((n, len(known) + i) for i, n in enumerate(new))
    return LabelPlan("names", {**known, **dict(added)}, added)


def record_labels(session: Session, dataset: Dataset, plan: LabelPlan) -> None:
    """Store the plan's label kind and new names, in the ingest's committing transaction; raise
    LabelVocabularyChanged if another ingest changed the vocabulary since the plan was made."""
    if plan.kind is None:
        return
    if dataset.label_kind is None:
        dataset.label_kind = plan.kind
    elif dataset.label_kind != plan.kind:
        raise LabelVocabularyChanged(f"dataset {dataset.name!r} got {dataset.label_kind} labels from another "
                                     "ingest meanwhile; nothing was ingested: run the ingest again")
    if plan.kind != "names":
        return
    current = {n: i for i, n in enumerate(vocabulary(session, dataset.id))}
    if len(current) != len(plan.indices) - len(plan.added) or any(plan.indices.get(n) != i for n, i in current.items()):
        raise LabelVocabularyChanged(f"the label vocabulary of {dataset.name!r} changed while this file was being "
                                     "ingested; nothing was ingested: run the ingest again")
    now = utcnow()
    for label_name, index in plan.added:
        session.add(LabelName(dataset_id=dataset.id, label_index=index, name=label_name, created_at=now))
    session.flush()
