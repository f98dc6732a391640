"""Names read back from the store become keys or local paths only through here.

A ``COMPLETE`` marker, a ``.nodes/`` file, a ``manifest.json`` or a listing may have been written by
someone else. An absolute path, ``..``, a backslash or an empty part in one of them would let that writer
plant or delete files outside the prefix, or anywhere on the node; so every such name is checked here
(lexically, and for local paths also with symlinks resolved) before it is joined to anything.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from job import redact
from job.errors import DataError, SftjobError

_HINT = ("the prefix holds a name this job did not write (tampered or corrupted); "
         "remove that entry or the prefix, then rerun")


def problem(rel) -> str | None:
    """Why rel is not a safe relative name (posix, inside its prefix), or None when it is."""
    if not isinstance(rel, str):
        return f"not a string ({type(rel).__name__})"
    if not rel:
        return "empty"
    if "\x00" in rel:
        return "contains NUL"
    if "\\" in rel:
        return "contains a backslash"
    if rel.startswith("/"):
        return "absolute"
    parts = rel.split("/")
    if "" in parts:
        return "has an empty part"
    if ".." in parts or "." in parts:
        return "has a '..' or '.' part"
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_entries(doc, what: str, *, error: type[SftjobError] = DataError, hint: str = _HINT) -> list[dict]:
    """The ``files`` list of a manifest, marker or node file (JSON bytes or parsed), once each entry is
    ``{path, size, sha256}`` with a confined path; else ``error`` naming ``what``. Not JSON, a list where an
    object belongs, a sha256 that is a number: each crashed the reader with a traceback (exit 1)."""
    return file_document(doc, what, error=error, hint=hint)["files"]


def file_document(doc, what: str, *, error: type[SftjobError] = DataError, hint: str = _HINT) -> dict:
    """The whole document (parsed once) whose ``files`` list `file_entries` checks."""
    if isinstance(doc, (bytes, str)):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError):
            doc = None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list):
        raise error(f"{what} is not a file list this job wrote (not JSON, or no files list)", hint=hint)
    for f in files:
        if not (isinstance(f, dict) and type(f.get("size")) is int and f["size"] >= 0
                and isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"])):
            raise error(f"{what}: malformed entry {str(f)[:160]} (needs path, size and a sha256)", hint=hint)
        confine(f.get("path"), what, error=error, hint=hint)
    return doc


def confine(rel, what: str, *, error: type[SftjobError] = DataError, hint: str = _HINT) -> str:
    """rel unchanged when it is a safe relative name; else ``error`` naming what and the entry."""
    why = problem(rel)
    if why:
        raise error(f"{what}: unsafe path {rel!r} ({why}); refusing to use it", hint=hint)
    return rel


def local_child(root: Path | str, rel, what: str, *, error: type[SftjobError] = DataError,
                hint: str = _HINT) -> Path:
    """root/rel, once rel is confined and the result, symlinks resolved, is still inside root."""
    rel = confine(rel, what, error=error, hint=hint)
    base = Path(root).resolve()
    if not (base / rel).resolve().is_relative_to(base):
        raise error(f"{what}: {rel!r} leads outside {root} (through a symbolic link); refusing to use it",
                    hint=hint)
    return Path(root) / rel


def child(prefix: str, rel, what: str, *, error: type[SftjobError] = DataError, hint: str = _HINT) -> str:
    """The URI of rel under prefix (an S3 key or a local path), confined to prefix."""
    prefix = str(prefix)
    if prefix.startswith("s3://"):
        return prefix.rstrip("/") + "/" + confine(rel, what, error=error, hint=hint)
    local = prefix[len("file://"):] if prefix.startswith("file://") else prefix
    return str(local_child(local, rel, what, error=error, hint=hint))


def scheme_problem(uri: str) -> str | None:
    """Why storage cannot read `uri` (the one scheme rule: s3://bucket/key, file://, local paths), or None.
    The spec checks every location knob with it at load, naming the knob; storage.backend() any other URI."""
    uri = str(uri)
    if "://" not in uri:
        return None
    scheme, rest = uri.split("://", 1)
    if scheme == "s3" and not rest.split("/", 1)[0]:
        return f"{redact.text(uri)} names no bucket: write it as s3://bucket/key"
    if scheme in ("s3", "file"):
        return None
    fix = ("write it as s3://bucket/key (lower case; s3a/s3n are Hadoop's names for the same store)"
           if scheme.lower() in ("s3", "s3a", "s3n") else "use s3://bucket/key (any S3-compatible store, with "
           "storage.endpoint_url) or a local path")
    return f"unsupported URI scheme '{scheme}://' in {redact.text(uri)}: {fix}"
