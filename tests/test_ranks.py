"""Dead and stuck ranks end the job, and the job says which rank, where and how; killing `sftjob run`
ends its launcher and ranks (real 2-process runs on CPU: DDP and DeepSpeed ZeRO-3, real SeaweedFS)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trainkit

from job import proctree
from job.errors import NON_RETRYABLE, ExitCode
from job.train import watchdog

COMMON = ["--logging-steps", "1", "--seed", "3", "--learning-rate", "1e-3", "--max-length", "256",
          "--per-device-train-batch-size", "2", "--lr-scheduler-type", "constant", "--num-processes", "2"]
DDP = ["--distributed", "ddp"]
ZERO3 = ["--distributed", "deepspeed", "--zero-stage", "3"]


def _args(out, steps, *extra):
    return ["run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", str(out),
            "--max-steps", str(steps), *COMMON, *extra]


def _rank(cache: Path, rank: int) -> dict:
    """The rank's heartbeat file (pid, node, step) under the run's work dir."""
    files = list(cache.glob(f"runs/*/ranks/rank-{rank}.json"))
    return json.loads(files[0].read_text()) if files else {}


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout: float) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if not _gone(p)}


def _cleanup(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_dead_and_stalled_are_retryable_and_every_exit_code_is_documented():
    assert ExitCode.RANK_DIED == 71 and ExitCode.STALLED == 72
    assert ExitCode.RANK_DIED not in NON_RETRYABLE and ExitCode.STALLED not in NON_RETRYABLE
    root = Path(__file__).parent.parent
    readme, failures = (root / "README.md").read_text(), (root / "docs/failures.md").read_text()
    for code in filter(None, ExitCode):
        assert f"| {int(code)} |" in readme, code
        assert re.search(rf"\|\s*(\*\*)?{int(code)}(\*\*)?( or \d+)?\s*\|", failures), code


_AGREEMENT = """
import json, os, signal, socket, sys
import torch.distributed as dist
from job.train import sft
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
flag, real, seen = sft.StopFlag(None), dist.all_reduce, []
def reduce_then_sigterm(t, op=None):  # a real SIGTERM lands after the reduce read the flags
    r = real(t, op=op)
    os.kill(os.getpid(), signal.SIGTERM)
    return r
dist.all_reduce = reduce_then_sigterm
seen.append(flag.agreed(1.0))
dist.all_reduce = real
seen += [flag.agreed(1.0), flag.requested]
late = sft.StopFlag(None)
os.kill(os.getpid(), signal.SIGTERM)  # after the last step's agreement: settle() still sees it
seen += [late.reason, late.settle()]
dist.destroy_process_group()
print(json.dumps(seen))
"""


def test_a_sigterm_that_lands_during_the_step_agreement_stops_the_next_step_and_is_never_lost():
    """The handler ran between the all-reduce and its verdict: the verdict used to overwrite it (the run
    then trained to the end and was killed at the grace period; CI saw it as 'stopped at step 30 of 30')."""
    r = subprocess.run([sys.executable, "-c", _AGREEMENT], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SFTJOB_LOG_FORMAT": "json"})
    assert r.returncode == 0, r.stderr[-3000:]
    this_step, next_step, requested, before_settle, settled = json.loads(r.stdout.strip().splitlines()[-1])
    assert this_step is None  # this step's agreement was reached before the signal
    assert next_step == "sigterm" and requested == "sigterm"  # ...the next one includes it
    assert before_settle is None and settled == "sigterm"


def test_torch_elastic_failure_report_names_the_killed_rank_first():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    killed = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="/nonexistent")
    peer = ProcessFailure(local_rank=0, pid=4241, exitcode=1, error_file="/nonexistent")
    text = "noise\n" + ChildFailedError("job.train.sft", {0: peer, 1: killed}).format_msg()
    found = watchdog.parse_elastic_failures(text)
    assert {(f["rank"], f["exitcode"], f["pid"]) for f in found} == {(1, -9, 4242), (0, 1, 4241)}


def test_a_stack_dump_is_summarised_per_thread():
    dump = ('Thread 0x00007f (most recent call first):\n  File "/x/threading.py", line 331 in wait\n'
            '  File "/x/threading.py", line 629 in wait\n\n'
            'Current thread 0x00007e (most recent call first):\n  File "/x/distributed_c10d.py", line 2 in all_reduce\n'
            '  File "/w/job/train/sft.py", line 90 in agreed\n')
    assert watchdog._summarise(dump) == ("all_reduce (distributed_c10d.py:2) < agreed (sft.py:90) | "
                                         "wait (threading.py:331) < wait (threading.py:629)")


def test_a_child_started_with_child_of_dies_with_its_parent(tmp_path):
    """The mechanism alone: parent → child (preexec_fn=child_of(parent)); SIGKILL the parent, the child goes."""
    pidfile = tmp_path / "child.pid"
    code = ("import os, subprocess, sys, time\n"
            "from job.train import watchdog\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True,\n"
            "                     preexec_fn=watchdog.child_of(os.getpid()))\n"
            f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert not _gone(child)
        parent.kill()
        parent.wait()
        assert _wait_gone([child], 5) == set()
    finally:
        parent.kill()


def test_ddp_timeout_reaches_the_trainer_and_nccl_error_handling_is_on_unless_set(tmp_path, monkeypatch):
    from job.specload import build
    from job.train import launch, recipe

    spec = build(overrides={"distributed.ddp_timeout": 90, "distributed.strategy": "ddp"})
    args = recipe.training_args(spec, {"checkpoint_dir": str(tmp_path / "ckpt"), "mixed_precision": "no"})
    assert args.ddp_timeout == 90 and build().distributed.ddp_timeout == 1800
    monkeypatch.setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "60")
    env = launch.nccl_env()
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ENABLE_MONITORING": "1"}
    assert build(overrides={"resilience.stall_seconds": 60}).resilience.stall_seconds == 60
    assert watchdog.default_stall_seconds(cuda=True) == 600


@pytest.mark.slow
def test_sigkill_of_sftjob_run_ends_its_launcher_and_every_rank(tmp_path):
    cache = tmp_path / "c"
    log = tmp_path / "run.log"
    proc = trainkit.start(*_args(tmp_path / "out", 400, *DDP), env={"SFTJOB_CACHE_DIR": str(cache)}, log=log)
    tree: set[int] = set()
    try:
        trainkit.wait_for_step(log, proc, 2)
        tree = {p.pid for p in proctree.descendants(proc.pid)}
        ranks = {_rank(cache, k).get("pid") for k in (0, 1)}
        assert ranks <= tree and len(tree) >= 3, (tree, ranks)  # the launcher and both ranks
        os.kill(proc.pid, signal.SIGKILL)  # only `sftjob run`, as when its container's main process is killed
        proc.wait(timeout=10)
        left = _wait_gone(tree, 10)
        assert not left, f"still running 10 s after `sftjob run` was killed: {left}"
    finally:
        proc.kill()
        _cleanup(tree)


def _signal_ranks(cache: Path, proc, signals: list[tuple[int, int]], stopped: list, timeout: float = 120) -> float:
    """Once rank 1 is at step 2, send each (rank, signal) in order; → seconds until sftjob exits. The pids
    sent SIGSTOP go into `stopped` (for the caller's cleanup, whatever happens)."""
    # DeepSpeed compiles its CPU comm extension once per test session: minutes on a loaded machine
    trainkit.wait_until(lambda: (_rank(cache, 1).get("step") or 0) >= 2, proc, "rank 1 at step 2", timeout=900)
    for rank, sig in signals:
        pid = _rank(cache, rank)["pid"]
        if sig == signal.SIGSTOP:
            stopped.append(pid)
        os.kill(pid, sig)
    t0 = time.time()
    proc.wait(timeout=timeout)
    return time.time() - t0


def _kill_rank_1(cache: Path, proc) -> float:
    return _signal_ranks(cache, proc, [(1, signal.SIGKILL)], [])


def _assert_names_rank_1_killed(status: dict, termlog: Path) -> None:
    assert status["state"] == "failed" and status["error"]["exit_code"] == 71, status["error"]
    failed = status["failed_rank"]
    assert (failed["rank"], failed["node"], failed["signal"]) == (1, 0, "SIGKILL"), failed
    assert "rank 1" in status["error"]["message"] and "SIGKILL" in status["error"]["message"]
    text = termlog.read_text()
    assert "exit_code=71" in text and "rank 1 (node 0" in text and "SIGKILL" in text, text


@pytest.mark.slow
def test_kill_9_of_rank_1_of_a_ddp_run_exits_71_naming_it_and_the_rerun_resumes_and_publishes(s3, tmp_path):
    bucket = s3.bucket("ranks")
    out = f"s3://{bucket}/runs/dead"
    cache = tmp_path / "c"
    env = {"SFTJOB_CACHE_DIR": str(cache), "SFTJOB_TERMINATION_LOG": str(tmp_path / "termlog")}
    log = tmp_path / "first.log"
    proc = trainkit.start(*_args(out, 400, *DDP, "--save-steps", "3"), env=env, log=log)
    try:
        def complete():
            return sorted(int(k.split("/")[3][5:]) for k in s3.keys(bucket, "runs/dead/checkpoints/")
                          if k.endswith("/COMPLETE"))

        trainkit.wait_until(lambda: bool(complete()), proc, "a COMPLETE checkpoint")
        took = _kill_rank_1(cache, proc)
    finally:
        proc.kill()
    print(f"DDP: rank 1 killed -> sftjob exited {proc.returncode} after {took:.1f}s")
    assert proc.returncode == 71, log.read_text()[-4000:]
    assert took < 60
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/dead/status.json")["Body"].read())
    _assert_names_rank_1_killed(status, tmp_path / "termlog")
    last = complete()[-1]

    rerun = trainkit.run(*_args(out, last + 3, *DDP, "--save-steps", "3"), env=env)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/dead/status.json")["Body"].read())
    assert status["state"] == "succeeded" and status["resumed_from"] == last and status["attempt"] == 2
    assert "runs/dead/_SUCCESS" in s3.keys(bucket, "runs/dead/")


@pytest.mark.slow
def test_kill_9_of_rank_1_of_a_zero3_run_exits_71_naming_it(tmp_path):
    cache = tmp_path / "c"
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(cache), "SFTJOB_TERMINATION_LOG": str(tmp_path / "termlog")}
    log = tmp_path / "run.log"
    proc = trainkit.start(*_args(out, 400, *ZERO3), env=env, log=log)
    try:
        took = _kill_rank_1(cache, proc)
    finally:
        proc.kill()
    print(f"ZeRO-3: rank 1 killed -> sftjob exited {proc.returncode} after {took:.1f}s")
    assert proc.returncode == 71, log.read_text()[-4000:]
    assert took < 60
    _assert_names_rank_1_killed(json.loads((out / "status.json").read_text()), tmp_path / "termlog")


@pytest.mark.slow
def test_a_sigstopped_rank_is_caught_by_the_stall_watchdog_with_every_other_ranks_stack(tmp_path):
    cache = tmp_path / "c"
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(cache), "SFTJOB_TERMINATION_LOG": str(tmp_path / "termlog")}
    log = tmp_path / "run.log"
    proc = trainkit.start(*_args(out, 100000, *DDP, "--stall-seconds", "60"), env=env, log=log)
    stopped: list[int] = []
    try:
        took = _signal_ranks(cache, proc, [(1, signal.SIGSTOP)], stopped, timeout=150)
    finally:
        proc.kill()
        _cleanup(stopped)
    print(f"SIGSTOP of rank 1 with --stall-seconds 60 -> sftjob exited {proc.returncode} after {took:.1f}s")
    from job.logsetup import as_text

    text = "\n".join(as_text(ln) for ln in log.read_text().splitlines())  # JSON log lines (no terminal) as text
    assert proc.returncode == 72, text[-4000:]
    assert "rank 1 (node 0" in text and "is STOPPED" in text
    stack = text[text.index("rank 0 (node 0"):]
    assert "stack:" in stack.splitlines()[0] and 'File "' in stack and "most recent call first" in stack
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stalled" and status["error"]["exit_code"] == 72
    stall = status["stall"]
    assert stall["stopped_ranks"] == [1] and stall["step"] >= 2 and stall["stacks"]["0"] not in ("", "no stack dump")
    assert "state=stalled" in (tmp_path / "termlog").read_text()
    assert _wait_gone([*stopped, _rank(cache, 0)["pid"]], 10) == set()


@pytest.mark.slow
def test_a_dead_rank_whose_peer_cannot_notice_still_ends_the_job_within_60s(tmp_path):
    """What NCCL can do on GPUs (a peer blocked in a collective that never errors), played with SIGSTOP."""
    cache = tmp_path / "c"
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(cache), "SFTJOB_TERMINATION_LOG": str(tmp_path / "termlog")}
    log = tmp_path / "run.log"
    proc = trainkit.start(*_args(out, 100000, *DDP), env=env, log=log)
    stopped: list[int] = []
    try:
        took = _signal_ranks(cache, proc, [(0, signal.SIGSTOP), (1, signal.SIGKILL)], stopped)
    finally:
        proc.kill()
        _cleanup(stopped)
    print(f"rank 1 killed, rank 0 stopped -> sftjob exited {proc.returncode} after {took:.1f}s")
    assert proc.returncode == 71, log.read_text()[-4000:]
    assert took < 60
    _assert_names_rank_1_killed(json.loads((out / "status.json").read_text()), tmp_path / "termlog")
