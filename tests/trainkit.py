"""Helpers for tests that really train: the tiny model (built once per session), chat data, and
running `sftjob` as a subprocess the way a pod runs it."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job import demo_data, tiny

_DIR = Path(tempfile.mkdtemp(prefix="sftjob-trainkit-"))


@functools.cache
def tiny_model() -> Path:
    return tiny.write(_DIR / "tiny-model")


@functools.cache
def chat_data(n: int = 200) -> Path:
    return demo_data.write_jsonl(_DIR / f"chat-{n}.jsonl", n=n)


def sftjob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def run(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(sftjob_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start(*args: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(sftjob_cmd(*args), stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_for_step(log: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> int:
    """Block until the run's progress lines reach `step`; returns the step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if line.startswith('{"event": "progress"'):
                s = json.loads(line)["step"]
                if s >= step:
                    return s
                break
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Poll `predicate` while the run is alive: for effects that happen in the background."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout}s")


def sigterm_and_wait(proc: subprocess.Popen, timeout: float = 120) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def losses(metrics_lines: list[str]) -> dict[int, float]:
    """step → loss from metrics.jsonl / progress lines (a later line for the same step wins)."""
    out = {}
    for line in metrics_lines:
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("loss") is not None and "step" in rec:
                out[rec["step"]] = rec["loss"]
    return out
