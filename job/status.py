"""status.json: where a run is, for people, `sftjob status` and Kubernetes.

The local copy under the run's work dir is the source of truth; every update is merged into it under a
file lock (the entrypoint and rank 0 both write) and then copied to ``<output>/status.json``.
The last lines also go to the termination log so `kubectl describe pod` shows why a pod ended.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
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
        doc = {
            "state": "pending", "run_id": run_id, "output": self.output_uri, "version": version(), "step": 0,
            "max_steps": max_steps, "epoch": 0.0, "loss": None, "tokens_per_second": None,
            "eta_seconds": None, "attempt": int(previous.get("attempt", 0)) + 1, "resumed_from": None,
            "started_at": now(), "updated_at": now(), "events": list(previous.get("events", []))[-200:],
            "mlflow_run_id": previous.get("mlflow_run_id"),  # a resumed attempt continues the same MLflow run
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
        return self.update(state=state, event=(state, message or state), **fields)

    def fail(self, exit_code: int, kind: str, message: str) -> dict:
        message = redact.text(message)  # status.json is published and read by `sftjob status`
        state = {ExitCode.INTERRUPTED: "interrupted", ExitCode.STALLED: "stalled"}.get(int(exit_code), "failed")
        doc = self.update(state=state, error={"exit_code": int(exit_code), "kind": kind, "message": message},
                          event=(state, message))
        write_termination_log(doc)
        return doc

    def _write(self, doc: dict) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.path)

    def push(self, doc: dict | None = None) -> None:
        if not self.output_uri:
            return
        body = json.dumps(doc or self.read(), indent=1, default=str).encode()
        for attempt in range(3):
            try:
                storage.write_bytes(storage.join(self.output_uri, "status.json"), body)
                return
            except Exception as e:  # noqa: BLE001 - status is best effort; training goes on
                if attempt == 2:
                    log.warning("could not update status.json: %s", e)
                time.sleep(0.2 * (attempt + 1))


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
