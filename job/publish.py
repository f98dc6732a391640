"""Publish a run's outputs: every file first, then manifest.json, then _SUCCESS — last and create-only.

Why this order: a reader that sees ``_SUCCESS`` may trust the manifest, and a reader of the manifest
may trust every file in it (each upload carried the manifest's SHA256, so the store holds exactly
those bytes). A publish killed halfway leaves no ``_SUCCESS``; rerunning it re-uploads and completes.
``_SUCCESS`` is written with ``If-None-Match: *`` so two publishers racing for one prefix cannot both
win, and a finished run is never overwritten unless the user asks (``output.overwrite``).
Works the same for a local output directory (atomic create-if-absent instead of If-None-Match).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import platform
import time
import uuid
from importlib import metadata
from pathlib import Path

from job import redact, storage
from job.errors import AlreadyPublishedError, NotFoundError, VerificationError
from job.storage import paths

log = logging.getLogger("sftjob.publish")
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
RETIRED = ".sftjob-retired"  # the _SUCCESS retire() removed: still seals the old manifest for publish()
FORMAT = "sftjob.manifest/1"
_PACKAGES = ("sftjob", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets",
             "tokenizers", "boto3", "bitsandbytes", "liger-kernel", "flash-attn")


def check_output(output_uri: str, overwrite: bool) -> bool:
    """Fail fast, before any training: output writable (an object is created and deleted there), not
    already published (unless overwrite), and no manifest there naming a path outside it (65).
    Returns whether a finished run is there."""
    storage.check_access(output_uri)
    published = storage.exists(storage.join(output_uri, SUCCESS))
    if published and not overwrite:
        raise AlreadyPublishedError(
            f"{output_uri} is already published ({SUCCESS} exists); refusing to overwrite a finished run",
            hint="choose a new output prefix, or set output.overwrite: true (--overwrite) to replace it")
    _manifest(output_uri)
    return published


def retire(output_uri: str) -> bool:
    """output.overwrite on a finished run: its checkpoints go first (a new run must never resume from
    them), then its _SUCCESS (so a restart of the new run resumes its own checkpoints as usual).
    Its files stay until the new publish replaces them. True when there was a finished run."""
    try:
        seal = storage.read_bytes(storage.join(output_uri, SUCCESS))
    except NotFoundError:
        return False
    storage.delete_prefix(storage.join(output_uri, "checkpoints") + "/")
    storage.write_bytes(storage.join(output_uri, RETIRED), seal)
    storage.delete(storage.join(output_uri, SUCCESS))
    return True


def _manifest(output_uri: str) -> tuple[bytes, list[str]] | None:
    """The prefix's manifest.json and the paths it lists, each confined to the prefix (a path outside
    it is DataError 65 naming the entry); None when there is none or it is not a manifest."""
    uri = storage.join(output_uri, MANIFEST)
    try:
        body = storage.read_bytes(uri)
        files = json.loads(body)["files"]
        names = [f["path"] for f in files]
    except NotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        log.warning("%s is not a manifest this job can read; ignoring it (publishing replaces it)", uri)
        return None
    for name in names:
        paths.confine(name, uri)
    return body, names


def _sealed(output_uri: str, body: bytes) -> bool:
    """Whether _SUCCESS (or the seal retire() kept) names this manifest's sha256: a finished publish."""
    digest = hashlib.sha256(body).hexdigest()
    for name in (SUCCESS, RETIRED):
        try:
            seal = json.loads(storage.read_bytes(storage.join(output_uri, name)))
        except (NotFoundError, ValueError):
            continue
        if isinstance(seal, dict) and seal.get("manifest_sha256") == digest:
            return True
    return False


def _previous_files(output_uri: str) -> list[str]:
    """Files an earlier, finished publish listed (they may be deleted), [] if none: a manifest that no
    seal vouches for (an interrupted or foreign publish) deletes nothing; its stale files stay."""
    found = _manifest(output_uri)
    if found is None:
        return []
    body, names = found
    if not _sealed(output_uri, body):
        log.warning("%s/%s is not sealed by %s (a partial, interrupted or foreign publish): deleting none of the "
                    "%d files it lists; any this run does not replace stay as they are", output_uri.rstrip("/"),
                    MANIFEST, SUCCESS, len(names))
        return []
    return names


def versions() -> dict[str, str]:
    """sftjob's own version always (a checkout run via PYTHONPATH has no metadata: its __version__)."""
    from job import version

    out = {"python": platform.python_version(), "sftjob": version()}
    for name in (n for n in _PACKAGES if n != "sftjob"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _hash_files(root: Path, files: list[Path]) -> list[dict]:
    def one(p: Path) -> dict:
        return {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": storage.sha256(str(p))}

    with cf.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:  # hashlib drops the GIL
        return list(pool.map(one, files))


def publish(local_dir: Path, output_uri: str, *, run_info: dict, overwrite: bool = False,
            partial: bool = False) -> dict:
    """Upload local_dir under output_uri, then the manifest, then _SUCCESS (unless partial); return the manifest."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFoundError(f"nothing to publish: {root} is not a directory")
    published = check_output(output_uri, overwrite)
    success_uri = storage.join(output_uri, SUCCESS)
    previous = _previous_files(output_uri)  # while _SUCCESS still seals the manifest
    if published:  # only reachable with overwrite
        storage.delete(success_uri)  # while files change underneath, the prefix must not look complete
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and p.relative_to(root).as_posix() not in (MANIFEST, SUCCESS))
    entries = _hash_files(root, files)
    storage.upload_tree(root, output_uri, files=files, sha256={e["path"]: e["sha256"] for e in entries})
    current = {e["path"] for e in entries}
    for path in previous:  # an earlier publish's files this run does not have (eval.json of a replaced run)
        if path not in current and path not in (MANIFEST, SUCCESS):
            storage.delete(paths.child(output_uri, path, storage.join(output_uri, MANIFEST)))
    storage.delete(storage.join(output_uri, RETIRED))  # the retired run's files are gone now

    info = dict(run_info or {})
    manifest = {
        "format": FORMAT,
        "run_id": info.pop("run_id", None) or uuid.uuid4().hex[:12],
        "spec_hash": info.pop("spec_hash", None),
        "base_model": info.pop("base_model", None),
        "versions": {**versions(), **(info.pop("versions", None) or {})},
        "metrics": info.pop("metrics", None) or {},
        "output": output_uri,
        **{k: v for k, v in info.items() if k not in ("files", "partial", "created_at")},
        "partial": bool(partial),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": entries,
    }
    body = redact.text(json.dumps(manifest, indent=2, default=str)).encode()
    manifest = json.loads(body)
    digest = hashlib.sha256(body).hexdigest()
    storage.write_bytes(storage.join(output_uri, MANIFEST), body, sha256=digest)
    if not partial:
        marker = json.dumps({"run_id": manifest["run_id"], "manifest_sha256": digest,
                             "files": len(entries), "created_at": manifest["created_at"]}).encode()
        try:
            storage.write_bytes(success_uri, marker, if_none_match=not overwrite)
        except AlreadyPublishedError:
            raise AlreadyPublishedError(
                f"{output_uri} was published by another run while this one was uploading "
                f"({SUCCESS} appeared; If-None-Match refused the write)",
                hint="use a unique output prefix per run, or set output.overwrite: true") from None
    return manifest


def verify_published(output_uri: str) -> dict:
    """Download manifest.json and check every listed file's size and sha256; returns the manifest."""
    try:
        body = storage.read_bytes(storage.join(output_uri, MANIFEST))
    except NotFoundError:
        raise NotFoundError(f"{output_uri} is not published: no {MANIFEST}",
                            hint="run the job (or rerun it: publishing completes an interrupted upload)") from None
    manifest = paths.file_document(body, storage.join(output_uri, MANIFEST))  # a hostile or broken one: 65
    if not manifest.get("partial"):
        try:
            marker = json.loads(storage.read_bytes(storage.join(output_uri, SUCCESS)))
        except NotFoundError:
            raise VerificationError(f"{output_uri} has {MANIFEST} but no {SUCCESS}: the publish did not finish",
                                    hint="rerun the job; publishing completes it") from None
        except ValueError:
            marker = None
        if not isinstance(marker, dict) or marker.get("manifest_sha256") != hashlib.sha256(body).hexdigest():
            raise VerificationError(f"{output_uri}: {MANIFEST} does not match the one {SUCCESS} sealed",
                                    hint="the prefix was modified after publishing; republish with overwrite")

    def check(entry: dict) -> str | None:
        uri = paths.child(output_uri, entry["path"], storage.join(output_uri, MANIFEST))
        try:
            got = storage.sha256(uri)
        except NotFoundError:
            return f"{entry['path']}: missing"
        return None if got == entry["sha256"] else f"{entry['path']}: sha256 {got[:12]}… != {entry['sha256'][:12]}…"

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        bad = [b for b in pool.map(check, manifest.get("files", [])) if b]
    if bad:
        raise VerificationError(f"{output_uri}: {len(bad)} file(s) differ from {MANIFEST}: " + "; ".join(bad[:5]),
                                hint="republish (output.overwrite: true) from the run's local output")
    return manifest
