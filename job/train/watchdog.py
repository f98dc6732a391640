"""A dead or stuck rank ends the job, and the job says which one.

Every process of the tree dies with its parent (PR_SET_PDEATHSIG): the launcher and the ranks live in
sessions of their own, so without it killing `sftjob run` would leave them training into the same output.

Each rank keeps a small file, ``<workdir>/ranks/rank-K.json`` (pid, node, phase, step, time; its exit code
when it returns), written at start and after every optimizer step. The entrypoint reads those files while
the launcher runs — a SIGSTOPped or deadlocked rank cannot report anything itself:
- a rank gone without a clean exit: the others get ``DEAD_RANK_GRACE`` seconds to end (NCCL may not notice
  a dead peer before its collective timeout), then the watch kills them; exit 71 naming the rank, its node and
  its exit code or signal (the signal from the launcher's failure report: only the launcher can waitpid it);
- no optimizer step for ``stall_seconds`` (3× before the first step, while checkpointing and finishing):
  every rank dumps its Python stacks (faulthandler on SIGUSR1; a stopped rank cannot, so /proc names it),
  the stacks go to the log, the tree is killed, status.json says ``stalled``; exit 72.

Over 400 lines for one reason: both sides of the heartbeat file (the ranks' Beacon and the entrypoint's
Watch) live here, so its format has one definition.
"""
from __future__ import annotations

import ctypes
import faulthandler
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path

from job.errors import RankDiedError, StalledError

log = logging.getLogger("sftjob.watchdog")

DEAD_RANK_GRACE = 15  # seconds the others get to notice a dead peer before the tree is killed
LENIENT = 3  # stall limit multiplier while loading, before the first step, checkpointing, finishing
STACK_WAIT = 10  # seconds to wait for the ranks' stack dumps
ENV_PARENT = "SFTJOB_ENTRYPOINT_PID"
_PR_SET_PDEATHSIG = 1

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork: the child only calls it
except (OSError, AttributeError):  # not Linux
    _prctl = None


def default_stall_seconds(cuda: bool) -> float:
    """600 s on GPUs (a stuck collective holds every GPU of the job); 1800 s on CPU, where steps are slow."""
    return 600.0 if cuda else 1800.0


def die_with_parent() -> None:
    """SIGKILL this process when the thread that started it exits."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_of(parent: int):
    """preexec_fn for the launcher: die with `parent`, and if it is already gone (the race before prctl), now."""
    def preexec() -> None:
        die_with_parent()
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


# ---- in each rank ------------------------------------------------------------------------------

class Beacon:
    """This rank's heartbeat file: rank, node, pid, phase, step, time; `exit` once it returns."""

    def __init__(self, workdir: Path, node: int):
        self.rank = int(os.environ.get("RANK", "0"))
        self.dir = Path(workdir) / "ranks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank-{self.rank}.json"
        st = _stat(os.getpid())
        self.doc = {"rank": self.rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "node": node,
                    "host": socket.gethostname(), "pid": os.getpid(), "start": st[2] if st else None,
                    "phase": "loading", "step": None, "time": time.time()}
        self._stacks = open(self.dir / f"stacks-{self.rank}.txt", "w")  # noqa: SIM115 - open for faulthandler
        faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True, chain=False)
        self._last_write = 0.0
        self._write()

    def beat(self, phase: str | None = None, step: int | None = None, *, every: float = 0.0) -> None:
        now = time.time()
        if every and now - self._last_write < every and phase == self.doc["phase"]:
            return
        if phase:
            self.doc["phase"] = phase
        if step is not None:
            self.doc["step"] = step
        self.doc["time"] = now
        self._write()

    def exit(self, code: int, error: str | None = None) -> None:
        self.doc.update(exit=int(code), error=error, time=time.time())
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc))
        os.replace(tmp, self.path)
        self._last_write = time.time()


_beacon: Beacon | None = None


def rank_start(workdir: str | Path, node: int) -> Beacon:
    """First thing in a rank: die with the launcher (and end now if the entrypoint is already gone), heartbeat."""
    global _beacon
    die_with_parent()
    expected = os.environ.get(ENV_PARENT)
    if expected:  # parent = the entrypoint (single process) or the launcher, whose parent is the entrypoint
        parent = os.getppid()
        st = _stat(parent)
        if parent != int(expected) and (st is None or st[1] != int(expected)):
            print(f"sftjob: rank {os.environ.get('RANK', '0')}: the entrypoint is gone; exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)
    _beacon = Beacon(Path(workdir), node)
    return _beacon


def beat(phase: str | None = None, step: int | None = None) -> None:
    if _beacon is not None:
        _beacon.beat(phase, step)


def heartbeat_callback():
    """A TrainerCallback that beats after every optimizer step (and while evaluating / checkpointing)."""
    from transformers import TrainerCallback

    class Heartbeat(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            beat("saving" if control.should_save else "train", state.global_step)

        def on_prediction_step(self, args, state, control, **kw):
            if _beacon is not None:
                _beacon.beat("eval", state.global_step, every=1.0)

        def on_evaluate(self, args, state, control, **kw):
            beat("train", state.global_step)

        def on_save(self, args, state, control, **kw):
            beat("train", state.global_step)

        def on_train_end(self, args, state, control, **kw):
            beat("finishing", state.global_step)

    return Heartbeat()


# ---- in the entrypoint -------------------------------------------------------------------------

_ELASTIC = re.compile(
    r"host\s*:\s*(?P<host>\S+)\s*\n\s*rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*(?P<local_rank>\d+)\)\s*\n"
    r"\s*exitcode\s*:\s*(?P<exitcode>-?\d+)\s*\(pid:\s*(?P<pid>\d+)\)")


def parse_elastic_failures(text: str) -> list[dict]:
    """The failures torch elastic reports when ranks end badly (rank, pid, exit code or -signal), its root cause first."""
    root = text.rfind("Root Cause")
    found = sorted(_ELASTIC.finditer(text), key=lambda m: m.start() < root)
    return [{"rank": int(m["rank"]), "local_rank": int(m["local_rank"]), "host": m["host"],
             "exitcode": int(m["exitcode"]), "pid": int(m["pid"])} for m in found]


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class Watch:
    """The entrypoint's view of its node's ranks while the launcher runs, and the verdict after."""

    def __init__(self, workdir: Path, *, stall_seconds: float, node: int):
        self.dir = Path(workdir) / "ranks"
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous attempt's ranks are not this one's
        self.dir.mkdir(parents=True)
        self.stall_seconds = stall_seconds
        self.node = node
        self.started = time.time()
        self.tail: deque[str] = deque(maxlen=600)
        self.proc = None
        self.verdict = None  # the error when the watchdog itself ended the tree
        self.first_dead: int | None = None  # the rank this watch saw die first
        self.dead_since: float | None = None
        self.ended_ranks: float | None = None  # when the watch killed the ranks that outlived a dead one
        self._tee: threading.Thread | None = None

    def env(self) -> dict[str, str]:
        return {ENV_PARENT: str(os.getpid())}

    def attach(self, proc) -> None:
        """Follow the launcher; its stderr (and the ranks') is copied to ours, keeping a tail for the verdict."""
        self.proc = proc
        if proc.stderr is not None:
            self._tee = threading.Thread(target=self._copy, args=(proc.stderr,), daemon=True, name="stderr-tee")
            self._tee.start()

    def _copy(self, pipe) -> None:
        out = getattr(sys.stderr, "buffer", None)
        for line in iter(pipe.readline, b""):
            self.tail.append(line.decode(errors="replace"))
            try:
                if out is not None:
                    out.write(line)
                    out.flush()
                else:
                    sys.stderr.write(line.decode(errors="replace"))
            except (OSError, ValueError):
                pass

    def ranks(self) -> dict[int, dict]:
        out = {}
        for p in self.dir.glob("rank-*.json"):
            try:
                doc = json.loads(p.read_text())
                out[int(doc["rank"])] = doc
            except (OSError, ValueError, KeyError):
                continue
        return out

    @staticmethod
    def _state(r: dict) -> str | None:
        """The rank's process state letter (R, S, T, Z, ...), None when it is gone (or the pid is reused)."""
        st = _stat(int(r["pid"]))
        if st is None or (r.get("start") is not None and st[2] != r["start"]):
            return None
        return st[0]

    def _dead(self, r: dict) -> bool:
        return self._state(r) in (None, "Z", "X") and r.get("exit") not in (0, 75)

    def tick(self, signalled: bool = False) -> None:
        """Called about once a second while the launcher runs: end the tree on a dead rank or a stall."""
        if self.verdict is not None or signalled:  # SIGTERM: the grace period bounds the rest
            return
        now = time.time()
        ranks = self.ranks()
        # killed (no exit recorded) before crashed: a crash is often a peer noticing the kill
        dead = sorted((r for r in ranks.values() if self._dead(r)), key=lambda r: (r.get("exit") is not None, r["time"]))
        if dead:
            if self.first_dead is None:
                self.first_dead, self.dead_since = dead[0]["rank"], now
            if self.ended_ranks is None and now - self.dead_since > DEAD_RANK_GRACE:
                # the launcher waits for them (up to its shutdown timeout); once they are gone it reports the
                # dead rank's signal itself
                log.error("rank %s ended %ss ago and the others are still running: ending them",
                          self.first_dead, DEAD_RANK_GRACE)
                self.kill(ranks, launcher=False)
                self.ended_ranks = now
            elif self.ended_ranks is not None and now - self.ended_ranks > 10:
                self.kill(ranks)
            return
        if not self.stall_seconds:
            return
        newest = max(ranks.values(), key=lambda r: r["time"], default=None)
        last = newest["time"] if newest else self.started
        phase = newest["phase"] if newest else "loading"
        if phase == "uploading":  # mirror.wait: the store's own retry bound applies
            return
        limit = self.stall_seconds * (1 if phase in ("train", "eval") else LENIENT)
        if now - last > limit:
            self.verdict = self._stall(ranks, now - last, phase)

    def kill(self, ranks: dict[int, dict] | None = None, *, launcher: bool = True) -> None:
        """SIGKILL every known rank (each has a session of its own) and the launcher's group."""
        for r in (ranks if ranks is not None else self.ranks()).values():
            if self._state(r) not in (None, "Z", "X"):
                try:
                    os.kill(int(r["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if launcher and self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(self) -> None:
        if self._tee is not None:
            self._tee.join(timeout=5)

    # ---- stalls ----------------------------------------------------------------------------
    def _stall(self, ranks: dict[int, dict], quiet: float, phase: str) -> StalledError:
        step = max((r["step"] or 0 for r in ranks.values()), default=0)
        stopped = sorted(k for k, r in ranks.items() if self._state(r) == "T")
        log.error("no optimizer step for %.0fs (phase %s, step %s, limit %ss): dumping every rank's stacks",
                  quiet, phase, step, self.stall_seconds)
        asked = {}
        for k, r in sorted(ranks.items()):
            if k in stopped or self._state(r) in (None, "Z", "X"):
                continue
            path = self.dir / f"stacks-{k}.txt"
            try:
                os.kill(int(r["pid"]), signal.SIGUSR1)
                asked[k] = path
            except (ProcessLookupError, PermissionError):
                pass
        stacks = self._collect(asked)
        summary = {}
        for k, r in sorted(ranks.items()):
            head = f"rank {k} (node {r['node']}, {r['host']}, pid {r['pid']}, last step {r['step']})"
            if k in stopped:
                log.error("%s is STOPPED (state T: SIGSTOP or a debugger); it cannot dump its stack", head)
                summary[str(k)] = "stopped (SIGSTOP): no stack"
            elif stacks.get(k):
                log.error("%s stack:\n%s", head, stacks[k].rstrip())
                summary[str(k)] = _summarise(stacks[k])
            else:
                log.error("%s gave no stack dump", head)
                summary[str(k)] = "no stack dump"
        self.kill(ranks)
        who = f"rank(s) {', '.join(map(str, stopped))} stopped (SIGSTOP); " if stopped else ""
        err = StalledError(
            f"training stalled: no optimizer step for {quiet:.0f}s at step {step} on node {self.node} "
            f"(resilience.stall_seconds={self.stall_seconds:g}); {who}every rank was ended; stacks are in the log",
            hint="the next attempt resumes from the newest complete checkpoint; if it stalls again at the same "
                 "place, read the stacks (a collective one rank never reached, a deadlocked data loader)")
        err.details = {"stall": {"step": step, "seconds": round(quiet, 1), "phase": phase, "node": self.node,
                                 "stopped_ranks": stopped, "stacks": summary}}
        return err

    def _collect(self, asked: dict[int, Path]) -> dict[int, str]:
        deadline = time.time() + STACK_WAIT
        sizes: dict[int, int] = {}
        while asked and time.time() < deadline:
            now = {k: p.stat().st_size if p.exists() else 0 for k, p in asked.items()}
            if all(now.values()) and now == sizes:  # every dump written and no longer growing
                break
            sizes = now
            time.sleep(0.5)
        return {k: p.read_text(errors="replace") if p.exists() else "" for k, p in asked.items()}

    # ---- dead ranks ------------------------------------------------------------------------
    def failure(self, rc: int, *, launcher_is_rank: bool = False):
        """The error for a launcher that ended with `rc` != 0: which rank died, how (exit 71), or the stall."""
        if self.verdict is not None:
            return self.verdict
        self.finish()
        ranks = self.ranks()
        reported = parse_elastic_failures("".join(self.tail))
        if launcher_is_rank and rc < 0 and ranks:
            reported.append({**ranks[min(ranks)], "exitcode": rc})
        by_rank = {f["rank"]: f for f in reversed(reported)}  # the root cause wins
        if self.first_dead is not None:
            f = by_rank.get(self.first_dead)
            return self._died(ranks.get(self.first_dead) or f, f)
        # a signal first (the cause, not the peers it took down), then what the launcher saw fail first, then
        # the earliest non-zero exit a rank recorded, then a rank gone without recording one
        killed = [f for f in reported if f["exitcode"] < 0]
        erred = sorted((r for r in ranks.values() if r.get("exit") not in (None, 0, 75)), key=lambda r: r["time"])
        silent = [r for r in ranks.values() if r.get("exit") is None]
        if killed or reported:
            f = (killed or reported)[0]
            return self._died(ranks.get(f["rank"], f), f)
        if erred or silent:
            r = (erred or silent)[0]
            return self._died(r, by_rank.get(r["rank"]))
        err = RankDiedError(f"training processes exited with code {rc} on node {self.node}; see the log above")
        err.details = {"failed_rank": {"node": self.node, "launcher_exit_code": rc}}
        return err

    def _died(self, r: dict, reported: dict | None) -> RankDiedError:
        code = reported["exitcode"] if reported else r.get("exit")
        info = {"rank": r.get("rank"), "node": r.get("node", self.node), "host": r.get("host"), "pid": r.get("pid"),
                "step": r.get("step"), "exit_code": None, "signal": None, "error": r.get("error")}
        if code is not None and code < 0:
            info["signal"] = _signame(-code)
            how = f"was killed by signal {-code} ({info['signal']})"
        elif code is not None:
            info["exit_code"] = code
            how = f"exited with code {code}" + (f": {r['error']}" if r.get("error") else "")
        else:
            how = "ended without reporting an exit (killed)"
        where = f"node {info['node']}" + (f", {info['host']}" if info["host"] else "") + f", pid {info['pid']}"
        at = f" at step {info['step']}" if info["step"] is not None else " before its first step"
        err = RankDiedError(f"training process rank {info['rank']} ({where}) {how}{at}; the other ranks were ended",
                            hint="retryable: the next attempt resumes from the newest complete checkpoint"
                                 + ("; an OOM kill shows as SIGKILL: check the pod's memory limit"
                                    if info["signal"] == "SIGKILL" else ""))
        err.details = {"failed_rank": info}
        return err


def _summarise(dump: str, frames: int = 4) -> str:
    """The innermost frames of each thread of a faulthandler dump, the interrupted (main) thread first."""
    out, cur = [], None
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            cur = []
            out.insert(0 if line.startswith("Current") else len(out), cur)
        elif cur is not None and line.strip().startswith("File ") and len(cur) < frames:
            m = re.match(r'\s*File "(.+)", line (\d+) in (\S+)', line)
            if m:
                cur.append(f"{m[3]} ({os.path.basename(m[1])}:{m[2]})")
    return " | ".join(" < ".join(t) for t in out if t)[:1500]
