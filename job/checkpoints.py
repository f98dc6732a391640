"""Checkpoints that survive preemption: written locally, mirrored to ``<output>/checkpoints/step-N/``.

A checkpoint counts only once its ``COMPLETE`` marker exists (file list + sha256, written last, after
every node has uploaded its part and said so in ``.nodes/node-K.json``). On start, the newest complete
checkpoint is found (output first, then local), downloaded, verified and handed to the trainer;
incomplete ones are skipped with a log line and cleaned.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from job import storage
from job.errors import VerificationError
from job.storage import paths

log = logging.getLogger("sftjob.checkpoints")
_STEP = re.compile(r"(?:step|checkpoint)-(\d+)$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remote_prefix(output_uri: str, step: int) -> str:
    return storage.join(output_uri, "checkpoints", f"step-{step}")


def _remote_steps(output_uri: str) -> dict[int, set[str]]:
    """step → relative file names present under checkpoints/step-N/."""
    root = storage.join(output_uri, "checkpoints")
    steps: dict[int, set[str]] = {}
    for uri in storage.list_files(root):
        rel = uri[len(root):].lstrip("/")
        head, _, rest = rel.partition("/")
        m = _STEP.match(head)
        if m:
            steps.setdefault(int(m.group(1)), set()).add(rest)
    return steps


def complete_steps(output_uri: str) -> list[int]:
    return sorted(s for s, files in _remote_steps(output_uri).items() if "COMPLETE" in files)


@dataclass
class Found:
    step: int
    path: Path  # local directory the trainer resumes from


def find_and_fetch(output_uri: str, local_root: Path) -> Found | None:
    """Newest complete checkpoint, downloaded to local_root/checkpoint-N and verified; None if none.

    A marker that cannot be read or names a path outside its checkpoint is skipped like a corrupt one.
    """
    steps = _remote_steps(output_uri)
    for step in sorted(steps, reverse=True):
        prefix = remote_prefix(output_uri, step)
        if "COMPLETE" not in steps[step]:
            log.warning("skipping incomplete checkpoint step-%d (no COMPLETE marker); removing it", step)
            storage.delete_prefix(prefix)
            continue
        dest = Path(local_root) / f"checkpoint-{step}"
        tmp = Path(local_root) / f".incoming-{step}"
        what = f"{prefix}/COMPLETE"
        try:
            marker = _read_marker(prefix)
            if not _matches(dest, marker):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
                for f in marker["files"]:
                    storage.download_file(paths.child(prefix, f["path"], what, error=VerificationError),
                                          paths.local_child(tmp, f["path"], what, error=VerificationError))
                if not _matches(tmp, marker):
                    log.warning("checkpoint step-%d failed its checksum; skipping it", step)
                    shutil.rmtree(tmp, ignore_errors=True)
                    continue
                tmp.rename(dest)
        except VerificationError as e:
            log.error("skipping checkpoint step-%d: %s", step, e.message)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        log.info("resuming from complete checkpoint step-%d (%d files)", step, len(marker["files"]))
        return Found(step, dest)
    return None


def _read_marker(prefix: str) -> dict:
    """The COMPLETE marker, every entry checked: a relative path inside the checkpoint, a size, a sha256."""
    what = f"{prefix}/COMPLETE"
    try:
        marker = json.loads(storage.read_bytes(storage.join(prefix, "COMPLETE")))
    except ValueError:
        marker = None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, list):
        raise VerificationError(f"{what} is not a checkpoint marker (no files list)")
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("size"), int) or not isinstance(f.get("sha256"), str):
            raise VerificationError(f"{what}: malformed entry {f!r}")
        paths.confine(f.get("path"), what, error=VerificationError)
    return marker


def _matches(local: Path, marker: dict) -> bool:
    if not local.is_dir():
        return False
    for f in marker["files"]:
        try:
            p = paths.local_child(local, f["path"], str(local), error=VerificationError)
        except VerificationError:
            return False
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            return False
    return True


class Mirror:
    """Background uploader of local checkpoints, one per node (run by each node's local rank 0)."""

    def __init__(self, output_uri: str, *, node_rank: int, num_nodes: int, is_main: bool, keep: int,
                 on_complete=None):
        self.output_uri, self.node_rank, self.num_nodes = output_uri, node_rank, num_nodes
        self.is_main, self.keep, self.on_complete = is_main, keep, on_complete
        self._q: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self.completed: list[int] = []
        self.error: Exception | None = None
        threading.Thread(target=self._work, daemon=True, name="checkpoint-mirror").start()

    def submit(self, local_dir: Path, step: int) -> None:
        self._idle.clear()
        self._q.put((Path(local_dir), step))

    def wait(self, timeout: float | None = None) -> bool:
        """True when every submitted checkpoint is mirrored (and COMPLETE written by the main node)."""
        return self._idle.wait(timeout)

    def _work(self) -> None:
        while True:
            local, step = self._q.get()
            try:
                self._mirror(local, step)
            except Exception as e:  # noqa: BLE001 - a failed mirror leaves the previous checkpoint valid
                self.error = e
                log.error("mirroring checkpoint step-%d failed: %s", step, e)
            finally:
                if self._q.empty():
                    self._idle.set()

    def _mirror(self, local: Path, step: int) -> None:
        t0 = time.time()
        prefix = remote_prefix(self.output_uri, step)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        entries = [{"path": str(p.relative_to(local)), "size": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in files]
        storage.upload_tree(local, prefix, files=files)
        storage.write_bytes(storage.join(prefix, ".nodes", f"node-{self.node_rank}.json"),
                            json.dumps({"files": entries}).encode())
        if self.is_main:
            all_entries = self._gather_nodes(prefix)
            marker = {"step": step, "files": all_entries, "created_at": time.time()}
            storage.write_bytes(storage.join(prefix, "COMPLETE"), json.dumps(marker, indent=1).encode())
            self.completed.append(step)
            log.info("checkpoint step-%d mirrored to %s in %.1fs", step, prefix, time.time() - t0)
            if self.on_complete:
                self.on_complete(step)
            self._prune_remote()
        self._prune_local(local.parent)

    def _gather_nodes(self, prefix: str, timeout: float = 600) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            docs = {}
            for k in range(self.num_nodes):
                uri = storage.join(prefix, ".nodes", f"node-{k}.json")
                if storage.exists(uri):
                    docs[k] = json.loads(storage.read_bytes(uri))
                    for e in docs[k]["files"]:  # another node's list becomes the COMPLETE marker
                        paths.confine(e["path"], uri, error=VerificationError)
            if len(docs) == self.num_nodes:
                merged = {e["path"]: e for d in docs.values() for e in d["files"]}
                return sorted(merged.values(), key=lambda e: e["path"])
            if time.time() > deadline:
                raise TimeoutError(f"nodes {sorted(set(range(self.num_nodes)) - set(docs))} never mirrored {prefix}")
            time.sleep(0.5)

    def _prune_remote(self) -> None:
        steps = _remote_steps(self.output_uri)
        done = sorted(s for s, f in steps.items() if "COMPLETE" in f)
        keep = set(done[-self.keep:])
        newest = max(done) if done else -1
        for s in steps:
            if s not in keep and s < newest:
                storage.delete_prefix(remote_prefix(self.output_uri, s))

    def _prune_local(self, root: Path) -> None:
        local = sorted((int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := _STEP.search(p.name)))
        for _, p in local[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
