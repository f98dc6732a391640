"""Randomized fault soak (issue 26): the real `sftjob run` against a real SeaweedFS, rerun after every
retryable exit the way a Job with backoffLimit reruns its pod, with faults injected at seeded, logged moments:

- ``kill_tree``   kill -9 of the whole process tree (node loss; the ranks have sessions of their own)
- ``sigterm``     SIGTERM to the entrypoint (pod deletion, preemption)     → 75
- ``kill_rank``   kill -9 of one training process (dead peer)              → 71
- ``stop_rank``   SIGSTOP of one training process (hang; --stall-seconds)  → 72
- ``freeze``      the store frozen (SIGSTOP of SeaweedFS) for 5–20 s; the pod survives it → the run goes on
- ``restart_store`` the store killed and started again on its data after 1–5 s (connections reset, then
                  refused, then 500s while its volumes load) → the run goes on
- ``slow_store``  the store answering slowly for 10–20 s (frozen and thawed in turns of 0.1–0.5 s) → goes on
- ``torn``        kill -9 of the tree once a checkpoint is sealed, then one of its files truncated in the store
                  (a torn upload under a COMPLETE marker): the next attempt skips it for the previous one
- ``tamper``      the same, with a Trainer file (trainer_state.json, optimizer, RNG state) rewritten and the
                  marker resealed over it: only the content check (job/ckptcontent.py) can tell

Every restart is a new pod: an empty cache and work directory. Optionally (--vary-world) a restart runs
on another process count (1 ↔ 2), as Kueue re-admits on other capacity.

What every soak proves (exit 1 and the failing lines otherwise; a table on stderr, one JSON object on stdout):
exactly one _SUCCESS and the published files verify (publish.verify_published); metrics.jsonl has every step
once; each step's loss equals an uninterrupted run with the same seed (max |Δ| printed, --tolerance); no fault
recomputes more than one checkpoint interval (SIGTERM none); each exit code is the one docs/failures.md gives
for its fault, never a non-retryable one; nothing written in the store outside the output prefix; no process
left behind; time from each fault to the next optimizer step (median and max).

Usage: python bench/soak.py --seed 1 --faults 6 [--strategy ddp] [--processes 2] [--steps 24] [--vary-world]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from job import demo_data, proctree, tiny  # noqa: E402
from job.errors import NON_RETRYABLE, ExitCode  # noqa: E402

KINDS = ("kill_tree", "sigterm", "kill_rank", "stop_rank", "freeze", "restart_store", "slow_store", "torn", "tamper")
EXPECTED = {"kill_tree": -signal.SIGKILL, "sigterm": ExitCode.INTERRUPTED, "kill_rank": ExitCode.RANK_DIED,
            "stop_rank": ExitCode.STALLED, "freeze": ExitCode.OK, "restart_store": ExitCode.OK,
            "slow_store": ExitCode.OK, "torn": -signal.SIGKILL, "tamper": -signal.SIGKILL}
STORE = ("freeze", "restart_store", "slow_store")  # the pod survives these: the same attempt goes on ...
#: ... except before training, where a store that refuses or fails requests past storage.max_attempts ends the
#: attempt with 69 (docs/failures.md: store unavailable, retryable) and the rerun goes on
BEFORE_TRAINING = ("start", "fetch", "prepare", "model load")
CORRUPT = ("torn", "tamper")  # the newest checkpoint is lost: up to two intervals are trained again
#: log markers → the phase the run is in once the line has appeared (the last one seen wins)
PHASES = (("fetch", "fetching"), ("prepare", "prepared data"), ("model load", "launching"),
          ("step", '"event": "progress"'), ("checkpoint", "checkpoint step-"), ("resume", "resuming from"),
          ("verify", "adapter verified"), ("publish", "published"))
SAVE_STEPS = 4


def phase_of(log: str) -> str:
    best, at = "start", -1
    for name, marker in PHASES:
        i = log.rfind(marker)
        if i > at:
            best, at = name, i
    return best


def progress(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if line.startswith('{"event": "progress"'):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def sealed_steps(s3, output: str) -> list[int]:
    """Steps of the checkpoints with a COMPLETE marker in the store under `output` (s3://bucket/prefix)."""
    bucket, prefix = output[len("s3://"):].split("/", 1)
    try:
        keys = s3.keys(bucket, f"{prefix}/checkpoints/")
    except Exception:  # noqa: BLE001 - the store may be down or frozen: nothing sealed seen yet
        return []
    return sorted(int(k.split("/")[-2][len("step-"):]) for k in keys if k.endswith("/COMPLETE"))


def left_behind(tag: str) -> list[int]:
    """Processes of this soak still running (each attempt carries SOAK_TAG in its environment)."""
    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SOAK_TAG") == tag:
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


class Soak:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.work = Path(a.workdir or tempfile.mkdtemp(prefix="sftjob-soak-"))
        self.tag = uuid.uuid4().hex
        self.model = tiny.write(self.work / "model")
        self.data = demo_data.write_jsonl(self.work / "chat.jsonl", n=200)
        self.events: list[dict] = []
        self.problems: list[str] = []
        self.max_diff: float | None = None

    def args(self, output: str, processes: int) -> list[str]:
        return [sys.executable, "-m", "job", "run", "--model", str(self.model), "--data", str(self.data),
                "--output", output, "--max-steps", str(self.a.steps), "--logging-steps", "1", "--seed", "3",
                "--learning-rate", "1e-3", "--max-length", "256", "--per-device-train-batch-size", "2",
                "--gradient-accumulation-steps", str(2 // processes if self.a.vary_world else 1),
                "--lr-scheduler-type", "constant", "--save-steps", str(SAVE_STEPS), "--stall-seconds", "15",
                "--num-processes", str(processes), "--distributed", self.a.strategy if processes > 1 else "auto",
                # another process count draws other dropout masks (each rank its own RNG stream): without
                # dropout the same samples give the same step on 1 × accumulation 2 and on 2 processes
                *(["--lora-dropout", "0"] if self.a.vary_world else [])]

    def env(self, pod: Path, s3) -> dict:
        return {**os.environ, **s3.env, "SFTJOB_CACHE_DIR": str(pod / "cache"), "SOAK_TAG": self.tag,
                "HOME": str(self.work / "home")}

    def reference(self, s3) -> dict[int, float]:
        pod = self.work / "reference"
        r = subprocess.run(self.args(str(pod / "out"), self.world(0)), capture_output=True, text=True,
                           env=self.env(pod, s3), timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"the uninterrupted reference run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return {p["step"]: p["loss"] for p in progress(r.stdout) if p.get("loss") is not None}

    def world(self, attempt: int) -> int:
        if self.a.vary_world:
            return 1 if attempt == 0 else 1 + self.rng.randrange(2)
        return self.a.processes

    def run(self) -> int:
        from job.storage import devserver

        s3 = devserver.start(self.work / "seaweedfs")
        try:
            return self._run(s3)
        finally:
            s3.thaw()  # a frozen store would not stop
            s3.stop()

    def _run(self, s3) -> int:
        """Runs one after another (each its own output, as a Job per run), until every fault is spent."""
        bucket = s3.bucket("soak")
        before = set(s3.keys(bucket))
        ref = self.reference(s3)
        faults = []  # in rounds: every kind once per round, in a seeded order
        while len(faults) < self.a.faults:
            faults += self.rng.sample(self.a.kinds, len(self.a.kinds))
        faults = faults[: self.a.faults]
        t_start, run = time.time(), 0
        while True:
            prefix = f"run{run}"
            self._one_run(s3, f"s3://{bucket}/{prefix}", run, faults)
            self._check(s3, bucket, prefix, ref)
            run += 1
            if not faults or self.problems:
                break
        keys = set(s3.keys(bucket))
        outside = sorted(k for k in keys - before if not k.startswith(tuple(f"run{r}/" for r in range(run))))
        if outside:
            self.problems.append(f"written outside the outputs: {outside[:5]}")
        left = left_behind(self.tag)
        if left:
            self.problems.append(f"processes left running: {left}")
            for pid in left:
                proctree.kill_tree(pid)
        return self._report(ref, time.time() - t_start)

    def _one_run(self, s3, output: str, run: int, faults: list[str]) -> None:
        attempt = 0
        pending = []  # faults whose next optimizer step is still to come
        while True:
            if attempt > self.a.faults + 3:
                self.problems.append(f"run {run}: no success after {attempt} attempts")
                return
            pod = self.work / f"run{run}-pod{attempt}"  # a new pod: an empty disk
            procs = self.world(attempt)
            logf = pod / "log"
            pod.mkdir(parents=True)
            with open(logf, "w") as f:
                proc = subprocess.Popen(self.args(output, procs), stdout=f, stderr=subprocess.STDOUT,
                                        env=self.env(pod, s3))
            fault = faults.pop(0) if faults else None
            target = self._target(fault) if fault else None
            if fault in CORRUPT:
                target.update(output=output, sealed=lambda: sealed_steps(s3, output),
                              sealed_before=max(sealed_steps(s3, output) or [0]))
            event = {"run": run, "attempt": attempt, "processes": procs, "fault": fault}
            t0 = time.time()
            if fault:
                self._inject(proc, fault, target, logf, s3, event)
            rc = proc.wait(timeout=1200)
            text = logf.read_text(errors="replace")
            steps = progress(text)
            event.update(rc=rc, first_step=steps[0]["step"] if steps else None,
                         last_step=steps[-1]["step"] if steps else None, seconds=round(time.time() - t0, 1))
            if pending and steps:  # every fault since the last optimizer step recovers at this attempt's first
                for e in pending:
                    e["recovery_s"] = round(steps[0]["time"] - e["at"], 2)
                    e["resumed_at"] = steps[0]["step"] - 1
                    if e.get("corrupted_step") is not None and e["resumed_at"] >= e["corrupted_step"]:
                        self.problems.append(f"run {run} attempt {attempt}: resumed from the damaged {e['corrupted']}")
                    said = (f"skipping checkpoint step-{e.get('corrupted_step')}:",
                            f"checkpoint step-{e.get('corrupted_step')} failed its checksum")
                    if e.get("corrupted_step") is not None and not any(x in text for x in said):
                        self.problems.append(f"run {run} attempt {attempt}: no log line says why {e['corrupted']} "
                                             "was skipped")
                pending = []
            if fault and event.get("injected"):
                expected = {int(EXPECTED[fault])}
                if fault in STORE and event["phase"] in BEFORE_TRAINING:
                    expected.add(int(ExitCode.UNAVAILABLE))
                if rc not in expected:
                    self.problems.append(f"run {run} attempt {attempt}: {fault} in phase {event['phase']} exited "
                                         f"{rc}, docs/failures.md gives {' or '.join(map(str, sorted(expected)))}")
                if fault in STORE and rc == 0:
                    after = [p for p in steps if p["time"] > event["at"]]
                    event["recovery_s"] = round(after[0]["time"] - event["at"], 2) if after else None
                elif rc != 0:
                    pending.append(event)
            elif fault:  # the run ended before the fault was due: it goes to the next run
                faults.insert(0, fault)
            self.events.append(event)
            print(f"soak: {json.dumps(event)}", file=sys.stderr, flush=True)
            if rc in [int(c) for c in NON_RETRYABLE]:
                self.problems.append(f"run {run} attempt {attempt}: non-retryable exit {rc} after a transient fault")
                return
            if rc == 0:
                return
            attempt += 1

    def _target(self, fault: str) -> dict:
        """The phase a fault aims at, seeded: every phase is hit in a long soak."""
        phases = {"kill_rank": ("step", "checkpoint"), "stop_rank": ("step", "checkpoint"),
                  **{k: ("start", "step", "checkpoint", "publish") for k in STORE},
                  **{k: ("sealed",) for k in CORRUPT}}.get(
            fault, ("start", "model load", "step", "checkpoint", "resume", "publish"))
        phase = self.rng.choice(phases)
        saves = list(range(SAVE_STEPS, self.a.steps, SAVE_STEPS)) or [1]
        return {"phase": phase, "after_s": round(self.rng.uniform(0.3, 1.5), 2),
                "load_s": round(self.rng.uniform(0.0, 4.0), 2), "step": self.rng.randint(1, self.a.steps - 1),
                "save": self.rng.choice(saves)}

    def _due(self, t: dict, text: str, t0: float) -> bool:
        steps = progress(text)
        last = steps[-1]["step"] if steps else 0
        p = t["phase"]
        if p == "start":
            return time.time() >= t0 + t["after_s"]
        if p == "model load":
            i = text.find("launching")
            return i >= 0 and time.time() >= t.setdefault("seen", time.time()) + t["load_s"]
        if p == "step":
            return last >= t["step"]
        if p == "checkpoint":  # the save right after this step: its upload is in flight
            return last >= t["save"]
        if p == "resume":
            return "resuming from" in text or last >= 1
        if p == "publish":
            return "adapter verified" in text
        if p == "sealed":  # a checkpoint this attempt made is sealed in the store (one listing per poll)
            return max(t["sealed"](), default=0) > t["sealed_before"]
        return True

    def _inject(self, proc, fault, target, logf, s3, event) -> None:
        t0 = time.time()
        while proc.poll() is None:
            text = logf.read_text(errors="replace")
            if self._due(target, text, t0) and (fault not in ("kill_rank", "stop_rank") or proctree.ranks(proc.pid)):
                break
            time.sleep(0.25 if fault in CORRUPT else 0.02)  # those poll the store
        if proc.poll() is not None:
            event.update(injected=False, finished_first=True, phase="ended")
            return
        text = logf.read_text(errors="replace")
        steps = progress(text)
        event.update(injected=True, phase=phase_of(text), aimed=target["phase"], at=time.time(),
                     step_at_fault=steps[-1]["step"] if steps else 0)
        if fault == "kill_tree":
            proctree.kill_tree(proc.pid)
        elif fault == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif fault in ("kill_rank", "stop_rank"):
            rs = proctree.ranks(proc.pid)
            if not rs:
                event.update(injected=False, finished_first=True, phase="ended")
                return
            self.rng.choice(rs).send_signal(signal.SIGKILL if fault == "kill_rank" else signal.SIGSTOP)
        elif fault == "freeze":
            seconds = self.rng.uniform(5, 20)
            event["frozen_s"] = round(seconds, 1)
            s3.freeze()
            try:
                end = time.time() + seconds
                while time.time() < end and proc.poll() is None:
                    time.sleep(0.1)
            finally:
                s3.thaw()
        elif fault == "restart_store":
            event["down_s"] = round(self.rng.uniform(1, 5), 1)
            s3.restart(down=event["down_s"])
        elif fault == "slow_store":
            seconds = self.rng.uniform(10, 20)
            turns = random.Random(self.rng.random())  # how many turns fit is timing: not from the soak's stream
            event["slow_s"] = round(seconds, 1)
            end = time.time() + seconds
            while time.time() < end and proc.poll() is None:
                with s3.frozen():
                    time.sleep(turns.uniform(0.1, 0.5))
                time.sleep(turns.uniform(0.1, 0.5))
        elif fault in CORRUPT:
            proctree.kill_tree(proc.pid)
            proc.wait(timeout=60)
            event.update(self._corrupt(s3, target["output"], fault))

    def _corrupt(self, s3, output: str, fault: str) -> dict:
        """The newest sealed checkpoint of `output`, one file damaged in the store: torn (its marker left as
        it was: the checksum tells) or tampered with (a Trainer file, the marker resealed over it)."""
        import hashlib

        bucket, prefix = output[len("s3://"):].split("/", 1)
        step = max(sealed_steps(s3, output))
        base = f"{prefix}/checkpoints/step-{step}"
        c = s3.client()
        marker = json.loads(c.get_object(Bucket=bucket, Key=f"{base}/COMPLETE")["Body"].read())
        files = sorted(f["path"] for f in marker["files"])
        if fault == "torn":
            victim = max(marker["files"], key=lambda f: f["size"])["path"]
        else:
            trainer = [f for f in files if f == "trainer_state.json" or f.startswith(("rng_state", "optimizer"))
                       or f.endswith((".pt", ".pth"))]
            victim = self.rng.choice(trainer or files)
        body = c.get_object(Bucket=bucket, Key=f"{base}/{victim}")["Body"].read()
        if victim.endswith(".json"):
            doc = json.loads(body)
            doc["global_step"] = step + 1000
            damaged = json.dumps(doc).encode()
        else:
            damaged = body[: max(1, len(body) // 2)]
        c.put_object(Bucket=bucket, Key=f"{base}/{victim}", Body=damaged)
        if fault == "tamper":  # reseal: size and sha256 of what is there now
            for f in marker["files"]:
                if f["path"] == victim:
                    f["size"], f["sha256"] = len(damaged), hashlib.sha256(damaged).hexdigest()
            c.put_object(Bucket=bucket, Key=f"{base}/COMPLETE", Body=json.dumps(marker).encode())
        return {"corrupted": f"step-{step}/{victim}", "corrupted_step": step}

    def _check(self, s3, bucket: str, prefix: str, ref: dict) -> None:
        from job import publish, storage

        keys = set(s3.keys(bucket, f"{prefix}/"))
        n = sum(1 for k in keys if k.endswith("_SUCCESS"))
        if n != 1:
            self.problems.append(f"{prefix}: {n} _SUCCESS objects, want 1")
        os.environ.update(s3.env)
        storage.configure(None)
        try:
            publish.verify_published(f"s3://{bucket}/{prefix}")
        except Exception as e:  # noqa: BLE001 - reported as the soak's finding
            self.problems.append(f"{prefix}: verify_published: {e}")
        try:
            body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
        except Exception as e:  # noqa: BLE001
            self.problems.append(f"{prefix}: no published metrics.jsonl ({type(e).__name__})")
            body = ""
        train = [r for r in (json.loads(x) for x in body.splitlines() if x.strip()) if r.get("loss") is not None]
        steps = [r["step"] for r in train]
        if steps != list(range(1, self.a.steps + 1)):
            self.problems.append(f"{prefix}: published metrics steps {steps[:30]} want 1..{self.a.steps} each once")
        diffs = [abs(r["loss"] - ref[r["step"]]) for r in train if r["step"] in ref]
        worst = max(diffs) if diffs else None
        self.max_diff = worst if self.max_diff is None or (worst or 0) > self.max_diff else self.max_diff
        if worst is None or worst > self.a.tolerance:
            self.problems.append(f"{prefix}: losses differ from the uninterrupted run: max |Δ| {worst} > {self.a.tolerance}")
        for e in self.events:
            if e["run"] == int(prefix[3:]) and e.get("injected") and e["fault"] not in STORE and e.get("resumed_at") is not None:
                lost = e["step_at_fault"] - e["resumed_at"]
                e["steps_lost"] = max(0, lost)
                limit = 0 if e["fault"] == "sigterm" else 2 * SAVE_STEPS if e["fault"] in CORRUPT else SAVE_STEPS
                if lost > limit:
                    self.problems.append(f"{prefix} attempt {e['attempt']}: {e['fault']} recomputed {lost} steps (> {limit})")

    def _report(self, ref, wall) -> int:
        rec = [e["recovery_s"] for e in self.events if e.get("recovery_s") is not None]
        print(f"{'run':>3} {'att':>3} {'np':>2} {'fault':<10} {'aimed':<11} {'phase':<11} {'rc':>4} {'steps':>7} "
              f"{'lost':>4} {'recover s':>9}", file=sys.stderr)
        for e in self.events:
            span = f"{e.get('first_step')}-{e.get('last_step')}" if e.get("first_step") is not None else "-"
            print(f"{e['run']:>3} {e['attempt']:>3} {e['processes']:>2} {e['fault'] or '-':<10} {e.get('aimed', '-'):<11} "
                  f"{e.get('phase', '-'):<11} {e['rc']:>4} {span:>7} {str(e.get('steps_lost', '-')):>4} "
                  f"{str(e.get('recovery_s', '-')):>9}", file=sys.stderr)
        summary = {
            "bench": "soak", "seed": self.a.seed, "strategy": self.a.strategy, "steps": self.a.steps,
            "faults_injected": sum(1 for e in self.events if e.get("injected")),
            "by_kind_and_phase": _count((e["fault"], e["phase"]) for e in self.events if e.get("injected")),
            "runs": 1 + max(e["run"] for e in self.events), "attempts": len(self.events),
            "max_loss_diff": self.max_diff, "tolerance": self.a.tolerance,
            "steps_lost_max": max([e.get("steps_lost", 0) for e in self.events] or [0]),
            "recovery_s": {"median": statistics.median(rec), "max": max(rec)} if rec else None,
            "wall_s": round(wall, 1), "passed": not self.problems, "problems": self.problems, "events": self.events,
        }
        for p in self.problems:
            print(f"FAIL: {p}", file=sys.stderr)
        print(json.dumps(summary))
        return 0 if not self.problems else 1


def _count(pairs) -> dict:
    out: dict = {}
    for kind, phase in pairs:
        out.setdefault(kind, {}).setdefault(phase, 0)
        out[kind][phase] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", type=int, default=6)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "deepspeed", "fsdp"))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--vary-world", action="store_true", help="a restart may run on the other process count (1 or 2)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |loss - uninterrupted loss| per step")
    p.add_argument("--workdir", help="keep everything here (default: a new temp dir)")
    a = p.parse_args(argv)
    a.kinds = tuple(k for k in a.kinds.split(",") if k)
    if bad := [k for k in a.kinds if k not in KINDS]:
        p.error(f"unknown fault kinds {bad}")
    return Soak(a).run()


if __name__ == "__main__":
    sys.exit(main())
