"""Is a downloaded checkpoint loadable? Cheap checks of the Trainer's files, in the launcher before any rank.

The COMPLETE marker's sha256 list proves the files are the ones that were uploaded, not that they load: a
file tampered with (or torn) before its marker was written passes it, and the ranks then crashed with 71 on
every retry. These checks read what the resume reads first — trainer_state.json (its step), every JSON
file, the header and extent of each safetensors file, and each torch archive (torch.save writes a zip: its
directory, and its CRCs below 1 GiB) — and name the first problem, so job.checkpoints can fall back to the
previous checkpoint instead.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

CRC_LIMIT = 1 << 30  # bigger archives: the zip directory only (a torn file loses it), not every byte
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def problem(ckpt: Path, step: int) -> str | None:
    """The first reason the checkpoint of `step` cannot be resumed from, as 'FILE: reason'; None if none found."""
    ckpt = Path(ckpt)
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json: missing"
    why = _trainer_state(state, step)
    if why:
        return f"trainer_state.json: {why}"
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = f.relative_to(ckpt).as_posix()
        if f.suffix == ".json" and f != state:
            why = _json(f)
        elif f.suffix == ".safetensors":
            why = _safetensors(f)
        elif f.suffix in TORCH_SUFFIXES:
            why = _torch_archive(f)
        else:
            continue
        if why:
            return f"{rel}: {why}"
    return None


def _trainer_state(path: Path, step: int) -> str | None:
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"not JSON ({type(e).__name__})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    gs = doc.get("global_step")
    if not isinstance(gs, int) or isinstance(gs, bool):
        return f"global_step is {gs!r}, not a step number"
    if gs != step:
        return f"global_step {gs}, but the checkpoint is step {step}"
    if not isinstance(doc.get("log_history", []), list):
        return "log_history is not a list"
    return None


def _json(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"not JSON ({type(e).__name__})"
    return None


def _safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            return f"header length {n} does not fit the file ({size} bytes)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return "header is not JSON"
    if not isinstance(header, dict):
        return "header is not an object"
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            return f"tensor {name!r} lies outside the file (torn or tampered)"
    return None


def _torch_archive(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "not a torch archive (torn, or not written by torch.save)"
    try:
        with zipfile.ZipFile(path) as z:
            if path.stat().st_size <= CRC_LIMIT:
                bad = z.testzip()
                if bad is not None:
                    return f"member {bad} fails its CRC"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"unreadable archive ({e})"
    return None
