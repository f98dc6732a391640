"""status.json: where a run is, for people, `sftjob status` and Kubernetes.

The local copy under the run's work dir is the source of truth; every update is merged into it under a
file lock (the entrypoint and rank 0 both write) and then copied to ``<output>/status.json`` by a
background writer: rank 0 updates status from the training loop, and a slow or frozen store must not
stall the step (every rank waits for rank 0 at the next collective). The writer always sends the newest
local document (latest state wins, at most one pending), retries with backoff, and ``flush`` waits for
it with a deadline at the end of a phase.
The last lines also go to the termination log so `kubectl describe pod` shows why a pod ended.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from job import redact, storage, version
from job.errors import ExitCode

log = logging.getLogger("sftjob.status")

STATES = ("pending", "fetching", "preparing", "training", "publishing", "succeeded", "failed", "interrupted",
          "stalled")
TERMINATION_LOG = "/dev/termination-log"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Status:
    def __init__(self, workdir: Path, output_uri: str | None):
        self.path = Path(workdir) / "status.json"
        self.output_uri = output_uri
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pusher = _Pusher(self) if output_uri else None

    @contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def start(self, *, run_id: str, max_steps: int | None = None) -> dict:
        """Begin an attempt: attempt = previous attempt (from the output's status.json) + 1."""
        previous = {}
        if self.output_uri:
            try:
                previous = json.loads(storage.read_bytes(storage.join(self.output_uri, "status.json")))
            except Exception:  # noqa: BLE001 - first attempt, or unreadable: start fresh
                previous = {}
        previous = _earlier(previous)
        doc = {
            "state": "pending", "run_id": run_id, "output": self.output_uri, "version": version(), "step": 0,
            "max_steps": max_steps, "epoch": 0.0, "loss": None, "tokens_per_second": None,
            "eta_seconds": None, "attempt": previous["attempt"] + 1, "resumed_from": None,
            "started_at": now(), "updated_at": now(), "events": previous["events"][-200:],
            "mlflow_run_id": previous["mlflow_run_id"],  # a resumed attempt continues the same MLflow run
            "error": None,
        }
        with self._locked():
            self._write(doc)
        return self.update(event=("start", f"attempt {doc['attempt']} started"))

    def update(self, *, event: tuple[str, str] | None = None, push: bool = True, **fields) -> dict:
        with self._locked():
            doc = self.read()
            doc.update(fields)
            doc["updated_at"] = now()
            if event:
                doc.setdefault("events", []).append({"time": now(), "type": event[0], "message": event[1]})
            self._write(doc)
        if push:
            self.push(doc)
        return doc

    def phase(self, state: str, message: str | None = None, **fields) -> dict:
        assert state in STATES, state
        doc = self.update(state=state, event=(state, message or state), **fields)
        if state in ("succeeded", "failed", "interrupted"):  # the last word: give it time to arrive
            self.flush(FINAL_FLUSH_SECONDS)
        return doc

    def fail(self, exit_code: int, kind: str, message: str) -> dict:
        message = redact.text(message)  # status.json is published and read by `sftjob status`
        state = {ExitCode.INTERRUPTED: "interrupted", ExitCode.STALLED: "stalled"}.get(int(exit_code), "failed")
        doc = self.update(state=state, error={"exit_code": int(exit_code), "kind": kind, "message": message},
                          event=(state, message))
        write_termination_log(doc)
        self.flush(FINAL_FLUSH_SECONDS)
        return doc

    def _write(self, doc: dict) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.path)

    def push(self, doc: dict | None = None) -> None:
        """Ask the background writer to copy the newest local status.json to the output (returns at once)."""
        if self._pusher:
            self._pusher.request()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the newest state to reach the output; False if it has not."""
        return self._pusher.flush(timeout) if self._pusher else True


def _earlier(doc) -> dict:
    """What an attempt takes from the previous one's status.json, each field only when it has the shape this
    job writes: the file is read from the store, and a list or an attempt of "x" there crashed every retry."""
    doc = doc if isinstance(doc, dict) else {}
    attempt, events, mlflow_run = doc.get("attempt"), doc.get("events"), doc.get("mlflow_run_id")
    return {"attempt": attempt if type(attempt) is int and 0 <= attempt < 1_000_000 else 0,
            "events": [e for e in events if isinstance(e, dict) and all(isinstance(e.get(k), str) for k in
                                                                         ("time", "type", "message"))]
            if isinstance(events, list) else [],
            "mlflow_run_id": mlflow_run if isinstance(mlflow_run, str) else None}


#: how long the end of a run (fail, succeeded) waits for status.json to reach a slow store
FINAL_FLUSH_SECONDS = 5.0


class _Pusher:
    """One daemon thread that copies the local status.json to ``<output>/status.json``.

    It reads the local file when it sends (so a push is never older than the newest update), keeps at
    most one request pending however often ``request`` is called, and retries a failed PUT with
    backoff until a newer state or a success. A daemon thread: a PUT hung on a frozen store never
    keeps the process from exiting.
    """

    def __init__(self, status: Status):
        self.status = status
        self._cond = threading.Condition()
        self._pending = False  # the local doc changed since the last successful push
        self._busy = False
        self._failing = False
        self._late = False  # a flush ran out of time (the store hangs rather than fails)
        self._thread: threading.Thread | None = None
        atexit.register(self._last_chance)

    def request(self) -> None:
        with self._cond:
            self._pending = True
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked away
                self._thread = threading.Thread(target=self._run, daemon=True, name="status-push")
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    if not (self._failing or self._late):
                        log.warning("status.json not yet updated in the output after %.0fs", timeout)
                    self._late = True
                    return False
                self._cond.wait(left)
        return True

    def _last_chance(self) -> None:
        """At exit, a short wait for an update not yet sent; none when the store is known to be failing
        (the final states already waited for it with their own deadline)."""
        if not (self._failing or self._late):
            self.flush(2)

    def _run(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                self._pending, self._busy = False, True
            ok = False
            try:
                body = json.dumps(self.status.read(), indent=1, default=str).encode()
                storage.write_bytes(storage.join(self.status.output_uri, "status.json"), body)
                ok = True
            except Exception as e:  # noqa: BLE001 - status is best effort; training goes on
                if not self._failing:
                    log.warning("could not update status.json in the output (retrying in the background): %s", e)
                self._failing = True
            with self._cond:
                self._busy = False
                if ok:
                    if self._failing:
                        log.info("status.json reaches the output again")
                    self._failing, self._late, delay = False, False, 0.5
                else:
                    self._pending = True  # send the (newest) state again after a pause
                self._cond.notify_all()
            if not ok:
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def write_termination_log(doc: dict) -> None:
    """≤4 KiB summary for Kubernetes' terminationMessagePath."""
    path = os.environ.get("SFTJOB_TERMINATION_LOG", TERMINATION_LOG)
    err = doc.get("error") or {}
    lines = [f"state={doc.get('state')} step={doc.get('step')} attempt={doc.get('attempt')}"]
    if err:
        lines.append(f"exit_code={err.get('exit_code')} kind={err.get('kind')}")
        lines.append(str(err.get("message", ""))[:3000])
    lines += [f"{e['time']} {e['type']}: {e['message']}" for e in doc.get("events", [])[-5:]]
    text = "\n".join(lines)[-4000:]
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass
