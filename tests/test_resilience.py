"""Preemption: SIGTERM → checkpoint in S3 → exit 75 → the rerun resumes with the same losses;
kill -9 → resume from the last COMPLETE checkpoint; deadline → partial adapter, no _SUCCESS."""
import json
import os
import signal

import pytest
import trainkit

from job import proctree

pytestmark = pytest.mark.slow
_args = trainkit.steady_args


def _get(s3, bucket, key):
    return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def test_sigterm_checkpoints_to_s3_exits_75_and_the_rerun_resumes_with_identical_losses(s3, tmp_path):
    bucket = s3.bucket("resilience")
    steps = 60
    ref = trainkit.run(*_args(f"s3://{bucket}/runs/ref", steps), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c1")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = trainkit.losses(ref.stdout.splitlines())

    out = f"s3://{bucket}/runs/pre"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c2"), "SFTJOB_TERMINATION_LOG": str(tmp_path / "termlog")}
    log = tmp_path / "first.log"
    proc = trainkit.start(*_args(out, steps), env=env, log=log)
    assert trainkit.interrupt_at(log, proc, 8) == 75, log.read_text()[-3000:]
    status = _get(s3, bucket, "runs/pre/status.json")
    assert status["state"] == "interrupted" and status["error"]["exit_code"] == 75
    stopped_at = status["step"]
    assert 8 <= stopped_at < steps
    marker = _get(s3, bucket, f"runs/pre/checkpoints/step-{stopped_at}/COMPLETE")
    assert any(f["path"] == "optimizer.pt" for f in marker["files"])
    assert "runs/pre/_SUCCESS" not in s3.keys(bucket, "runs/pre/")
    assert "exit_code=75" in (tmp_path / "termlog").read_text()

    rerun = trainkit.run(*_args(out, steps), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    status = _get(s3, bucket, "runs/pre/status.json")
    assert status["state"] == "succeeded" and status["resumed_from"] == stopped_at and status["attempt"] == 2
    resumed = trainkit.losses(rerun.stdout.splitlines())
    assert min(resumed) == stopped_at + 1 and max(resumed) == steps
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref_losses[step], abs=1e-4), step
    worst = max(abs(loss - ref_losses[s]) for s, loss in resumed.items())
    print(f"resume at step {stopped_at}: {len(resumed)} steps compared, max |loss - uninterrupted| = {worst:.2e}")


def test_kill_9_resumes_from_the_last_complete_checkpoint_and_cleans_an_incomplete_one(s3, tmp_path):
    bucket = s3.bucket("resilience")
    out = f"s3://{bucket}/runs/oom"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    log = tmp_path / "first.log"
    # a long first run, so the kill always lands mid-training however slow the machine is
    proc = trainkit.start(*_args(out, 400, "--save-steps", "5"), env=env, log=log)
    trainkit.wait_for_step(log, proc, 12)

    def complete_steps():
        keys = s3.keys(bucket, "runs/oom/checkpoints/")
        return sorted(int(k.split("/")[3][5:]) for k in keys if k.endswith("/COMPLETE"))

    # checkpoints are mirrored in the background: kill once one from step >= 10 is fully in S3
    trainkit.wait_until(lambda: (complete_steps() or [0])[-1] >= 10, proc, "a COMPLETE checkpoint at step >= 10")
    proctree.kill_tree(proc.pid)  # kill -9 of the whole tree, like a container OOM-kill
    proc.wait(timeout=30)
    c = s3.client()
    keys = s3.keys(bucket, "runs/oom/checkpoints/")
    complete = complete_steps()
    assert complete and 10 <= complete[-1] < 40
    last = complete[-1]
    # what a kill mid-upload leaves: a newer step with some files and no COMPLETE marker
    for k in keys:
        if f"/step-{last}/" in k and not k.endswith("COMPLETE") and "/.nodes/" not in k:
            c.copy_object(Bucket=bucket, Key=k.replace(f"/step-{last}/", "/step-99/"),
                          CopySource={"Bucket": bucket, "Key": k})
    rerun = trainkit.run(*_args(out, 40, "--save-steps", "5"), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skipping incomplete checkpoint step-99" in rerun.stderr
    assert not any("/step-99/" in k for k in s3.keys(bucket, "runs/oom/"))
    assert _get(s3, bucket, "runs/oom/status.json")["resumed_from"] == last
    assert min(trainkit.losses(rerun.stdout.splitlines())) == last + 1
    # only complete checkpoints remain, at most save_total_limit of them
    left = {k.split("/")[3] for k in s3.keys(bucket, "runs/oom/checkpoints/")}
    assert all(f"runs/oom/checkpoints/{s}/COMPLETE" in s3.keys(bucket, "runs/oom/checkpoints/") for s in left)
    assert len(left) <= 2


def test_sigterm_stops_every_rank_of_a_zero3_run_and_it_resumes(s3, tmp_path):
    bucket = s3.bucket("resilience")
    out = f"s3://{bucket}/runs/z3"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    extra = ["--distributed", "deepspeed", "--zero-stage", "3", "--num-processes", "2"]
    log = tmp_path / "first.log"
    proc = trainkit.start(*_args(out, 400, *extra), env=env, log=log)
    trainkit.wait_for_step(log, proc, 3)
    assert trainkit.sigterm_and_wait(proc) == 75, log.read_text()[-4000:]
    step = _get(s3, bucket, "runs/z3/status.json")["step"]
    marker = _get(s3, bucket, f"runs/z3/checkpoints/step-{step}/COMPLETE")
    shards = [f["path"] for f in marker["files"] if "optim_states" in f["path"]]
    assert len(shards) == 2, shards  # one ZeRO shard per rank
    rerun = trainkit.run(*_args(out, step + 3, *extra), env=env)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert _get(s3, bucket, "runs/z3/status.json")["resumed_from"] == step
    assert "runs/z3/_SUCCESS" in s3.keys(bucket, "runs/z3/")


def test_deadline_publishes_a_partial_adapter_without_success(tmp_path):
    out = tmp_path / "deadline"
    r = trainkit.run(*_args(str(out), 100000, "--max-runtime", "30"), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 75, r.stderr[-3000:]
    assert "max_runtime reached" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["partial"] is True and not (out / "_SUCCESS").exists()
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    ckpts = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert ckpts and int(ckpts[-1].name[5:]) == status["step"]


def test_save_minutes_checkpoints_on_a_clock(tmp_path):
    out = tmp_path / "clock"
    r = trainkit.run(*_args(str(out), 40, "--save-minutes", "0.005", "--save-total-limit", "50"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-3000:]
    complete = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(complete) >= 2  # no save_steps: only the clock made these


def test_sigterm_while_the_data_is_prepared_stops_the_run_and_its_tokenizer_workers(tmp_path):
    """The forked tokenizer workers must not inherit the run's SIGTERM handler: it raised Interrupted inside
    them, so the pool's shutdown printed a traceback per worker or hung. Real SIGTERM, real forked pool."""
    import psutil

    from job import demo_data

    data = demo_data.write_jsonl(tmp_path / "big.jsonl", n=60000)
    log = tmp_path / "run.log"
    proc = trainkit.start("run", "--model", str(trainkit.tiny_model()), "--data", str(data),
                          "--output", str(tmp_path / "out"), "--max-steps", "2", "--num-proc", "2",
                          env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")}, log=log)
    parent = psutil.Process(proc.pid)
    workers: list = []

    def forked() -> bool:  # pool workers are forks: the parent's command line, no exec
        workers[:] = [c for c in parent.children() if c.cmdline() == parent.cmdline()]
        return len(workers) == 2

    trainkit.wait_until(forked, proc, "two tokenizer workers", timeout=120)

    def busy() -> bool:  # mid-stream: results of several MB in flight (where Pool.terminate could hang)
        return all(w.cpu_times().user > 1.0 for w in workers)

    trainkit.wait_until(busy, proc, "the workers tokenizing", timeout=120)
    assert trainkit.sigterm_and_wait(proc, timeout=60) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"tokenizer workers left running: {alive}"
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_a_tokenizer_worker_killed_during_prepare_ends_the_run_with_71_naming_it(tmp_path):
    """kill -9 of one forked tokenizer worker (what the OOM killer does): the run must not wait forever for
    its lost task (multiprocessing.Pool's behaviour); it ends with the retryable 71, names the process and
    signal, prints no traceback and leaves no cache entry nor output."""
    import psutil

    from job import demo_data

    data = demo_data.write_jsonl(tmp_path / "big.jsonl", n=60000)
    log = tmp_path / "run.log"
    cache = tmp_path / "c"
    proc = trainkit.start("run", "--model", str(trainkit.tiny_model()), "--data", str(data),
                          "--output", str(tmp_path / "out"), "--max-steps", "2", "--num-proc", "2",
                          env={"SFTJOB_CACHE_DIR": str(cache)}, log=log)
    parent = psutil.Process(proc.pid)
    workers: list = []

    def busy() -> bool:
        workers[:] = [c for c in parent.children() if c.cmdline() == parent.cmdline()]
        return len(workers) == 2 and all(w.cpu_times().user > 0.5 for w in workers)

    trainkit.wait_until(busy, proc, "two tokenizer workers at work", timeout=120)
    victim = workers[1].pid
    os.kill(victim, signal.SIGKILL)
    rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 71, text[-3000:]
    assert f"tokenizer process {victim} died: killed by SIGKILL" in text and "Traceback" not in text, text[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert not list(cache.glob("prepared/*")), "a half-prepared cache entry was left"
    assert not (tmp_path / "out" / "_SUCCESS").exists()
