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

from job import demo_data, proctree, tiny

_DIR = Path(tempfile.mkdtemp(prefix="sftjob-trainkit-"))


@functools.cache
def tiny_model() -> Path:
    return tiny.write(_DIR / "tiny-model")


@functools.cache
def chat_data(n: int = 200) -> Path:
    return demo_data.write_jsonl(_DIR / f"chat-{n}.jsonl", n=n)


#: a steady run: seed 3, constant lr, micro-batch 2, a loss line every step (losses comparable across attempts)
STEADY = ["--logging-steps", "1", "--seed", "3", "--learning-rate", "1e-3", "--max-length", "256",
          "--per-device-train-batch-size", "2", "--lr-scheduler-type", "constant"]


def steady_args(out, steps: int, *extra: str) -> list[str]:
    """`sftjob run` arguments of a steady tiny-model run of `steps` steps into `out`."""
    return ["run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(out),
            "--max-steps", str(steps), *STEADY, *extra]


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


def _pending(pid: int, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (signum - 1)) for m in masks)


def _stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (or the process gone)."""
    try:
        return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "TtXZ"
                   for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True


def _sig_lines(pid: int) -> str:
    try:
        return " ".join(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if x.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
    except OSError:
        return "gone"


def interrupt_at(log: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> int:
    """SIGTERM the run once it reaches `step`, without a race: steps here take ~0.1 s, and on a loaded
    machine the signal's way sftjob → accelerate → ranks can take longer than the rest of the run. So
    the ranks are frozen (SIGSTOP) first, SIGTERM goes to sftjob, and they continue only once every rank
    holds it pending: they stop one step or two later. → the launcher's exit code."""
    wait_for_step(log, proc, step, timeout=timeout)
    ranks = proctree.ranks(proc.pid)
    if not ranks:  # the ranks are gone already: the run outran the test (the caller sees it in the step)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=120)
    for r in ranks:
        r.send_signal(signal.SIGSTOP)
    try:
        # a rank takes its SIGSTOP only when a thread next runs: a SIGTERM arriving first is taken by a
        # still-running thread (lower signals go first) and never shows as pending. So: all threads stopped
        deadline = time.time() + 60
        while not all(_stopped(r.pid) for r in ranks):
            assert time.time() < deadline, "the ranks did not stop: " + "; ".join(_sig_lines(r.pid) for r in ranks)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while not all(_pending(r.pid, signal.SIGTERM) for r in ranks):
            assert time.time() < deadline, "the SIGTERM never reached the frozen ranks: " + "; ".join(
                f"{r.pid} (parent {r.ppid()}) {_sig_lines(r.pid)}" for r in ranks)
            time.sleep(0.05)
    finally:
        for r in ranks:
            try:
                r.send_signal(signal.SIGCONT)
            except Exception:  # noqa: BLE001 - a rank that is gone needs no waking
                pass
    return proc.wait(timeout=120)


def losses(metrics_lines: list[str]) -> dict[int, float]:
    """step → loss from metrics.jsonl / progress lines (a later line for the same step wins)."""
    out = {}
    decoder = json.JSONDecoder()
    for line in metrics_lines:
        line = line.strip()
        while line.startswith("{"):  # two ranks' lines may share one (print writes the newline apart)
            rec, end = decoder.raw_decode(line)
            line = line[end:].lstrip()
            if rec.get("loss") is not None and "step" in rec:
                out[rec["step"]] = rec["loss"]
    return out
