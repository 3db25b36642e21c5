"""Screening texts (e.g. model outputs) against a dataset's tombstones.

The tombstones are the MinHash signatures of erased records
(``pipeline.locate.tombstone_path``). A text whose estimated Jaccard similarity
with a tombstone reaches ``min_jaccard`` is reported as matching erased content.
This is an aid for output filtering, not a guarantee: the estimates have a
standard error (about 0.035 at J = 0.8 with 128 permutations) and MinHash does
not see paraphrases.

The screened texts are only turned into signatures in memory: they are never
stored, logged, or returned.

The answer says "blocked" (``matches_erased_content``) and gives an opaque
``reference`` for the best matching tombstone, never a request id or record id:
a screen caller (often a model-serving filter) must not learn whose data was
erased, nor be able to link an output to a person's request. The reference is
``scr_`` + HMAC-SHA256(secret key, dataset, tombstone key) (128 bits, hex): nothing
is stored for it, the same tombstone always gives the same reference, and only
the key holder can map it back (:func:`resolve_screen_reference`, which the API
offers to the audit scope alone).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select

from db.lineage import get_dataset
from db.models import Dataset
from db.session import unit_of_work
from db.settings import Settings
from dedup.policy import DEFAULT_SCREEN_JACCARD
from pipeline.database import open_database

if TYPE_CHECKING:  # numpy and the MinHash code load with the tombstones, when a screen runs
    from dedup.tombstones import TombstoneSet

MAX_SCREEN_TEXTS = 100
MAX_PROMPT_CHARS = 2_000  # /v1/generate (pipeline.generation): a prompt's length
MAX_WORDS = 64  # and the most words it may ask for
MAX_SCREEN_TEXT_CHARS = 20_000
REFERENCE_PATTERN = r"^scr_[0-9a-f]{32}$"
SCREEN_NOTE = (
    "This is an aid for output filtering based on MinHash estimates of the similarity to erased records; "
    "it is not a guarantee that a text does or does not contain erased content."
)


class UnknownDataset(LookupError):
    """No dataset of that name."""


@dataclass(frozen=True)
class TextScreen:
    index: int
    matches_erased_content: bool
    best_estimated_jaccard: float | None
    reference: str | None = None  # opaque: see resolve_screen_reference


@dataclass(frozen=True)
class ScreenReference:
    """What a screen reference stands for (audit scope only)."""

    reference: str
    dataset: str
    request_id: str
    shard: int | None
    record_id: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def screen_reference(secret: bytes, dataset: str, tombstone_key: str) -> str:
    """The opaque reference a screen answer gives for a tombstone: ``scr_`` + 32 hex digits."""
    message = b"screen-reference:" + dataset.encode("utf-8") + b"\x00" + tombstone_key.encode("utf-8")
    return "scr_" + hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class ScreenResult:
    dataset: str
    results: list[TextScreen]
    tombstones: int
    note: str = SCREEN_NOTE


def _tombstones(settings: Settings, dataset: str) -> TombstoneSet | None:
    """The dataset's tombstones, from the process's artefact cache while the file is unchanged
    and the key the same (the LSH bands built on the set are cached with it)."""
    # pipeline.locate (pyarrow, FAISS) and the cache (numpy) load here, not at import: the API
    # schemas, and every CLI command using them, import this module for its limits only
    from pipeline.artefact_cache import ARTEFACTS
    from shards.files import file_stamp
    from pipeline.locate import dataset_minhash, load_tombstones, refresh_shared_tombstones, tombstone_path

    refresh_shared_tombstones(settings, dataset)  # a storage URL: the copy follows the database's row
    path = tombstone_path(settings, dataset)
    stamp = file_stamp(path)
    if stamp is None:
        return None
    # a file is replaced atomically, never rewritten in place: a new file is a new inode
    return ARTEFACTS.get(("tombstones", str(path)), (stamp, dataset_minhash(settings, dataset).key_id),
                         lambda: load_tombstones(settings, dataset))


dataset_tombstones = _tombstones  # the serving screens (pipeline/generation.py) read the same cached set


def screen_texts(
    settings: Settings,
    dataset: str,
    texts: Sequence[str],
    min_jaccard: float = DEFAULT_SCREEN_JACCARD,
    *,
    engine: Engine | None = None,
) -> ScreenResult:
    """One result per text, in order: does it match a tombstone of ``dataset``
    (estimated Jaccard >= ``min_jaccard``), the best estimate and the opaque
    reference of the best matching tombstone. ``UnknownDataset`` if there is no
    such dataset; a dataset without tombstones matches nothing."""
    if isinstance(texts, str):
        raise ValueError("screen_texts takes a sequence of texts; wrap a single text in a list")
    if not 0.0 < min_jaccard < 1.0:
        raise ValueError(f"min_jaccard must be in (0, 1), got {min_jaccard}")
    engine = engine if engine is not None else open_database(settings)
    with unit_of_work(engine) as session:
        if get_dataset(session, dataset) is None:
            raise UnknownDataset(f"no dataset named {dataset!r}")
    tombstones = _tombstones(settings, dataset)
    best: dict[int, tuple[float, str]] = {}
    if tombstones is not None and len(tombstones) and texts:
        for hit in tombstones.screen(list(texts), min_jaccard):
            j = float(hit.estimated_jaccard)
            # the best match; among equal estimates the smallest key, so the answer does not depend on file order
            if hit.text_index not in best or (-j, hit.key) < (-best[hit.text_index][0], best[hit.text_index][1]):
                best[hit.text_index] = (j, hit.key)
    secret = settings.secret_key_bytes() if best else b""
    results = [
        TextScreen(i, True, round(best[i][0], 4), screen_reference(secret, dataset, best[i][1])) if i in best
        else TextScreen(i, False, None, None)
        for i in range(len(texts))
    ]
    return ScreenResult(dataset, results, len(tombstones) if tombstones is not None else 0)


def resolve_screen_reference(settings: Settings, reference: str, *, engine: Engine | None = None) -> ScreenReference:
    """The dataset, request and (when the tombstone key names them) shard and record behind a
    screen reference; ``LookupError`` if no tombstone of any dataset has it, ``ValueError`` if
    it is not shaped like one."""
    if not isinstance(reference, str) or not re.match(REFERENCE_PATTERN, reference):
        raise ValueError("a screen reference is 'scr_' followed by 32 lower-case hex digits")
    engine = engine if engine is not None else open_database(settings)
    with unit_of_work(engine) as session:
        names = list(session.scalars(select(Dataset.name).order_by(Dataset.name)))
    secret = settings.secret_key_bytes()
    for name in names:
        tombstones = _tombstones(settings, name)
        for key in tombstones.keys if tombstones is not None else ():
            if hmac.compare_digest(screen_reference(secret, name, key), reference):
                parts = key.split("/", 2)
                if len(parts) == 3 and parts[1].isdigit():
                    return ScreenReference(reference, name, parts[0], int(parts[1]), parts[2])
                return ScreenReference(reference, name, key, None, None)
    raise LookupError("no tombstone has this screen reference (its erasure may belong to another secret key)")
