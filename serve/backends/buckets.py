"""Batch buckets for compiled backends: a micro-batch of n images runs at the smallest bucket >= n (1, 2, 4, ...,
max_batch), padded with zero rows, and the output is sliced back to its n real rows.

A compiled graph (torch.compile with CUDA graphs, a static-shape engine) then exists for a handful of shapes, all of
them warmed before the server reports ready, instead of one per batch size met in traffic.  Every row of a
generator is computed independently of the others (GroupNorm and attention are per sample), so padding never
changes the real rows' pixels.  Pure numpy: no torch import here.
"""

from __future__ import annotations

import numpy as np


def bucket_sizes(max_batch: int) -> list[int]:
    """[1, 2, 4, ..., max_batch]: the powers of two below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding n rows (n <= buckets[-1])."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest batch bucket {buckets[-1]}; raise --max-batch")


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a [n, ...] -> [rows, ...] with zero rows appended (a itself when n == rows)."""
    n = a.shape[0]
    if n == rows:
        return a
    if n > rows:
        raise ValueError(f"cannot pad {n} rows down to {rows}")
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[:n] = a
    return out


def split_rows(n: int, largest: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] chunks of at most `largest` rows covering range(n)."""
    return [(i, min(i + largest, n)) for i in range(0, n, largest)]


__all__ = ["bucket_for", "bucket_sizes", "pad_rows", "split_rows"]
