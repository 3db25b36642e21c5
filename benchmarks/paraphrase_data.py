"""Build the real-paraphrase calibration set from two independent English Bible translations.

Source: Debian's ``sword-text-kjv`` (King James Version, 1611/1769) and
``sword-text-web`` (World English Bible, 2015), read with ``diatheke``
(``apt-get install sword-text-kjv sword-text-web diatheke``). Both texts are in
the public domain (see /usr/share/doc/sword-text-*/copyright), so the derived
file may be redistributed. The same verse in the two translations is a
human-written paraphrase (same meaning, other words, e.g. "Verily, verily, I say
unto thee" / "Most certainly I tell you"); the neighbouring verses of the same
chapter are hard negatives (same topic, other content).

Output (``tests/resources/paraphrase/bible_kjv_web.jsonl.gz``, one JSON object a
line): ``book``, ``book_no``, ``chapter``, ``verse``, ``split``, ``kjv``, ``web``.
Per book, ``--chapters`` whole chapters are taken (chosen by a seeded draw), so
every query verse has its chapter's other verses in the corpus as distractors.

Split by book, not by pair (no leakage through parallel passages or a book's
style): books alternate in canonical order between ``tune`` and ``check``.
Dropped: verses under 6 words in either translation, and verses whose KJV or
WEB text occurs elsewhere in the chosen set (refrains such as "And the LORD
spake unto Moses, saying," would have many true answers).

Usage: ``python benchmarks/paraphrase_data.py [--chapters 2] [--out PATH]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel",
    "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians",
    "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "I Thessalonians",
    "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews", "James", "I Peter",
    "II Peter", "I John", "II John", "III John", "Jude", "Revelation of John",
)
MODULES = {"kjv": "engKJV2006eb", "web": "engWEB2015eb"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests/resources/paraphrase/bible_kjv_web.jsonl.gz"
MIN_WORDS = 6

_VERSE = re.compile(r"^\s*(?P<book>.+?) (?P<chapter>\d+):(?P<verse>\d+): (?P<text>.*)$")
_STRONGS = re.compile(r"\s*<[GH]\d+[a-z]?>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?’”)])")


def clean(text: str) -> str:
    """Plain text: Strong's numbers and pilcrows out, whitespace collapsed."""
    text = _STRONGS.sub(" ", text).replace("¶", " ")
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def read_book(module: str, book: str) -> dict[tuple[int, int], str]:
    """(chapter, verse) -> text of one book of a SWORD module, through diatheke."""
    out = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", book], check=True,
                         capture_output=True, text=True).stdout
    verses = {}
    for line in out.splitlines():
        m = _VERSE.match(line)
        if m:
            verses[(int(m["chapter"]), int(m["verse"]))] = clean(m["text"])
    if not verses:
        raise SystemExit(f"diatheke returned no verses of {book!r} from {module}; is sword-text-* installed?")
    return verses


def build(chapters_per_book: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for book_no, book in enumerate(BOOKS):
        kjv, web = read_book(MODULES["kjv"], book), read_book(MODULES["web"], book)
        chapters = sorted({c for c, _ in kjv})
        chosen = set(rng.sample(chapters, min(chapters_per_book, len(chapters))))
        for (chapter, verse), k_text in sorted(kjv.items()):
            w_text = web.get((chapter, verse))
            if chapter not in chosen or not w_text:
                continue
            if min(len(k_text.split()), len(w_text.split())) < MIN_WORDS or k_text == w_text:
                continue
            rows.append({"book": book, "book_no": book_no, "chapter": chapter, "verse": verse,
                         "split": "tune" if book_no % 2 == 0 else "check", "kjv": k_text, "web": w_text})
    kjv_count = Counter(r["kjv"].casefold() for r in rows)
    web_count = Counter(r["web"].casefold() for r in rows)
    return [r for r in rows if kjv_count[r["kjv"].casefold()] == 1 and web_count[r["web"].casefold()] == 1]


def load(path: str | Path = DEFAULT_OUT, split: str | None = None) -> list[dict]:
    """The calibration rows (optionally one split), in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if split is None or r["split"] == split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapters", type=int, default=2, help="whole chapters drawn per book")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if shutil.which("diatheke") is None:
        sys.exit("diatheke not found: apt-get install diatheke sword-text-kjv sword-text-web")
    rows = build(args.chapters, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input gives byte-identical output.
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    counts = Counter(r["split"] for r in rows)
    print(json.dumps({"out": str(args.out), "pairs": len(rows), "by_split": dict(counts),
                      "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
