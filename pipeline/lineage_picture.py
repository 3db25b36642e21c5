"""A dataset's lineage as an inline SVG, drawn on the server (no script, no library):

    source files → shard versions → checkpoints (per shard version) → ensemble versions

Four columns; an edge says "was made from". Shard versions written by ingest come
from the source files; a version written by an erasure comes from the shard's
previous version (dashed). A checkpoint box stands for the checkpoints trained on
one shard version; it feeds every shown ensemble version that has one of them as a member.
"""

from __future__ import annotations

from html import escape

from db.console_queries import DatasetLineage

_BOX_W, _BOX_H, _GAP = 190, 34, 10
_COLUMNS = (10, 250, 490, 730)
_TITLES = ("source files", "shard versions", "checkpoints", "ensemble versions")


def _box(x: int, y: int, title: str, sub: str, css: str) -> str:
    return (f'<g class="{css}"><rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="5"/>'
            f'<text x="{x + 8}" y="{y + 14}" class="t">{escape(title)}</text>'
            f'<text x="{x + 8}" y="{y + 28}" class="s">{escape(sub)}</text></g>')


def _edge(a: tuple[int, int], b: tuple[int, int], dashed: bool = False) -> str:
    (x1, y1), (x2, y2) = a, b
    mid = (x1 + x2) // 2
    style = ' stroke-dasharray="4 3"' if dashed else ""
    return f'<path d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}" class="edge"{style}/>'


def lineage_svg(lineage: DatasetLineage) -> str:
    """The picture; its height grows with the number of shard versions."""
    rows: dict[str, list[tuple[str, str, str]]] = {c: [] for c in _TITLES}
    pos: dict[str, tuple[int, int]] = {}

    def place(column: int, key: str, title: str, sub: str, css: str) -> None:
        y = 28 + len(rows[_TITLES[column]]) * (_BOX_H + _GAP)
        rows[_TITLES[column]].append((key, title, sub))
        pos[key] = (_COLUMNS[column], y)
        boxes.append(_box(_COLUMNS[column], y, title, sub, css))

    boxes: list[str] = []
    edges: list[str] = []
    current = lineage.current_ensemble
    in_service = set(current.member_versions.items()) if current else set()
    for f in lineage.source_files:
        place(0, f"f{f.id}", f.name[:26], f"{f.row_count:,} rows · {f.sha256[:10]}", "file")
    for v in lineage.shard_versions:
        css = "version purged" if v.files_purged else ("version live" if (v.shard, v.version) in in_service
                                                         else "version")
        place(1, f"v{v.shard}.{v.version}", f"shard {v.shard} · v{v.version}",
              f"{v.row_count:,} rows" + (" · files purged" if v.files_purged else ""), css)
        if v.checkpoints:
            place(2, f"c{v.shard}.{v.version}", f"{v.checkpoints} checkpoint(s)", f"shard {v.shard} v{v.version}",
                  "checkpoint")
    for e in lineage.ensembles:
        live = current is not None and e.version_id == current.version_id
        place(3, f"e{e.version_id}", f"ensemble {e.version_id[:12]}", ("in service · " if live else "")
              + f"{len(e.members)} member(s)", "ensemble live" if live else "ensemble")

    def right(key: str) -> tuple[int, int]:
        x, y = pos[key]
        return x + _BOX_W, y + _BOX_H // 2

    def left(key: str) -> tuple[int, int]:
        x, y = pos[key]
        return x, y + _BOX_H // 2

    previous: dict[int, str] = {}
    for v in lineage.shard_versions:
        key = f"v{v.shard}.{v.version}"
        source = v.created_by.removeprefix("ingest:source_file:") if v.created_by.startswith("ingest:") else None
        if source is not None and f"f{source}" in pos:
            edges.append(_edge(right(f"f{source}"), left(key)))
        elif v.shard in previous:
            edges.append(_edge((pos[previous[v.shard]][0] + _BOX_W // 2, pos[previous[v.shard]][1] + _BOX_H),
                               (pos[key][0] + _BOX_W // 2, pos[key][1]), dashed=True))
        previous[v.shard] = key
        if f"c{v.shard}.{v.version}" in pos:
            edges.append(_edge(right(key), left(f"c{v.shard}.{v.version}")))
    for e in lineage.ensembles:
        for shard, version in sorted(e.member_versions.items()):
            if f"c{shard}.{version}" in pos:
                edges.append(_edge(right(f"c{shard}.{version}"), left(f"e{e.version_id}")))

    height = 40 + max((len(r) for r in rows.values()), default=1) * (_BOX_H + _GAP)
    width = _COLUMNS[-1] + _BOX_W + 10
    titles = "".join(f'<text x="{x}" y="16" class="h">{t}</text>' for x, t in zip(_COLUMNS, _TITLES))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" aria-label="lineage of dataset {escape(lineage.name)}" class="lineage">'
            f"<title>lineage of dataset {escape(lineage.name)}</title>{titles}{''.join(edges)}{''.join(boxes)}</svg>")
