"""Progress of a long preparation: rows/s, tokens/s and an ETA in the log and in status.json.

Cheap by construction: ``tick`` only adds two integers and reads a clock; a line is logged (and the
status sink called) at most every ``every`` seconds. The row total, when it can be known cheaply
(parquet metadata, newline count of plain JSON lines), gives a percentage and an ETA.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sftjob.prepare")

EVERY = 5.0  # seconds between progress reports
_sink: Callable[[dict], None] | None = None  # set by the pipeline: status.json updates while preparing


def set_sink(fn: Callable[[dict], None] | None) -> None:
    global _sink
    _sink = fn


def to_status(status) -> Callable[[dict], None]:
    """A sink for job/status.py: status.json gets ``percent`` (None until the total is known) and the figures
    under ``preparing`` (rows, tokens, rates, eta_seconds)."""
    return lambda d: status.update(percent=d["percent"], preparing=d)


def estimate_rows(files: list[Path]) -> int | None:
    """Rows in these files when cheap to know (parquet metadata, lines of .jsonl); None otherwise."""
    total = 0
    for p in files:
        name = str(p)
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(p).metadata.num_rows
            elif name.endswith(".jsonl"):
                n, last = 0, b"\n"
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        n += chunk.count(b"\n")
                        last = chunk[-1:]
                total += n + (last != b"\n")
            else:
                return None
        except Exception:  # noqa: BLE001 - an estimate: the real read reports bad files properly
            return None
    return total


class Progress:
    """Counts rows read and tokens encoded; logs and reports every ``every`` seconds."""

    def __init__(self, total_rows: int | Callable[[], int | None] | None = None, every: float | None = None,
                 clock=time.monotonic):
        """total_rows may be a callable: counted only when the first report is due, so a short
        preparation (no report at all) never pays for it."""
        self._total, self.every, self.clock = total_rows, EVERY if every is None else every, clock
        self.rows = self.tokens = 0
        self.start = self.last = clock()

    def tick(self, rows: int = 0, tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.report(now)

    @property
    def total(self) -> int | None:
        if callable(self._total):
            self._total = self._total()
        return self._total

    def snapshot(self, now: float | None = None) -> dict:
        elapsed = max((self.clock() if now is None else now) - self.start, 1e-9)
        rps = self.rows / elapsed
        doc = {"rows": self.rows, "tokens": self.tokens, "rows_per_second": round(rps, 1),
               "tokens_per_second": round(self.tokens / elapsed, 1), "seconds": round(elapsed, 1),
               "total_rows": self.total, "percent": None, "eta_seconds": None}
        if self.total:
            doc["percent"] = round(min(100.0, 100.0 * self.rows / self.total), 1)
            doc["eta_seconds"] = round(max(0, self.total - self.rows) / rps) if rps > 0 else None
        return doc

    def report(self, now: float | None = None) -> dict:
        d = self.snapshot(now)
        tail = (f", {d['percent']:.1f}% of {d['total_rows']}, ETA {d['eta_seconds']}s"
                if d["percent"] is not None and d["eta_seconds"] is not None else "")
        log.info("preparing: %d rows (%.0f rows/s), %d tokens (%.0f tokens/s)%s",
                 d["rows"], d["rows_per_second"], d["tokens"], d["tokens_per_second"], tail)
        if _sink is not None:
            try:
                _sink(d)
            except Exception as e:  # noqa: BLE001 - progress is best effort; preparing goes on
                log.debug("progress sink failed: %s", e)
        return d
