"""The store is down when training ends: keep the trained adapter, retry for a bounded time, exit 69.

Training never waits for the store (checkpoints and status.json go out in the background). Publishing
must reach it, so the end of a run retries for ``resilience.store_wait_seconds`` and then exits 69
(retryable) with the reason. The adapter stays in the run's work dir under the cache, beside
``trained.json`` (the outcome, the spec hash, the size and mtime of every adapter file): a rerun of the same
spec on a node that kept its cache publishes that adapter without training again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from job.errors import ExitCode, UnavailableError

log = logging.getLogger("sftjob.outage")
MARKER = "trained.json"
_abandoned = threading.Event()  # a store call is still hanging in a thread the process will not wait for


def abandoned() -> bool:
    """A bounded call gave up on a hung store call; its transfer threads would block interpreter exit."""
    return _abandoned.is_set()


def bounded(what: str, fn, seconds: float, *, kept: str | None = None):
    """fn() in a daemon thread, retried on UnavailableError (69) until it succeeds or ``seconds`` pass.

    A frozen store hangs a call for read_timeout × attempts; the deadline holds whatever botocore does.
    Other errors (permission, verification, ...) are not the store being down: they propagate at once.
    """
    deadline = time.monotonic() + seconds
    delay, reason = 2.0, None
    while True:
        fut: Future = Future()

        def target(fut=fut):
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                    fut.set_exception(e)

        threading.Thread(target=target, daemon=True, name=f"bounded-{what}").start()
        try:
            return fut.result(timeout=max(deadline - time.monotonic(), 0.1))
        except FutureTimeout:
            _abandoned.set()
            reason = reason or "no answer"
        except UnavailableError as e:
            reason = str(e).splitlines()[0]
            if time.monotonic() + delay < deadline:
                log.warning("%s failed (store unavailable: %s); retrying for up to %.0fs more",
                            what, reason, deadline - time.monotonic())
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
        where = f"; the trained adapter is kept in {kept}" if kept else ""
        raise UnavailableError(f"{what}: the store was unavailable for {seconds:.0f}s ({reason}){where}",
                               hint="a rerun with the same cache dir publishes it without retraining"
                               if kept else "check the store's endpoint and health, then rerun")


def leave_if_stuck(code: int, wait: float = 5.0) -> None:
    """Exit now with ``code`` when threads still run after an error: a transfer hung on a frozen store is
    joined by the interpreter's exit for read_timeout × attempts (minutes), far past the pod's grace period,
    so a SIGTERM during a fetch would end in SIGKILL instead of 75. They get ``wait`` seconds to end, none
    when a bounded call already gave up on one (``abandoned``); the exit handlers (the status push's last
    chance, the log) still run."""
    deadline = time.monotonic() + (0 if abandoned() else wait)
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join(max(deadline - time.monotonic(), 0))
    stuck = [t.name for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]
    if stuck:
        log.warning("exiting with %d thread(s) still waiting on the store (%s)", len(stuck), ", ".join(stuck[:4]))
        import atexit
        import os
        import sys

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _files(adapter: Path) -> dict[str, list[int]]:
    """rel path → [size, mtime_ns]: enough to see the local adapter was not touched since (full fine-tunes
    are gigabytes; hashing them twice would cost minutes, and publish hashes them for the manifest anyway)."""
    return {p.relative_to(adapter).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(adapter.rglob("*")) if p.is_file()}


def keep(workdir: Path, spec_hash: str, outcome) -> None:
    """Remember a finished training (before publishing starts) so a rerun need not train again."""
    doc = {"spec_hash": spec_hash, "outcome": dataclasses.asdict(outcome),
           "files": _files(Path(outcome.adapter_dir))}
    tmp = Path(workdir) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(Path(workdir) / MARKER)


def trained(workdir: Path, spec_hash: str, outcome_type):
    """The outcome a previous attempt of this spec trained and could not publish, if its adapter is intact."""
    path = Path(workdir) / MARKER
    try:
        doc = json.loads(path.read_text())
        if doc.get("spec_hash") != spec_hash:
            return None
        outcome = outcome_type(**doc["outcome"])
        if _files(Path(outcome.adapter_dir)) != doc["files"]:
            log.warning("the adapter kept by the previous attempt changed on disk; training again")
            return None
        return outcome
    except (OSError, ValueError, KeyError, TypeError):
        return None


def settle(workdir: Path, error: BaseException) -> None:
    """After a failed run: only a store outage (69) keeps the trained adapter for the next attempt."""
    if getattr(error, "exit_code", None) != ExitCode.UNAVAILABLE:
        forget(workdir)


def forget(workdir: Path) -> None:
    (Path(workdir) / MARKER).unlink(missing_ok=True)
