"""A slow, frozen or unreachable store never stalls training and is never reported as stored.

Real SeaweedFS (frozen with SIGSTOP through ``s3.frozen()``) and a closed port; no mocks."""
import json
import time

import pytest
import s3server

from job import checkpoints, outage, storage
from job.errors import UnavailableError
from job.spec import StorageSpec
from job.status import Status


def _ckpt(root, step, body="x"):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "optimizer.pt").write_text(f"{body}{step}")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def _verifies(s3, bucket, prefix) -> bool:
    """Every file a COMPLETE lists is there with its sha256."""
    import hashlib

    c = s3.client()
    marker = json.loads(c.get_object(Bucket=bucket, Key=f"{prefix}/COMPLETE")["Body"].read())
    for f in marker["files"]:
        body = c.get_object(Bucket=bucket, Key=f"{prefix}/{f['path']}")["Body"].read()
        if hashlib.sha256(body).hexdigest() != f["sha256"] or len(body) != f["size"]:
            return False
    return True


def test_mirror_wait_is_false_after_a_failed_upload_and_says_why(s3, tmp_path):  # s3: its credentials
    port = s3server.closed_port()
    storage.configure(StorageSpec(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1))
    failed = []
    m = checkpoints.Mirror("s3://nowhere/run", node_rank=0, num_nodes=1, is_main=True, keep=2,
                           on_error=lambda step, e: failed.append((step, str(e))), resumed_step=3)
    fut = m.submit(_ckpt(tmp_path, 5), 5)
    t0 = time.monotonic()
    assert m.wait(timeout=4) is False  # before: True once the worker had given up
    assert time.monotonic() - t0 < 30
    assert fut.done() and fut.exception() is not None
    assert failed and failed[0][0] == 5 and "unreachable" in failed[0][1]
    assert m.last_complete == 3  # the next attempt resumes from the checkpoint it resumed from


def test_mirror_retries_in_the_background_and_keeps_only_the_newest_pending(s3, tmp_path):
    bucket = s3.bucket("outage")
    out = f"s3://{bucket}/mirror"
    m = checkpoints.Mirror(out, node_rank=0, num_nodes=1, is_main=True, keep=5)
    with s3.frozen():
        first = m.submit(_ckpt(tmp_path, 1), 1)
        deadline = time.monotonic() + 30
        while not first.running() and time.monotonic() < deadline:  # the worker took it (and hangs)
            time.sleep(0.01)
        t0 = time.monotonic()
        later = [m.submit(_ckpt(tmp_path, s), s) for s in (2, 3, 4)]
        assert time.monotonic() - t0 < 5  # submit never waits for the store
        assert [f.cancelled() for f in later] == [True, True, False]  # one pending, the newest
        assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "checkpoint-3").exists()
        assert m.wait(timeout=2) is False and m.busy
    assert m.wait(timeout=300)
    assert first.done() and later[-1].result() == 4
    assert checkpoints.complete_steps(out) == [1, 4]
    assert all(_verifies(s3, bucket, f"mirror/checkpoints/step-{s}") for s in (1, 4))


def test_status_updates_return_at_once_with_the_store_frozen_and_the_newest_arrives_later(s3, tmp_path):
    bucket = s3.bucket("outage")
    status = Status(tmp_path / "work", f"s3://{bucket}/status-run")
    status.start(run_id="r")
    assert status.flush(60)
    with s3.frozen():
        t0 = time.monotonic()
        for step in range(1, 51):
            status.update(step=step, loss=1.0 / step)
        took = time.monotonic() - t0
        assert took < 10, took  # before: one synchronous PUT (hung until read_timeout) per update
        assert status.flush(1) is False  # not there yet, and flush says so
    assert status.flush(300)
    remote = json.loads(s3.client().get_object(Bucket=bucket, Key="status-run/status.json")["Body"].read())
    assert remote["step"] == 50


def test_bounded_store_call_gives_up_at_its_deadline_with_exit_69(s3, tmp_path):
    bucket = s3.bucket("outage")
    with s3.frozen():
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as e:
            outage.bounded("publishing to s3://outage/x", lambda: storage.write_bytes(f"s3://{bucket}/x", b"1"),
                           3, kept=str(tmp_path))
        assert time.monotonic() - t0 < 15
    assert e.value.exit_code == 69
    assert "unavailable for 3s" in str(e.value) and str(tmp_path) in str(e.value)
    assert "without retraining" in str(e.value)
    assert outage.abandoned()


def test_bounded_store_call_retries_a_refused_connection_until_its_deadline(s3, tmp_path):
    storage.configure(StorageSpec(endpoint_url=f"http://127.0.0.1:{s3server.closed_port()}", max_attempts=1))
    calls = []

    def put():
        calls.append(1)
        storage.write_bytes("s3://nowhere/x", b"1")

    with pytest.raises(UnavailableError, match="unreachable"):
        outage.bounded("publishing", put, 5)
    assert len(calls) >= 2


def test_a_kept_adapter_is_reused_only_for_the_same_spec_and_untouched_files(tmp_path):
    from job.train.launch import Outcome

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    outcome = Outcome(str(adapter), 14, None, True, None, 0, {"step": 14, "loss": 1.5})
    outage.keep(tmp_path, "spec-a", outcome)
    assert outage.trained(tmp_path, "spec-a", Outcome) == outcome
    assert outage.trained(tmp_path, "spec-b", Outcome) is None  # another spec trains again
    outage.settle(tmp_path, UnavailableError("store down"))  # 69 keeps it
    assert outage.trained(tmp_path, "spec-a", Outcome) == outcome
    (adapter / "adapter_model.safetensors").write_bytes(b"weights, changed")
    assert outage.trained(tmp_path, "spec-a", Outcome) is None
    outage.settle(tmp_path, ValueError("anything else"))  # any other end forgets it
    assert not (tmp_path / outage.MARKER).exists()


_TRANSFER = """
import signal, sys
from pathlib import Path
from job import outage
from job.errors import Interrupted
from job.storage import transfer
from job.storage.s3 import head

def stop(*_):
    raise Interrupted("stopped by SIGTERM")

signal.signal(signal.SIGTERM, stop)
src, bucket, direction = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print("start", flush=True)
try:
    if direction == "up":
        transfer.upload([(src, bucket, "big.bin", None)])
    else:
        transfer.download([(head(f"s3://{bucket}/big.bin"), src.with_name("copy.bin"))])
except Interrupted:
    print("interrupted", flush=True)
    outage.leave_if_stuck(75)
    sys.exit(75)
"""


@pytest.mark.parametrize("direction", ["up", "down"])
def test_sigterm_during_a_transfer_to_a_frozen_store_exits_within_seconds(s3, tmp_path, direction):
    """A SIGTERM in the middle of a multipart upload (or ranged download) while the store is frozen: the hung
    parts are left behind, the abort of the upload waits at most 5 s, the process exits 75. Before: the
    pool's shutdown and the abort each waited read_timeout × attempts (minutes), past any grace period."""
    import os
    import signal
    import subprocess
    import sys

    bucket = s3.bucket("frozen-transfer")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(160 << 20))  # 10 parts of 16 MiB
    if direction == "down":
        s3.client().upload_file(str(src), bucket, "big.bin")
    proc = subprocess.Popen([sys.executable, "-c", _TRANSFER, str(src), bucket, direction],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "start"
        time.sleep(0.3)  # parts in flight
        with s3.frozen():
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=90)
            took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    print(f"SIGTERM during the {direction}load to/from a frozen store: exit {rc} after {took:.1f}s")
    assert rc == 75 and took < 20, out[-2000:]
    assert "Traceback" not in out, out[-2000:]


def test_a_store_frozen_before_the_run_starts_ends_it_with_69_after_read_timeout_x_attempts(s3, tmp_path):
    """The store accepts connections and never answers from the start (no SIGTERM to cut it short): each
    request waits storage.read_timeout per attempt, then the run exits 69 (retryable) naming the store, the
    URI and the knob, with no traceback and nothing published. With the defaults this is 120 s x 5 attempts."""
    import os
    import subprocess
    import sys

    import trainkit

    bucket = s3.bucket("frozen-start")
    s3.client().upload_file(str(trainkit.chat_data()), bucket, "data/train.jsonl")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "job", "run", "--model", str(trainkit.tiny_model()),
           "--data", f"s3://{bucket}/data/train.jsonl", "--output", str(out), "--max-steps", "2",
           "--read-timeout", "2", "--connect-timeout", "2", "--max-attempts", "2"]
    env = {**os.environ, **s3.env, "SFTJOB_CACHE_DIR": str(tmp_path / "cache")}
    with s3.frozen():
        t0 = time.monotonic()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
    print(f"store frozen from the start: exit {p.returncode} after {took:.1f}s")
    assert p.returncode == 69, p.stderr[-2000:]
    assert took < 40, took  # 2 attempts x 2 s, their backoff, start-up; not minutes
    assert "Traceback" not in p.stderr
    assert f"s3://{bucket}/data/train.jsonl" in p.stderr and "storage.read_timeout (2 s)" in p.stderr
    assert "the job can be retried" in p.stderr
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"]["exit_code"] == 69
