"""Prepared data shared through the store: across runs (``data.cache_uri``) and across the nodes of one run.

Layout of an entry, ``<prefix>/<key>/``: one upload, ``<id>/`` (the prepared files, then ``manifest.json``
with every file's size and sha256), then ``READY`` (the id and the manifest's sha256), written last and only if
absent (If-None-Match): two runs of a sweep preparing the same key at once never mix their files (the
data report's timings differ); the loser removes its own upload. A reader confines the id and every name
from the manifest (job/storage/paths.py), downloads into a temp directory, checks each sha256 and renames the
directory into the node's prepared cache, so a bad or half entry never looks complete locally either.

Node 0 of a multi-node run prepares and publishes; the other nodes wait for ``READY`` (bounded by
``data.prepare_timeout``) and exit with the retryable 69 when node 0 failed or the wait runs out.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from job import storage
from job.errors import AlreadyPublishedError, NotFoundError, SftjobError, UnavailableError, VerificationError
from job.storage import paths

log = logging.getLogger(__name__)
MANIFEST, READY = "manifest.json", "READY"
POLL_SECONDS = 2.0


@dataclass
class Sharing:
    """Where this process reads and writes prepared data in the store (built from the spec by ``for_spec``)."""

    cache_uri: str | None  # shared across runs
    node_prefix: str | None  # this run's prefix for node 0 → other nodes (cache_uri, else <output>/.prepared)
    node_rank: int = 0
    timeout: float = 3600.0
    status_uri: str | None = None  # node 0's status.json, to notice its failure while waiting

    @property
    def waits(self) -> bool:
        return self.node_prefix is not None and self.node_rank != 0

    @property
    def publishes_to(self) -> str | None:
        if self.node_rank != 0:
            return None
        return self.cache_uri or self.node_prefix


def num_machines(spec) -> int:
    """Nodes in this run, as job/train/launch.py topology() counts them (without importing torch)."""
    d, env = spec.distributed, os.environ.get("PET_NNODES", "")
    if "num_machines" in d.model_fields_set or not env.isdigit():
        return d.num_machines
    return int(env)


def for_spec(spec, node_rank: int = 0, num_machines: int = 1, output: str | None = None) -> Sharing:
    cache = spec.data.cache_uri.rstrip("/") if spec.data.cache_uri else None
    node_prefix = None
    if num_machines > 1:
        node_prefix = cache or (storage.join(output, ".prepared") if output else None)
    status_uri = storage.join(output, "status.json") if output and num_machines > 1 else None
    return Sharing(cache, node_prefix, node_rank, float(spec.data.prepare_timeout), status_uri)


def cleanup(sharing: Sharing) -> None:
    """After a successful publish, node 0 removes <output>/.prepared (a cache_uri entry is kept for later runs)."""
    if sharing.node_rank != 0 or not sharing.node_prefix or sharing.node_prefix == sharing.cache_uri:
        return
    try:
        storage.delete_prefix(sharing.node_prefix)
    except Exception as e:  # noqa: BLE001 - a leftover copy costs storage, not correctness
        log.warning("could not remove %s: %s", sharing.node_prefix, e)


def _ready(prefix: str) -> bytes | None:
    try:
        return storage.read_bytes(storage.join(prefix, READY))
    except NotFoundError:
        return None


def offer(sharing: Sharing, local: Path, key: str) -> None:
    """Publish local (a finished prepared dir) where this process should: required when other nodes wait
    for it; best effort for data.cache_uri alone (a cache that cannot be written costs the next run time,
    never this run)."""
    if not sharing.publishes_to:
        return
    prefix = storage.join(sharing.publishes_to, key)
    if sharing.node_prefix:
        publish(local, prefix)
        return
    try:
        publish(local, prefix)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("could not store the prepared data in data.cache_uri %s (%s); continuing without it", prefix,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)


def publish(local: Path, prefix: str) -> None:
    """Upload a finished prepared dir under prefix: files and manifest.json under a fresh id, then READY."""
    if _ready(prefix) is not None:  # same key = same tokens; another run or node published it first
        log.info("prepared data already in the store at %s", prefix)
        return
    upload = uuid.uuid4().hex[:12]
    base = storage.join(prefix, upload)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    entries = [{"path": p.relative_to(local).as_posix(), "size": p.stat().st_size, "sha256": storage.sha256(str(p))}
               for p in files]
    storage.upload_tree(local, base, files=files, sha256={e["path"]: e["sha256"] for e in entries})
    body = json.dumps({"files": entries}, indent=1).encode()
    digest = hashlib.sha256(body).hexdigest()
    storage.write_bytes(storage.join(base, MANIFEST), body, sha256=digest)
    try:
        storage.write_bytes(storage.join(prefix, READY), json.dumps({"id": upload, "manifest_sha256": digest}).encode(),
                            if_none_match=True)
    except AlreadyPublishedError:  # another publisher sealed first: its upload is the entry, ours goes
        log.info("prepared data was published to %s meanwhile by another run; removing this upload", prefix)
        storage.delete_prefix(base)
        return
    log.info("published the prepared data to %s (%d files)", prefix, len(entries))


def download(prefix: str, dest: Path, ready: bytes) -> Path:
    """Download a READY entry into dest (temp dir, every sha256 checked, then renamed); returns dest."""
    hint = "delete that prefix; the next run prepares and publishes it again"
    try:
        seal = json.loads(ready)
        want, upload = seal["manifest_sha256"], seal["id"]
    except (ValueError, KeyError, TypeError):
        raise VerificationError(f"{prefix}/{READY}: unreadable", hint=hint) from None
    base = paths.child(prefix, upload, f"{prefix}/{READY}")
    where = storage.join(base, MANIFEST)
    body = storage.read_bytes(where)
    if hashlib.sha256(body).hexdigest() != want:
        raise VerificationError(f"{where} does not match the sha256 in {READY} (modified after publishing)", hint=hint)
    try:
        entries = json.loads(body)["files"]
        names = [paths.confine(e["path"], where) for e in entries]
    except (ValueError, KeyError, TypeError):
        raise VerificationError(f"{where}: unreadable", hint=hint) from None
    if "meta.json" not in names:
        raise VerificationError(f"{where}: no meta.json listed; not a prepared-data entry", hint=hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{dest.name}-", dir=dest.parent))
    try:
        for e, rel in zip(entries, names, strict=True):
            local = paths.local_child(tmp, rel, where)
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(paths.child(base, rel, where), local)
            got = storage.sha256(str(local))
            if got != e.get("sha256"):
                raise VerificationError(f"{base}/{rel}: sha256 {got[:12]}… != {str(e.get('sha256'))[:12]}… "
                                        f"in {MANIFEST}", hint=hint)
        if dest.exists() and not (dest / "meta.json").exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # a local prepare or another download finished first: same key, same tokens
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def from_cache(sharing: Sharing, key: str, dest: Path) -> bool:
    """Download key from data.cache_uri when it is there; True if dest now holds it."""
    if not sharing.cache_uri:
        return False
    prefix = storage.join(sharing.cache_uri, key)
    try:
        ready = _ready(prefix)
    except SftjobError as e:  # unreachable or denied: a cache costs time, never the run (unless nodes wait on it)
        if sharing.node_prefix:
            raise
        log.warning("could not read data.cache_uri %s (%s); preparing here", prefix, str(e).splitlines()[0])
        return False
    if ready is None:
        return False
    download(prefix, dest, ready)
    log.info("prepared data from cache %s", prefix)
    return True


def wait_for_node0(sharing: Sharing, key: str, dest: Path, *, clock=time.monotonic, sleep=time.sleep) -> None:
    """A node other than 0: wait for node 0's READY, then download and verify; 69 on failure or timeout."""
    prefix = storage.join(sharing.node_prefix, key)
    log.info("node %d: waiting up to %.0fs for node 0 to publish the prepared data at %s",
             sharing.node_rank, sharing.timeout, prefix)
    start, first = clock(), _status(sharing)
    while True:
        ready = _ready(prefix)
        if ready is not None:
            download(prefix, dest, ready)
            log.info("node %d: downloaded the prepared data from node 0 (%s), not preparing it again",
                     sharing.node_rank, prefix)
            return
        now_status = _status(sharing)
        if _failed(now_status, first):
            err = now_status.get("error") or {}
            raise UnavailableError(f"node 0 failed before publishing the prepared data ({err.get('kind')}: "
                                   f"{str(err.get('message'))[:300]}); node {sharing.node_rank} cannot train without it",
                                   hint="fix node 0's error; the job's retry restarts every node")
        if clock() - start >= sharing.timeout:
            raise UnavailableError(f"node {sharing.node_rank}: node 0 did not publish the prepared data at {prefix} "
                                   f"within data.prepare_timeout {sharing.timeout:.0f}s",
                                   hint="check node 0's log; raise data.prepare_timeout for very large data sets")
        sleep(POLL_SECONDS)


def _status(sharing: Sharing) -> dict:
    if not sharing.status_uri:
        return {}
    try:
        doc = json.loads(storage.read_bytes(sharing.status_uri))
        return doc if isinstance(doc, dict) else {}
    except Exception:  # noqa: BLE001 - not written yet, or mid-write: keep waiting
        return {}


def _failed(doc: dict, first: dict) -> bool:
    """Node 0's status says failed — and it is not the stale status of an earlier attempt seen on arrival."""
    return doc.get("state") in ("failed", "interrupted") and doc != first
