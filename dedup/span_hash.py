"""XXH32 of many byte spans of one buffer, vectorised with numpy.

Gives, for each span, exactly ``xxhash.xxh32_intdigest(buffer[start:stop], seed)``
(the XXH32 specification: four 32-bit lanes over 16-byte stripes,
``acc = rotl(acc + lane * P2, 13) * P1``; then the length, the remaining 4-byte
words ``h = rotl(h + word * P3, 17) * P4`` and bytes ``h = rotl(h + byte * P5, 11) * P1``;
then the avalanche ``h ^= h >> 15; h *= P2; h ^= h >> 13; h *= P3; h ^= h >> 16``),
all arithmetic modulo 2^32.

The spans are hashed in chunks that fit the CPU cache. Within a chunk they are
ordered by their number of stripes (most first), so the spans that still have a
stripe to hash form a prefix; then by their tail length (``len % 16``), so the
spans that share a tail form a contiguous run: every step is one numpy call on
a contiguous slice, without per-element branching.
"""

from __future__ import annotations

import numpy as np

P1 = 2654435761
P2 = 2246822519
P3 = 3266489917
P4 = 668265263
P5 = 374761393
_MASK = 0xFFFFFFFF
_CHUNK = 1 << 16


def _words32(buffer: np.ndarray) -> np.ndarray:
    """uint32 array with word i = buffer[i:i+4] read little-endian (zero-padded at the end)."""
    n = len(buffer)
    m = (n + 3) // 4 * 4
    padded = np.zeros(m + 4, dtype=np.uint8)
    padded[:n] = buffer
    raw = padded.tobytes()
    words = np.empty(m, dtype=np.uint32)
    for offset in range(4):  # the words starting at offset, offset + 4, ...
        words[offset::4] = np.frombuffer(raw, dtype="<u4", count=m // 4, offset=offset)
    return words[:n]


class _Scratch:
    """Temporaries of one chunk, allocated once."""

    def __init__(self, size: int) -> None:
        self.t = np.empty(size, dtype=np.uint32)
        self.u = np.empty(size, dtype=np.uint32)


def _rotl_inplace(x: np.ndarray, r: int, t: np.ndarray) -> None:
    np.right_shift(x, 32 - r, out=t)
    np.left_shift(x, r, out=x)
    np.bitwise_or(x, t, out=x)


def _round(acc: np.ndarray, lane: np.ndarray, mul: int, rot: int, mul2: int, t: np.ndarray) -> None:
    """acc = rotl(acc + lane * mul, rot) * mul2, in place."""
    np.multiply(lane, np.uint32(mul), out=lane)
    np.add(acc, lane, out=acc)
    _rotl_inplace(acc, rot, t)
    np.multiply(acc, np.uint32(mul2), out=acc)


def _hash_chunk(buffer: np.ndarray, words: np.ndarray, pos: np.ndarray, ln: np.ndarray, seed: int,
                s: _Scratch) -> np.ndarray:
    n = len(pos)
    stripes = ln >> 4
    max_stripes = int(stripes.max())
    if max_stripes > 0:
        key = (max_stripes - stripes) if max_stripes < 65536 else -stripes
        order = np.argsort(key.astype(np.uint16) if max_stripes < 65536 else key, kind="stable")
        pos, ln, stripes = pos[order], ln[order], stripes[order]
    else:
        order = None
    h = np.empty(n, dtype=np.uint32)
    n_long = int(np.count_nonzero(stripes))
    if n_long:
        v = [np.full(n_long, (seed + P1 + P2) & _MASK, dtype=np.uint32),
             np.full(n_long, (seed + P2) & _MASK, dtype=np.uint32),
             np.full(n_long, seed, dtype=np.uint32),
             np.full(n_long, (seed - P1) & _MASK, dtype=np.uint32)]
        # stripes is descending: spans with more than `k` stripes are a prefix.
        counts = np.searchsorted(-stripes[:n_long], -np.arange(1, max_stripes + 1), side="right")
        for k, m in enumerate(counts.tolist()):
            base = pos[:m] + 16 * k
            lane, t = s.u[:m], s.t[:m]
            for j in range(4):
                np.take(words, base + 4 * j, out=lane)
                _round(v[j][:m], lane, P2, 13, P1, t)
        t = s.t[:n_long]
        hl = h[:n_long]
        np.right_shift(v[0], 31, out=hl); np.left_shift(v[0], 1, out=t); hl |= t
        for j, r in ((1, 7), (2, 12), (3, 18)):
            _rotl_inplace(v[j], r, t)
            hl += v[j]
    h[n_long:] = (seed + P5) & _MASK
    h += ln.astype(np.uint32)

    # Tails, grouped by len % 16.
    rest = (ln & 15).astype(np.uint8)
    order2 = np.argsort(rest, kind="stable")
    rest = rest[order2]
    hh = h[order2]
    p = pos[order2] + (ln[order2] & ~np.int64(15))
    bounds = np.searchsorted(rest, np.arange(17, dtype=np.uint8), side="left").tolist()
    for r in range(1, 16):
        a, b = bounds[r], bounds[r + 1]
        if a == b:
            continue
        g, q, t, lane = hh[a:b], p[a:b], s.t[: b - a], s.u[: b - a]
        for _ in range(r // 4):
            np.take(words, q, out=lane)
            _round(g, lane, P3, 17, P4, t)
            np.add(q, 4, out=q)
        for _ in range(r % 4):
            np.take(words, q, out=lane)
            np.bitwise_and(lane, np.uint32(0xFF), out=lane)
            _round(g, lane, P5, 11, P1, t)
            np.add(q, 1, out=q)
    t = s.t[:n]
    np.right_shift(hh, 15, out=t); hh ^= t
    hh *= np.uint32(P2)
    np.right_shift(hh, 13, out=t); hh ^= t
    hh *= np.uint32(P3)
    np.right_shift(hh, 16, out=t); hh ^= t
    out = np.empty(n, dtype=np.uint32)
    if order is None:
        out[order2] = hh
    else:
        out[order[order2]] = hh
    return out


def xxh32_spans(buffer: np.ndarray, start: np.ndarray, stop: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint32 XXH32 of ``buffer[start[j]:stop[j]]`` for every j."""
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError("buffer must be a 1-D uint8 array; use np.frombuffer(data, dtype=np.uint8)")
    start = np.asarray(start, dtype=np.int64)
    length = np.asarray(stop, dtype=np.int64) - start
    n = len(start)
    out = np.empty(n, dtype=np.uint32)
    if n == 0:
        return out
    if length.min() < 0 or start.min() < 0 or int((start + length).max()) > len(buffer):
        raise ValueError("every span needs 0 <= start <= stop <= len(buffer)")
    words = _words32(buffer)
    scratch = _Scratch(min(n, _CHUNK))
    for c in range(0, n, _CHUNK):
        out[c : c + _CHUNK] = _hash_chunk(buffer, words, start[c : c + _CHUNK], length[c : c + _CHUNK],
                                          seed & _MASK, scratch)
    return out
