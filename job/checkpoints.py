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
import re
import shutil
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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
    identity: dict | None = None  # what defined the run that wrote it (job/identity.py); None: an older job


def newest_marker(output_uri: str) -> tuple[int, dict] | None:
    """(step, marker) of the newest complete checkpoint whose marker reads; None when there is none.
    Nothing is downloaded but the markers: the resume-identity check runs before any fetch."""
    for step in reversed(complete_steps(output_uri)):
        try:
            return step, _read_marker(remote_prefix(output_uri, step))
        except VerificationError as e:
            log.warning("checkpoint step-%d: %s", step, e.message)
    return None


def discard_all(output_uri: str) -> None:
    """Every checkpoint of the output, markers first (a kill mid-delete leaves no false COMPLETE)."""
    for step in complete_steps(output_uri):
        storage.delete(storage.join(remote_prefix(output_uri, step), "COMPLETE"))
    storage.delete_prefix(storage.join(output_uri, "checkpoints") + "/")


def find_and_fetch(output_uri: str, local_root: Path, check=None) -> Found | None:
    """Newest complete checkpoint, downloaded to local_root/checkpoint-N and verified; None if none.

    A marker that cannot be read or names a path outside its checkpoint is skipped like a corrupt one.
    ``check(path, step)`` names why a sealed checkpoint would not load (the launcher passes
    job.ckptcontent.problem): such a one is skipped and removed too, and the next older one tried.
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
        why = check(dest, step) if check else None
        if why:  # sealed, but it would not load: the ranks would crash on it at every retry
            log.error("skipping checkpoint step-%d: %s; removing it; trying an older one", step, why)
            shutil.rmtree(dest, ignore_errors=True)
            storage.delete_prefix(prefix)
            continue
        log.info("resuming from complete checkpoint step-%d (%d files)", step, len(marker["files"]))
        return Found(step, dest, marker.get("identity"))
    if steps:
        log.warning("no usable checkpoint among %d: starting from step 0", len(steps))
    return None


def _read_marker(prefix: str) -> dict:
    """The COMPLETE marker, every entry checked: a relative path inside the checkpoint, a size, a sha256;
    its run identity, when there is one, an object of field names."""
    what = f"{prefix}/COMPLETE"
    body = storage.read_bytes(storage.join(prefix, "COMPLETE"))
    marker = paths.file_document(body, what, error=VerificationError)
    ident = marker.get("identity", {})  # compared with this run's (job/identity.py), never used as a path
    if not (isinstance(ident, dict) and all(isinstance(k, str) for k in ident)):
        raise VerificationError(f"{what}: its run identity is not an object of field names (not what this job writes)")
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


_mirrors: weakref.WeakSet = weakref.WeakSet()


def uploads_in_flight() -> bool:
    """Some mirror is still uploading (its transfer threads may hang on a frozen store and block exit)."""
    return any(m.busy for m in list(_mirrors))


class Superseded(Exception):
    """A newer checkpoint was submitted before this one reached the output; the newer one is mirrored."""


class Mirror:
    """Background uploader of local checkpoints, one per node (run by each node's local rank 0).

    Training never waits for the store: ``submit`` returns at once with a Future. At most one checkpoint
    is pending behind the one being uploaded; a newer submit replaces it (its Future is cancelled), so a
    long outage leaves one checkpoint to send, never a backlog. A failed upload is retried with backoff
    until it succeeds, a newer checkpoint supersedes it, or ``wait``'s deadline passes. ``wait`` says the
    truth: True only when the newest checkpoint really is in the output.
    The worker is a daemon thread (not an executor): an upload hung on a frozen store must not keep the
    process from exiting at the end of its grace period.
    """

    def __init__(self, output_uri: str, *, node_rank: int, num_nodes: int, is_main: bool, keep: int,
                 on_complete=None, on_error=None, resumed_step: int | None = None, identity: dict | None = None):
        self.output_uri, self.node_rank, self.num_nodes = output_uri, node_rank, num_nodes
        self.identity = identity  # recorded in every COMPLETE marker: a resume under another spec is refused
        self.is_main, self.keep, self.on_complete, self.on_error = is_main, keep, on_complete, on_error
        self._cond = threading.Condition()
        self._pending: tuple[Path, int, Future] | None = None
        self._newest: tuple[Future, int] | None = None  # the newest submitted checkpoint and its step
        self._give_up_at: float | None = None  # monotonic; set by wait(): stop retrying then
        self.completed: list[int] = []
        #: the newest checkpoint known to be complete in the output: the one the next attempt resumes from
        self.last_complete: int | None = resumed_step
        self.error: BaseException | None = None
        self._reported: set[int] = set()
        _mirrors.add(self)
        threading.Thread(target=self._work, daemon=True, name="checkpoint-mirror").start()

    def submit(self, local_dir: Path, step: int) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._pending is not None:
                old_local, old_step, old = self._pending
                old.cancel()
                log.warning("checkpoint step-%d was not mirrored yet (store slow or down); step-%d replaces it",
                            old_step, step)
                if old_local != Path(local_dir):
                    shutil.rmtree(old_local, ignore_errors=True)
            self._pending = (Path(local_dir), step, fut)
            self._newest = (fut, step)
            self._cond.notify_all()
        return fut

    def wait(self, timeout: float | None = None) -> bool:
        """True when the newest submitted checkpoint is in the output (COMPLETE written by the main node).

        False when its upload failed or did not finish within ``timeout``; retries stop at that deadline.
        """
        with self._cond:
            newest = self._newest
            if timeout is not None:
                self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        if newest is None:
            return True
        fut, step = newest
        try:
            fut.result(timeout)
        except FutureTimeout:
            self._report(step, TimeoutError(f"not stored within {timeout:.0f}s (the store is slow or unreachable)"))
            return False
        except Exception:  # noqa: BLE001 - failed or cancelled: self.error has the reason
            return False
        return True

    def _report(self, step: int, e: BaseException) -> None:
        """A checkpoint that did not reach the output: logged and handed to on_error once per step."""
        with self._cond:
            if step in self._reported:
                return
            self._reported.add(step)
        self.error = e
        log.error("mirroring checkpoint step-%d failed: %s", step, e)
        if self.on_error:
            self.on_error(step, e)

    @property
    def busy(self) -> bool:
        """An upload is still running or pending (its thread may hang on a frozen store)."""
        with self._cond:
            return self._pending is not None or (self._newest is not None and not self._newest[0].done())

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                local, step, fut = self._pending
                self._pending = None
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                self._mirror_retrying(local, step)
            except BaseException as e:  # noqa: BLE001 - a failed mirror leaves the previous checkpoint valid
                if not isinstance(e, Superseded):
                    self._report(step, e)  # before the Future: wait() returns with the event recorded
                fut.set_exception(e)
            else:
                self.error = None
                fut.set_result(step)
            finally:
                self._prune_local(local.parent)

    def _mirror_retrying(self, local: Path, step: int) -> None:
        delay, warned = 1.0, False
        while True:
            try:
                self._mirror(local, step)
                if warned:
                    log.info("checkpoint step-%d reached the output after retries", step)
                return
            except Superseded:
                raise
            except Exception as e:
                with self._cond:
                    newer = self._pending[1] if self._pending else None
                    left = None if self._give_up_at is None else self._give_up_at - time.monotonic()
                if newer is not None:
                    log.warning("mirroring checkpoint step-%d failed (%s); mirroring the newer step-%d instead",
                                step, e, newer)
                    raise Superseded(f"step-{step} superseded by step-{newer}") from e
                if left is not None and left <= delay:
                    raise
                if not warned:
                    log.warning("mirroring checkpoint step-%d failed (%s); retrying in the background", step, e)
                    warned = True
                with self._cond:  # woken early by wait() (a deadline) or a newer submit
                    self._cond.wait(delay)
                delay = min(delay * 2, 30.0)

    def _mirror(self, local: Path, step: int) -> None:
        t0 = time.time()
        prefix = remote_prefix(self.output_uri, step)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        entries = [{"path": str(p.relative_to(local)), "size": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in files]
        if self.is_main:  # a COMPLETE from an earlier attempt at this step must never cover new bytes
            storage.delete(storage.join(prefix, "COMPLETE"))
        storage.upload_tree(local, prefix, files=files)
        storage.write_bytes(storage.join(prefix, ".nodes", f"node-{self.node_rank}.json"),
                            json.dumps({"files": entries}).encode())
        if self.is_main:
            all_entries = self._gather_nodes(prefix)
            marker = {"step": step, "files": all_entries, "created_at": time.time()}
            if self.identity is not None:
                marker["identity"] = self.identity
            storage.write_bytes(storage.join(prefix, "COMPLETE"), json.dumps(marker, indent=1).encode())
            self.completed.append(step)
            self.last_complete = step
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
                if storage.exists(uri):  # another node's list becomes the COMPLETE marker: checked first
                    docs[k] = {"files": paths.file_entries(storage.read_bytes(uri), uri, error=VerificationError)}
            if len(docs) == self.num_nodes:
                merged = {e["path"]: e for d in docs.values() for e in d["files"]}
                return sorted(merged.values(), key=lambda e: e["path"])
            if time.time() > deadline:
                raise TimeoutError(f"nodes {sorted(set(range(self.num_nodes)) - set(docs))} never mirrored {prefix}")
            with self._cond:  # another node may have skipped this step for a newer one: so do we
                if self._pending is not None:
                    raise Superseded(f"{prefix}: step-{self._pending[1]} is newer; not waiting for the other nodes")
            time.sleep(0.5)

    def _prune_remote(self) -> None:
        steps = _remote_steps(self.output_uri)
        done = sorted(s for s, f in steps.items() if "COMPLETE" in f)
        keep = set(done[-self.keep:])
        newest = max(done) if done else -1
        for s in steps:
            if s not in keep and s < newest:
                prefix = remote_prefix(self.output_uri, s)
                if "COMPLETE" in steps[s]:  # the marker goes first: a kill mid-delete leaves no false COMPLETE
                    storage.delete(storage.join(prefix, "COMPLETE"))
                storage.delete_prefix(prefix)

    def _prune_local(self, root: Path) -> None:
        local = sorted((int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := _STEP.search(p.name)))
        for _, p in local[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
