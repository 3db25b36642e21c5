"""Placement by data subject: one person's records in one shard and one late slice.

A GDPR request erases a *person*. Under record placement (``shards.assign``,
mode ``record``) a person's k records land in ~min(k, S) shards at random
slices and a request costs ``expected_retrain_fraction(S, R, k)`` of a full
retraining (0.49 for S=8, R=4 and the k of real requests). Under subject
placement (mode ``subject``) a request touches one shard from one slice.

**Subjects.** Records are linked by union-find over their keyed identifier
hashes of the *linking* kinds (email, user_id, phone by default; never a name,
which many people share), across the batch and the records already in the
dataset. An identifier value carried by more than ``max_records_per_identifier``
records (batch + dataset: a shared support address, say) links nothing and is
reported as a hub. A record without a linking identifier that is a verified
near-copy (exact Jaccard >= the erase threshold, found by ``dedup``) of another
record joins that record's subject, so copies travel with their original. Of
several targets it joins one: a record with identifiers (or already in the
dataset) before another copy, then the highest Jaccard, then the smallest id;
so two identical copies of one original both join the original, and a copy
of a copy follows it. One edge per copy: a copy never merges two subjects. Everything else is
its own subject. The result is a partition of the batch and so does not
depend on file order.

**Bins.** With N = live records after the batch (dataset + batch), S shards,
R slices and slack e (0.05), every (shard, slice) bin holds at most

    B = ceil((1 + e) · N / (S·R))

records placed by this batch (records already there never move; a bin already
above B gets nothing new). Hence every shard the batch adds to ends with at most
``max(R·B, its size before)`` records, and since R·B < (1+e)·N/S + R::

    max shard / mean shard <= 1 + e + R·S/N        (<= 1.1 once N >= 20·R·S)

unless a shard was above that before the batch (erasures shrink the mean;
nothing is ever moved to rebalance). Σ bins' room >= (1+e)·N - N_before >= the
batch, so every record finds a place.

**Slices.** New subjects are taken in order of how likely a request is to
reach them: first those carrying any identifier (a request names a person by
identifiers), smallest first; then the anonymous ones (no identifier of any
kind, not the copy of anyone's record), which only a requester's sample can
reach. The last slice takes the first subjects of that order up to its room
(summed over shards), the slice before it the next ones, and so on. Within a slice, subjects go largest first into the shard
with the most room there (worst-fit decreasing: shards stay balanced and
whole subjects fit); one that fits no shard of its slice moves to the slice
before. With bins of equal size, putting the subjects with the fewest records
into the latest slices puts the most *persons* there, which is what minimises
the mean cost per request when every person is equally likely to ask
(exchange argument: swapping a small late subject with a larger early one
moves more persons early than it moves late). Subjects already in the dataset
(an identifier or copy target seen before) go first, whole into the latest
slice with room of the shard holding most of their earlier records; a subject
that fits in no bin spreads over the latest slices with room of the shard
with the most room, then of the next one. Ties go by the placement key
``xxh3_64(seed:smallest record id)``, so the result is deterministic.

**Cost.** With the paper's schedule (equal epochs per slice on cumulative data)
and equal slices, a subject in slice i (0-based) of one of S equal shards costs

    (Σ_{r=i..R-1} (r+1)) / (R(R+1)/2) / S = (R - i)(R + i + 1) / (R(R+1)S)

of a full retraining: 2/((R+1)S) in the last slice (0.05 for S=8, R=4), 1/S
in the first (0.125). Bins of equal size hold equal numbers of records, so for
persons of equal size the mean over persons is the paper's (2/3 + 1/(3R))/S
(0.094 for S=8, R=4; (R+1)/(2RS) = 0.078 under the default equal-samples
schedule) whatever the placement inside the shard, when every record is some
person's: that is the floor for data made only of persons, for any placement.
Smallest-first lowers it by as much as subject sizes vary, and anonymous
records, which fill the early slices, lower it by as much again as they take
room there. The exact cost of a request is
``shards.retrain.retrain_estimate`` (the planner's own sums).

**Order.** Within a slice, records keep the hash-derived order key of
``shards.assign.place_record``, so removing records leaves every other record's
position in its slice unchanged (what exact SISA retraining needs), under
either placement.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from shards.assign import Placement, place_record

PLACEMENT_MODES = ("subject", "record")
DEFAULT_LINKING_KINDS = ("email", "user_id", "phone")
DEFAULT_MAX_RECORDS_PER_IDENTIFIER = 1000
DEFAULT_SLACK = 0.05
# the default erase threshold of verified Jaccard (dedup.policy.Thresholds.jaccard_erase; shards imports no dedup)
DEFAULT_COPY_JACCARD = 0.8

IdentifierKey = tuple[str, str]  # (kind, keyed hash)


@dataclass(frozen=True, order=True)
class Place:
    shard: int
    slice: int


@dataclass(frozen=True)
class BatchRecord:
    """A record to place: its id and its (kind, keyed hash) identifiers (any kinds; only linking ones link)."""

    record_id: str
    identifiers: tuple[IdentifierKey, ...] = ()


@dataclass(frozen=True)
class NearCopy:
    """A verified near-copy: ``copy_id`` (in the batch) has Jaccard ``jaccard`` to ``original_id``
    (in the batch or already in the dataset)."""

    copy_id: str
    original_id: str
    jaccard: float


@dataclass(frozen=True)
class IdentifierPlace:
    """Where an identifier value's records already are: the place holding most of them, and how many there are."""

    place: Place
    records: int


@dataclass(frozen=True)
class ExistingState:
    """What the dataset already holds (live records only; erased ones hold no room)."""

    identifiers: Mapping[IdentifierKey, IdentifierPlace] = field(default_factory=dict)
    records: Mapping[str, Place] = field(default_factory=dict)  # at least every near-copy target outside the batch
    counts: Mapping[Place, int] = field(default_factory=dict)  # live records per (shard, slice)


@dataclass(frozen=True)
class SubjectOptions:
    linking_kinds: tuple[str, ...] = DEFAULT_LINKING_KINDS
    max_records_per_identifier: int = DEFAULT_MAX_RECORDS_PER_IDENTIFIER
    min_copy_jaccard: float = DEFAULT_COPY_JACCARD
    slack: float = DEFAULT_SLACK

    def __post_init__(self) -> None:
        if self.max_records_per_identifier < 2:
            raise ValueError(f"max_records_per_identifier must be at least 2, got {self.max_records_per_identifier}")
        if not 0.0 < self.min_copy_jaccard <= 1.0:
            raise ValueError(f"min_copy_jaccard must be in (0, 1], got {self.min_copy_jaccard}")
        if not 0.0 <= self.slack <= 1.0:
            raise ValueError(f"slack must be in [0, 1], got {self.slack}")
        if "name" in self.linking_kinds:
            raise ValueError("names do not link records (many people share one); link by email, user_id or phone")


@dataclass(frozen=True)
class HubIdentifier:
    """An identifier value that links too many records to be one person's; it linked nothing."""

    kind: str
    keyed_hash: str
    records: int


@dataclass(frozen=True)
class SubjectPlacement:
    places: dict[str, Placement]  # record id -> shard, slice, order key
    subjects: int  # subjects in the batch
    linked_records: int  # records in a subject of two or more batch records
    copies_joined: int  # identifier-less records that joined a near-copy target's subject
    joined_existing: int  # subjects that joined records already in the dataset
    spread_subjects: int  # subjects placed over more than one (shard, slice)
    hubs: tuple[HubIdentifier, ...]
    bin_capacity: int

    def report(self) -> dict:
        """Counts and keyed hashes only (fit for the audit log)."""
        return {"subjects": self.subjects, "linked_records": self.linked_records,
                "copies_joined": self.copies_joined, "joined_existing": self.joined_existing,
                "spread_subjects": self.spread_subjects, "bin_capacity": self.bin_capacity,
                "hubs": [{"kind": h.kind, "keyed_hash": h.keyed_hash, "records": h.records} for h in self.hubs]}


def summarise_identifiers(rows: Iterable[tuple[str, str, int, int]]) -> dict[IdentifierKey, IdentifierPlace]:
    """(kind, keyed hash, shard, slice) of live records -> per value, its most common place and record count.

    Ties between places go to the smallest (shard, slice), so the result does not depend on row order."""
    per: dict[IdentifierKey, Counter] = {}
    for kind, digest, shard, slc in rows:
        per.setdefault((kind, digest), Counter())[Place(int(shard), int(slc))] += 1
    return {key: IdentifierPlace(min(c, key=lambda p: (-c[p], p)), sum(c.values())) for key, c in per.items()}


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller index is the root: order-free result


def bin_capacity(total_records: int, n_shards: int, n_slices: int, slack: float = DEFAULT_SLACK) -> int:
    """B = ceil((1 + slack) · N / (S·R)): the most records one batch fills a (shard, slice) bin up to."""
    return max(1, math.ceil((1.0 + slack) * total_records / (n_shards * n_slices) - 1e-9))


def place_subjects(
    records: Sequence[BatchRecord],
    n_shards: int,
    n_slices: int,
    seed: int,
    *,
    near_copies: Iterable[NearCopy] = (),
    existing: ExistingState = ExistingState(),
    options: SubjectOptions = SubjectOptions(),
) -> SubjectPlacement:
    """Place a batch of new records by subject (see the module doc); pure and deterministic.

    The result depends on the set of records, copies and existing state, not on their order."""
    records = sorted(records, key=lambda r: r.record_id)
    index = {r.record_id: i for i, r in enumerate(records)}
    if len(index) != len(records):
        raise ValueError("record ids in a batch must be unique")
    linking = set(options.linking_kinds)

    # identifier values -> the batch rows carrying them; hubs link nothing
    carriers: dict[IdentifierKey, list[int]] = {}
    for i, rec in enumerate(records):
        for key in dict.fromkeys(k for k in rec.identifiers if k[0] in linking):
            carriers.setdefault(key, []).append(i)
    hubs = []
    for key in sorted(carriers):
        earlier = existing.identifiers.get(key)
        count = len(carriers[key]) + (earlier.records if earlier else 0)
        if count > options.max_records_per_identifier:
            hubs.append(HubIdentifier(key[0], key[1], count))
    hub_keys = {(h.kind, h.keyed_hash) for h in hubs}

    uf = _UnionFind(len(records))
    anchors: dict[int, Counter] = {}  # batch row -> existing places it links to (weighted by their records)
    linked_rows: set[int] = set()
    for key, rows in carriers.items():
        if key in hub_keys:
            continue
        linked_rows.update(rows)
        for i in rows[1:]:
            uf.union(rows[0], i)
        earlier = existing.identifiers.get(key)
        if earlier is not None:
            anchors.setdefault(rows[0], Counter())[earlier.place] += earlier.records

    # identifier-less records join their best verified copy target
    best: dict[int, tuple[float, str]] = {}
    for copy in near_copies:
        i = index.get(copy.copy_id)
        if i is None:
            raise ValueError(f"near-copy {copy.copy_id!r} is not in the batch")
        if i in linked_rows or copy.jaccard < options.min_copy_jaccard or copy.original_id == copy.copy_id:
            continue
        if copy.original_id not in index and copy.original_id not in existing.records:
            raise ValueError(f"near-copy target {copy.original_id!r} is neither in the batch nor in existing.records")
        # an identified original (or a record already placed) before another copy, then the closest
        j = index.get(copy.original_id)
        candidate = (0 if j is None or j in linked_rows else 1, -copy.jaccard, copy.original_id)
        if i not in best or candidate < best[i]:
            best[i] = candidate
    copies_joined = 0
    for i, (_, _, target) in sorted(best.items()):
        copies_joined += 1
        j = index.get(target)
        if j is not None:
            uf.union(i, j)
        else:
            anchors.setdefault(i, Counter())[existing.records[target]] += 1

    members: dict[int, list[int]] = {}
    for i in range(len(records)):
        members.setdefault(uf.find(i), []).append(i)
    subject_anchor: dict[int, Counter] = {}
    for i, places in anchors.items():
        subject_anchor.setdefault(uf.find(i), Counter()).update(places)

    total = sum(existing.counts.values()) + len(records)
    capacity = bin_capacity(total, n_shards, n_slices, options.slack)
    bins = _Bins(n_shards, n_slices, capacity, existing.counts)
    places: dict[str, Placement] = {}
    spread = 0

    def key_of(root: int) -> int:
        return xxhash.xxh3_64_intdigest(f"{seed}:{records[root].record_id}".encode())

    def put(rows: list[int], assignment: list[tuple[Place, int]]) -> None:
        nonlocal spread
        spread += len(assignment) > 1
        ids = sorted(records[i].record_id for i in rows)
        at = 0
        for place, count in assignment:
            for rid in ids[at:at + count]:
                order_key = place_record(rid, seed, n_shards, n_slices).order_key
                places[rid] = Placement(shard=place.shard, slice=place.slice, order_key=order_key)
            at += count

    # subjects with earlier records first, to the shard holding most of those (then smallest place)
    anchored = sorted(subject_anchor, key=lambda root: (len(members[root]), key_of(root), root))
    for root in anchored:
        counter = subject_anchor[root]
        home = min(counter, key=lambda p: (-counter[p], p)).shard
        put(members[root], bins.take_in_shard(home, len(members[root])))

    # new subjects into the latest slices with room: those a request can name (any identifier), smallest
    # first, then the anonymous ones (no identifier; reachable only as nobody's copy), into the earliest
    identified = {uf.find(i) for i, rec in enumerate(records) if rec.identifiers}
    fresh = sorted((root for root in members if root not in subject_anchor),
                   key=lambda root: (root not in identified, len(members[root]), key_of(root), root))
    for root, assignment in bins.pack([(root, len(members[root]), key_of(root)) for root in fresh]):
        put(members[root], assignment)

    return SubjectPlacement(
        places=places, subjects=len(members),
        linked_records=sum(len(m) for m in members.values() if len(m) > 1),
        copies_joined=copies_joined, joined_existing=len(subject_anchor), spread_subjects=spread,
        hubs=tuple(hubs), bin_capacity=capacity,
    )


class _Bins:
    """Room per (shard, slice) bin, and the search for the latest slice with room."""

    def __init__(self, n_shards: int, n_slices: int, capacity: int, counts: Mapping[Place, int]) -> None:
        self.S, self.R = n_shards, n_slices
        self.room = [[capacity] * n_slices for _ in range(n_shards)]
        for place, count in counts.items():
            if not (0 <= place.shard < n_shards and 0 <= place.slice < n_slices):
                raise ValueError(f"existing place {place} is outside the layout {n_shards}x{n_slices}")
            self.room[place.shard][place.slice] = max(0, capacity - count)

    def shard_room(self, shard: int) -> int:
        return sum(self.room[shard])

    def _fill(self, shard: int, size: int) -> list[tuple[Place, int]]:
        """Up to ``size`` records into ``shard``: the latest slice with room for all, else its latest slices."""
        for r in range(self.R - 1, -1, -1):
            if self.room[shard][r] >= size:
                self._use(shard, r, size)
                return [(Place(shard, r), size)]
        out = []
        for r in range(self.R - 1, -1, -1):
            n = min(size, self.room[shard][r])
            if n:
                self._use(shard, r, n)
                out.append((Place(shard, r), n))
                size -= n
            if not size:
                break
        return out

    def _use(self, shard: int, r: int, n: int) -> None:
        self.room[shard][r] -= n

    def _spill(self, size: int, prefer: int, first: list[tuple[Place, int]]) -> list[tuple[Place, int]]:
        """The rest of an oversized subject: shards by most room, then cyclic distance from ``prefer``."""
        out = list(first)
        left = size - sum(n for _, n in first)
        while left:
            shard = min(range(self.S), key=lambda s: (-self.shard_room(s), (s - prefer) % self.S))
            if self.shard_room(shard) == 0:
                raise AssertionError("no room left: the bins hold fewer records than the batch")  # see the module doc
            got = self._fill(shard, left)
            out += got
            left -= sum(n for _, n in got)
        return out

    def take_in_shard(self, shard: int, size: int) -> list[tuple[Place, int]]:
        got = self._fill(shard, size)
        return self._spill(size, shard, got) if sum(n for _, n in got) < size else got

    def pack(self, subjects: list[tuple[int, int, int]]) -> list[tuple[int, list[tuple[Place, int]]]]:
        """Place (id, size, key) subjects given smallest first: slice R-1 takes the smallest up to its room,
        then R-2 the next, and so on; within a slice, largest first into the shard with the most room there
        (worst-fit decreasing: balanced, few leftovers). A subject that fits no shard of its slice moves to
        the slice before; what fits nowhere in slice 0 spreads (:meth:`_spill`)."""
        out: list[tuple[int, list[tuple[Place, int]]]] = []
        at, carried = 0, []
        for r in range(self.R - 1, -1, -1):
            budget = sum(self.room[s][r] for s in range(self.S)) - sum(size for _, size, _ in carried)
            pool = carried
            while at < len(subjects) and (r == 0 or subjects[at][1] <= budget):
                budget -= subjects[at][1]
                pool.append(subjects[at])
                at += 1
            heap = [(-self.room[s][r], s) for s in range(self.S)]
            heapq.heapify(heap)
            carried = []
            for sid, size, key in sorted(pool, key=lambda x: (-x[1], x[2], x[0])):
                room, shard = heap[0]
                if -room >= size:
                    self._use(shard, r, size)
                    heapq.heapreplace(heap, (-self.room[shard][r], shard))
                    out.append((sid, [(Place(shard, r), size)]))
                else:
                    carried.append((sid, size, key))
        for sid, size, key in carried:  # larger than any room left in a single bin
            shard = min(range(self.S), key=lambda s: (-self.shard_room(s), (s - key) % self.S))
            out.append((sid, self._spill(size, key % self.S, self._fill(shard, size))))
        return out


def placement_skew(sizes: Iterable[int]) -> float:
    """max / mean of shard sizes (1.0 is perfect balance)."""
    values = list(sizes)
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else 1.0
