"""Best-fit-decreasing packing into max_length bins, padding-free (as TRL's ``bfd``).

Each bin is one row of train.parquet; position_ids restart at 0 for every example inside it, which
is what flash-attention / SDPA varlen paths (and TRL's padding-free collator) use to keep attention
from crossing examples. The first label of every packed example is also set to -100 so the loss
never asks one example's last token to predict the next example's first token.
"""
from __future__ import annotations

import bisect

import numpy as np

from job.data.masks import IGNORE


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of example indices; every example must fit (len <= capacity). O(n log n) with a sorted free list."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, bin index), sorted
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def pack(ids: list[np.ndarray], labels: list[np.ndarray], capacity: int):
    """(ids, labels, position_ids, efficiency) with one entry per bin."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    bins = best_fit_decreasing(lengths, capacity)
    out_ids, out_labels, out_pos = [], [], []
    for b in bins:
        out_ids.append(np.concatenate([ids[i] for i in b]))
        lab = [labels[i].copy() for i in b]
        for x in lab:
            x[0] = IGNORE
        out_labels.append(np.concatenate(lab))
        out_pos.append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in b]))
    eff = float(lengths.sum()) / (len(bins) * capacity) if bins else 0.0
    return out_ids, out_labels, out_pos, eff


def padding_efficiency(lengths: np.ndarray, batch_size: int = 8) -> float:
    """Share of real tokens when unpacked examples are padded to the longest in batches of batch_size."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return 0.0
    padded = sum(int(lengths[i:i + batch_size].max()) * len(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    return float(lengths.sum()) / padded
