"""Node cache for remote inputs (base model, tokenizer, data): downloaded once per node, shared by ranks.

Layout under ``cache_dir``: ``s3/<bucket>/<key>`` — the object itself, or a directory mirroring the
prefix — with two siblings: ``<name>.sftjob.json`` (the completion marker: every file's ETag and
size, written last) and ``<name>.lock``. A caller whose marker matches the current listing returns
at once; otherwise it takes the lock (flock: works across processes and threads, and on NFS PVCs),
re-checks — another local rank may just have finished — and downloads only files whose ETag/size
changed. Files finished before a crash are journaled in ``<name>.sftjob.partial`` and big files
resume part by part, so a restarted pod does not start over.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from job.errors import ConfigError, NotFoundError
from job.storage import paths, s3, transfer

log = logging.getLogger(__name__)


def cache_path(uri: str, cache_dir: Path) -> Path:
    bucket, key = s3.parse(uri)
    key = key.strip("/")
    if not key:
        return Path(cache_dir) / "s3" / bucket / "_bucket"
    return Path(cache_dir) / "s3" / bucket / paths.confine(key, f"refusing to cache {uri}", error=ConfigError,
                                                              hint="fix the URI")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish downloading %s", path.name[:-len(".lock")])
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fresh(marker: Path, want: dict, root: Path, single: bool, subset: bool = False) -> bool:
    have = _read_json(marker).get("files")
    if not isinstance(have, dict):
        return False
    if (any(have.get(rel) != v for rel, v in want.items()) if subset else have != want):
        return False
    for rel, (_, size) in want.items():
        p = root if single else root / rel
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def fetch(uri: str, cache_dir: Path, only: Callable[[str], bool] | None = None) -> Path:
    """A local path holding uri (object → file, prefix → directory), downloaded at most once per node.

    ``only`` (a prefix's relative names → keep?) takes part of a prefix, e.g. a model's tokenizer files
    without its weights; a later full fetch of the same prefix downloads only what is still missing.
    """
    _, key = s3.parse(uri)
    objs = s3.list_objects(uri)
    if not objs:
        raise NotFoundError(f"not found: {uri} (no such object or prefix at {s3.safe_endpoint()})",
                            hint="check the URI; for a prefix, check that it holds files")
    single = len(objs) == 1 and objs[0].key == key
    rels = [""] if single else [paths.confine(r, f"refusing to cache {uri}", hint="rename the object")
                                for r in s3.relative_names(uri, objs)]
    listing = {rel: [o.etag, o.size] for o, rel in zip(objs, rels, strict=True)}
    subset = only is not None and not single
    if subset:
        objs, rels = [o for o, r in zip(objs, rels, strict=True) if only(r)], [r for r in rels if only(r)]
        if not objs:
            raise NotFoundError(f"none of the files wanted from {uri} is there ({len(listing)} other file(s))",
                                hint="check the URI: it should be the directory that holds them")
    want = {rel: listing[rel] for rel in rels}
    root = cache_path(uri, cache_dir)
    marker = root.with_name(root.name + ".sftjob.json")
    if _fresh(marker, want, root, single, subset):
        log.debug("%s: the cached copy is current (%d file(s)) at %s", uri, len(want), root)
        return root
    with _locked(root.with_name(root.name + ".lock")):
        if _fresh(marker, want, root, single, subset):
            return root
        old = _read_json(marker).get("files", {})
        marker.unlink(missing_ok=True)
        journal = root.with_name(root.name + ".sftjob.partial")
        have = dict(old)
        if journal.exists():
            for line in journal.read_text().splitlines():
                try:
                    e = json.loads(line)
                    have[e["rel"]] = e["v"]
                except (ValueError, KeyError, TypeError):
                    continue
        for rel in [r for r in old if r not in want and listing.get(r) != old[r]]:  # gone or changed remotely
            (root / rel).unlink(missing_ok=True)
        todo = []
        for obj, rel in zip(objs, rels, strict=True):
            dest = root if single else root / rel
            ok = have.get(rel) == want[rel] and dest.is_file() and dest.stat().st_size == obj.size
            if not ok:
                todo.append((obj, dest))
        lock = threading.Lock()

        def done(obj, dest):
            rel = "" if single else dest.relative_to(root).as_posix()
            with lock, open(journal, "a") as f:
                f.write(json.dumps({"rel": rel, "v": [obj.etag, obj.size]}) + "\n")

        if todo:
            log.info("downloading %d of %d file(s) of %s into %s", len(todo), len(objs), uri, root)
        transfer.download(todo, on_done=done)
        tmp = marker.with_name(marker.name + ".tmp")
        kept = {r: v for r, v in old.items() if subset and r not in want and listing.get(r) == v and (root / r).is_file()}
        tmp.write_text(json.dumps({"uri": uri, "files": {**kept, **want}}, sort_keys=True))
        os.replace(tmp, marker)
        journal.unlink(missing_ok=True)
    return root
