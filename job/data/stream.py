"""Prepared data in bounded memory: encoded tokens spill to disk as they come, splits are written window by window.

Memory used to grow with the data (~60 bytes per token: every example's ids and labels held, then
concatenated, then gathered per split). Now:

- ``Spill`` appends each encoded chunk's ids and labels to two flat int32 files and keeps only the
  per-example numbers in memory (length, weight, turns, trained tokens: 20 bytes an example);
- splitting, mixture repeats and the shuffle work on example indices, exactly as before (one seeded
  permutation of the whole set, so the prepared tokens equal the in-memory version's for the same seed);
- ``write`` gathers the examples of one window of that order at a time (``os.pread`` of just their
  bytes: reading through a memory map would count every touched page in the process's RSS), packs the
  window best-fit-decreasing when packing is on, and appends it to the parquet file as a row group.

Peak memory is then one window (``window_tokens``: about 2M tokens, or 256 sequences of max_length,
whichever is larger) plus the per-example numbers, whatever the data size. Packing per window loses
a little against packing the whole set (the last, partly filled bins of each window); the data report
gives both efficiencies (``packing.efficiency`` and ``packing.efficiency_whole_set``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.data import packing
from job.data.masks import IGNORE, Encoded

WINDOW_TOKENS = 2_000_000
READ_GAP = 1024  # bytes: a neighbour closer than this is read with the same call


def window_tokens(max_length: int) -> int:
    return max(WINDOW_TOKENS, 256 * max_length)


@dataclass
class Examples:
    """Per-example numbers of a set of examples (in memory); their tokens stay in the spill files."""

    lengths: np.ndarray  # int64
    weights: np.ndarray  # float32
    turns: np.ndarray  # int32
    trained: np.ndarray  # int64: tokens with a label

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(self.lengths[idx], self.weights[idx], self.turns[idx], self.trained[idx])

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("lengths", "weights", "turns", "trained")))


class Spill:
    """Encoded examples appended to ``ids.bin`` and ``labels.bin`` (int32) in ``dir``, in arrival order."""

    def __init__(self, dir: Path):
        dir.mkdir(parents=True, exist_ok=True)
        self.dir = dir
        self._ids = open(dir / "ids.bin", "wb")  # noqa: SIM115 - closed in close()
        self._labels = open(dir / "labels.bin", "wb")  # noqa: SIM115
        self._parts: list[tuple] = []
        self._fds: tuple[int, int] | None = None
        self.starts: np.ndarray | None = None

    def add(self, e: Encoded) -> Examples:
        """Write one chunk; → its per-example numbers."""
        lengths = np.asarray(e.lengths, np.int64)
        ids, labels = np.asarray(e.ids, np.int32), np.asarray(e.labels, np.int32)
        ids.tofile(self._ids)
        labels.tofile(self._labels)
        if len(lengths):
            heads = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            trained = np.add.reduceat((labels != IGNORE).astype(np.int64), heads)
            trained[lengths == 0] = 0
        else:
            trained = np.zeros(0, np.int64)
        part = Examples(lengths, np.asarray(e.weights, np.float32), np.asarray(e.turns, np.int32), trained)
        self._parts.append(part)
        return part

    def close(self) -> Examples:
        """Every example so far, in arrival order; the files are then opened for reading."""
        self._ids.close()
        self._labels.close()
        every = Examples.concat(self._parts)
        self._parts = []
        self.starts = np.concatenate([[0], np.cumsum(every.lengths)])
        self._fds = (os.open(self.dir / "ids.bin", os.O_RDONLY), os.open(self.dir / "labels.bin", os.O_RDONLY))
        return every

    def read(self, idx: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(ids, labels) of examples ``idx``, in that order, one array per example (views of ``read_flat``)."""
        ids, labels, lengths = self.read_flat(idx)
        if not len(lengths):
            return [], []
        cut = np.cumsum(lengths)[:-1]
        return np.split(ids, cut), np.split(labels, cut)

    def read_flat(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, lengths) of examples ``idx`` in that order (repeats allowed), flat: the examples'
        tokens end to end. Reads only their bytes, in ascending runs (examples less than READ_GAP bytes apart
        are read with one call, the gap discarded); the reordering is one vectorised gather."""
        fid, flab = self._fds
        idx = np.asarray(idx, np.int64)
        lengths = self.starts[idx + 1] - self.starts[idx]
        if not len(idx):
            return np.zeros(0, np.int32), np.zeros(0, np.int32), lengths
        order = np.argsort(idx, kind="stable")
        lo, hi = self.starts[idx[order]], self.starts[idx[order] + 1]  # in tokens, ascending
        reach = np.maximum.accumulate(hi)
        cuts = np.flatnonzero(lo[1:] - reach[:-1] > READ_GAP // 4) + 1
        first, last = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(idx)]]) - 1
        run_lo, run_len = lo[first], reach[last] - lo[first]
        run_at = np.concatenate([[0], np.cumsum(run_len)[:-1]])  # where each run lands in the buffer
        buf_ids = np.empty(int(run_len.sum()), np.int32)
        buf_labels = np.empty_like(buf_ids)
        for base, n, at in zip(run_lo.tolist(), run_len.tolist(), run_at.tolist(), strict=True):
            buf_ids[at:at + n] = np.frombuffer(os.pread(fid, n * 4, base * 4), np.int32)
            buf_labels[at:at + n] = np.frombuffer(os.pread(flab, n * 4, base * 4), np.int32)
        run = np.repeat(np.arange(len(first)), last - first + 1)
        at = np.empty(len(idx), np.int64)
        at[order] = run_at[run] + lo - run_lo[run]  # each example's first token in the buffer
        heads = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = np.repeat(at - heads, lengths) + np.arange(int(lengths.sum()))
        return buf_ids[gather], buf_labels[gather], lengths

    def remove(self) -> None:
        if self._fds:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        for name in ("ids.bin", "labels.bin"):
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def windows(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive examples, each about ``budget`` tokens (at least one example)."""
    if not len(lengths):
        return []
    ends = np.cumsum(lengths)
    out, start = [], 0
    while start < len(lengths):
        base = ends[start - 1] if start else 0
        end = int(np.searchsorted(ends, base + budget, side="right"))
        end = max(end, start + 1)
        out.append((start, end))
        start = end
    return out


def write(path: Path, spill: Spill, every: Examples, order: np.ndarray, pack: bool, max_length: int,
          budget: int | None = None) -> tuple[float | None, int]:
    """Write examples ``order`` (indices into the spill) to one parquet file, a row group per window.
    → (packing efficiency or None, rows written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.list_(pa.int32())) for c in ("input_ids", "labels", "position_ids")])
    rows = tokens = 0
    with pq.ParquetWriter(path, schema, use_dictionary=False, compression="zstd") as writer:
        for a, b in windows(every.lengths[order], budget or window_tokens(max_length)):
            if pack:
                ids, labels, pos, _ = packing.pack(*spill.read(order[a:b]), max_length)
                lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
                ids, labels, pos = (np.concatenate(x) if x else np.zeros(0, np.int32) for x in (ids, labels, pos))
            else:
                ids, labels, lengths = spill.read_flat(order[a:b])
                heads = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                pos = np.arange(int(lengths.sum())) - np.repeat(heads, lengths)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            cols = [pa.ListArray.from_arrays(offsets, pa.array(np.asarray(x, np.int32))) for x in (ids, labels, pos)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            rows += len(lengths)
            tokens += int(lengths.sum())
    eff = tokens / (rows * max_length) if pack and rows else (0.0 if pack else None)
    return eff, rows


def whole_set_efficiency(lengths: np.ndarray, max_length: int) -> float:
    """What best-fit-decreasing over the whole set at once would reach (the windowed packing's yardstick)."""
    bins = packing.best_fit_decreasing(lengths, max_length)
    return float(np.asarray(lengths).sum()) / (len(bins) * max_length) if bins else 0.0
