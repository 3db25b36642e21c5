"""XXH32 of many byte spans of one buffer, vectorised with numpy.

Gives, for each span, exactly ``xxhash.xxh32_intdigest(buffer[start:stop], seed)``
(the XXH32 specification: four 32-bit lanes over 16-byte stripes,
``acc = rotl(acc + lane * P2, 13) * P1``; then the length, the remaining 4-byte
words ``h = rotl(h + word * P3, 17) * P4`` and bytes ``h = rotl(h + byte * P5, 11) * P1``;
then the avalanche ``h ^= h >> 15; h *= P2; h ^= h >> 13; h *= P3; h ^= h >> 16``),
all arithmetic modulo 2^32.

Spans are sorted by length, longest first, so that the spans that still have a
stripe to hash form a prefix, and spans of one length form a contiguous run that
shares its tail steps: no per-element branching, every step is one numpy call.
"""

from __future__ import annotations

import numpy as np

P1 = np.uint32(2654435761)
P2 = np.uint32(2246822519)
P3 = np.uint32(3266489917)
P4 = np.uint32(668265263)
P5 = np.uint32(374761393)
_MASK = 0xFFFFFFFF


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _words32(buffer: np.ndarray) -> np.ndarray:
    """A read-only uint32 view starting at every byte: word i = buffer[i:i+4] little-endian."""
    padded = np.zeros(len(buffer) + 3, dtype=np.uint8)
    padded[: len(buffer)] = buffer
    return np.ndarray(shape=(len(buffer),), dtype="<u4", buffer=padded, offset=0, strides=(1,))


def xxh32_spans(buffer: np.ndarray, start: np.ndarray, stop: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint32 XXH32 of ``buffer[start[j]:stop[j]]`` for every j."""
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError("buffer must be a 1-D uint8 array; use np.frombuffer(data, dtype=np.uint8)")
    n = len(start)
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    seed = seed & 0xFFFFFFFF
    words = _words32(buffer)
    length = (np.asarray(stop, dtype=np.int64) - np.asarray(start, dtype=np.int64))
    if length.min() < 0:
        raise ValueError("every span needs start <= stop")
    order = np.argsort(-length, kind="stable")
    ln = length[order]
    pos = np.asarray(start, dtype=np.int64)[order]
    neg_ln = -ln  # ascending, for prefix counts
    h = np.empty(n, dtype=np.uint32)

    n_long = int(np.searchsorted(neg_ln, -16, side="right"))  # spans of >= 16 bytes
    if n_long:
        v = [
            np.full(n_long, (seed + int(P1) + int(P2)) & _MASK, dtype=np.uint32),
            np.full(n_long, (seed + int(P2)) & _MASK, dtype=np.uint32),
            np.full(n_long, seed, dtype=np.uint32),
            np.full(n_long, (seed - int(P1)) & _MASK, dtype=np.uint32),
        ]
        for stripe in range(int(ln[0]) // 16):
            m = int(np.searchsorted(neg_ln, -16 * (stripe + 1), side="right"))
            base = pos[:m] + 16 * stripe
            for lane in range(4):
                acc = v[lane][:m]
                acc += words[base + 4 * lane] * P2
                acc[:] = _rotl(acc, 13) * P1
        h[:n_long] = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
    h[n_long:] = (seed + int(P5)) & _MASK
    h += ln.astype(np.uint32)

    # Tails: runs of equal length share their number of 4-byte words and bytes.
    bounds = np.flatnonzero(np.diff(ln)) + 1
    run_starts = np.concatenate(([0], bounds))
    run_stops = np.concatenate((bounds, [n]))
    for a, b in zip(run_starts.tolist(), run_stops.tolist()):
        size = int(ln[a])
        p = pos[a:b] + (size // 16) * 16
        rest = size % 16
        hh = h[a:b]
        for _ in range(rest // 4):
            hh += words[p] * P3
            hh[:] = _rotl(hh, 17) * P4
            p = p + 4
        for _ in range(rest % 4):
            hh += buffer[p].astype(np.uint32) * P5
            hh[:] = _rotl(hh, 11) * P1
            p = p + 1

    h ^= h >> np.uint32(15)
    h *= P2
    h ^= h >> np.uint32(13)
    h *= P3
    h ^= h >> np.uint32(16)
    out = np.empty(n, dtype=np.uint32)
    out[order] = h
    return out
