"""A prepared-data cache entry and what both objectives' preparation share (job/data/prepare.py for SFT,
job/data/preference.py for DPO): the entry as ranks load it (Prepared), its content key (cache_key over
the data files' fingerprints, the tokenizer, the template and the knobs), the row selection (split,
repeat) and the bad-row report. Below both, so neither reaches into the other."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import storage
from job.data import readers
from job.data.formats import BadRow
from job.data.templates import tokenizer_files_sha256
from job.errors import NotFoundError

PREP_VERSION = "3"  # bump when the same inputs would now be prepared differently (3: tool-only turns keep their calls)
MAX_LISTED = 20


@dataclass
class Prepared:
    dir: Path
    train_path: Path
    eval_path: Path | None
    report: dict
    cache_hit: bool
    chat_template: str
    template_sha256: str
    eos_tokens: list[str]

    @classmethod
    def load(cls, d: str | Path, cache_hit: bool = True) -> Prepared:
        """What a training rank calls: read a finished cache dir (meta.json is its completeness mark)."""
        d = Path(d)
        meta = json.loads((d / "meta.json").read_text())
        return cls(dir=d, train_path=d / "train.parquet", eval_path=(d / "eval.parquet") if meta["eval"] else None,
                   report=json.loads((d / "data_report.json").read_text()), cache_hit=cache_hit,
                   chat_template=(d / "chat_template.jinja").read_text(), template_sha256=meta["template_sha256"],
                   eos_tokens=meta["eos_tokens"])


def fingerprints(uri: str, inputs: Path) -> list:
    """What identifies a source's files in the cache key: ETag and size for S3 objects (read from the
    listing, nothing downloaded, so a store hit never fetches the data), sha256 for local files."""
    if storage.is_remote(uri):
        from job.storage import s3

        objs = [o for o in s3.list_objects(uri) if readers.supported(o.uri) and not readers.hidden(o.key)]
        if not objs:
            raise NotFoundError(f"no data files ({', '.join(readers.EXTENSIONS)}) under {uri}",
                                hint="check the S3 prefix and the file extensions")
        return [[o.uri, o.etag, o.size] for o in objs]
    return [file_sha256(p) for _, p in readers.expand(uri, inputs)]


def cache_key(spec, template_src: tuple[str, str] | None, tdir: Path, sources, eval_files) -> str:
    """Hash of what changes the output; computed without loading the tokenizer (file hashes instead)."""
    h = hashlib.sha256()

    def add(obj):
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        h.update(b"\0")

    d, m = spec.data, spec.model
    add({"v": PREP_VERSION, "format": d.format, "columns": d.columns, "roles": d.roles, "eval_split": d.eval_split,
         "max_length": d.max_length, "truncation": d.truncation, "train_on_eos": d.train_on_eos,
         "packing": d.packing, "shuffle": d.shuffle, "seed": spec.train.seed,
         "system_prompt": m.system_prompt, "system_prompt_mode": m.system_prompt_mode,
         "add_special_tokens": m.add_special_tokens,
         "template": template_src[1] if template_src else "(tokenizer's own)",
         "tokenizer": tokenizer_files_sha256(tdir)})
    if m.add_special_tokens:  # caches from before the added tokens reached prepare split them into pieces
        add({"added_tokens_are_special": True})
    for src, prints in sources:  # fingerprints(): sha256 of local files, [uri, ETag, size] of S3 objects
        add({"weight": src.weight, "files": prints})
    add({"eval": eval_files})
    return h.hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def where_key(b: BadRow):
    """Sort bad rows by file, then line number (then element, for rows sharing a line of a .json array)."""
    f, _, line = b.where.rpartition(":")
    nums = [int(n) for n in re.findall(r"\d+", line)] if line[:1].isdigit() else []
    return (f, *(nums + [0, 0])[:2]) if nums else (b.where, 0, 0)


def bad_rows_message(bad: list[BadRow]) -> str:
    lines = [str(b) for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"... and {len(bad) - MAX_LISTED} more bad rows")
    return f"{len(bad)} bad row(s):\n" + "\n".join(lines)


def split(n: int, fraction: float, shuffle: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) example indices; eval is a random `fraction` of the source (at least one row)."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    n_eval = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def repeat(idx: np.ndarray, row_weights: np.ndarray, source_weight: float, rng) -> np.ndarray:
    """Mixture weight x row weight → copies per example: integer part, plus one more with the fraction's probability."""
    w = row_weights[idx].astype(np.float64) * source_weight
    copies = np.floor(w).astype(np.int64) + (rng.random(len(w)) < (w - np.floor(w)))
    return np.repeat(idx, copies)
