"""data_report.json + token_lengths.png: what preparation did to the data, published beside the adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from job.data import packing


def build(spec, chat, tok, per_source, read, dropped, truncated, train, evald, key: str) -> dict:
    """From the per-example numbers of each split (job/data/stream.py Examples): no tokens needed."""
    lengths = train.lengths
    trained = int(train.trained.sum())
    total = int(lengths.sum())
    kept = sum(s["examples"] for s in per_source) + (len(evald) - sum(s["eval"] for s in per_source))
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} if len(lengths) else {}
    return {
        "cache_key": key,
        "rows": {"read": read, "kept": kept, "dropped": {k: v for k, v in sorted(dropped.items()) if v}},
        "sources": per_source,
        "examples": {"train": int(len(lengths)), "eval": len(evald)},
        "turns": {"assistant_trained": int(train.turns.sum()),
                  "mean_per_example": round(float(train.turns.mean()), 3) if len(lengths) else 0.0},
        "tokens": {"total": total, "trained": trained, "trained_fraction": round(trained / total, 4) if total else 0.0,
                   "eval_total": int(evald.lengths.sum())},
        "truncation": {"mode": spec.data.truncation, "truncated": truncated,
                       "dropped_too_long": dropped.get("too_long", 0), "max_length": spec.data.max_length},
        "lengths": {"min": int(lengths.min()) if len(lengths) else 0, "mean": round(float(lengths.mean()), 1) if len(lengths) else 0,
                    **pct, "max": int(lengths.max()) if len(lengths) else 0},
        "packing": {"enabled": spec.data.packing, "efficiency": None,
                    "padding_efficiency_unpacked": round(packing.padding_efficiency(lengths, spec.train.per_device_train_batch_size), 4)},
        "chat_template": {"name": chat.name, "sha256": chat.sha256, "eos_tokens": chat.eos_tokens,
                          "system": chat.system, "notes": chat.notes},
        "train_on_eos": spec.data.train_on_eos,
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok)},
    }


def write(dest: Path, rep: dict) -> None:
    if rep["packing"]["efficiency"] is not None:
        rep["packing"]["efficiency"] = round(rep["packing"]["efficiency"], 4)
    (dest / "data_report.json").write_text(json.dumps(rep, indent=2))


def preload_matplotlib() -> None:
    """Import the plotting and parquet stack in a background thread while the workers tokenize (saves ~1 s at the end)."""
    import threading

    global _PRELOADED
    if not _PRELOADED:
        _PRELOADED = True
        threading.Thread(target=_quiet_import, daemon=True).start()


_PRELOADED = False


def _quiet_import() -> None:
    """A bad-data exit can end the process mid-import: never let this warm-up print a traceback."""
    try:
        _import_plotting()
    except BaseException:  # noqa: BLE001 - the real import at the end reports real problems
        pass


def _import_plotting():
    import pyarrow.parquet  # noqa: F401 - also needed at the end (stream.write)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def plot_lengths(path: Path, lengths: np.ndarray, max_length: int) -> None:
    Figure, FigureCanvasAgg = _import_plotting()  # the OO API: no pyplot, no global state, no GUI backend
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(60, max(5, len(set(lengths.tolist())))), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(lengths)} examples, {int(lengths.sum())} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
