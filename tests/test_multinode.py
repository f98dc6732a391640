"""Two nodes on one machine: two `sftjob run` processes as node 0 and node 1 of a 2-node DDP job,
each with its own node-local cache, rendezvous over loopback, one S3 output (real SeaweedFS).

What a 2-pod Indexed Job does, minus the network: each node mirrors its own part of every checkpoint,
node 0 writes COMPLETE once both parts are in, and only node 0 publishes and writes status.json.
"""
import json
import socket
import subprocess

import pytest
import trainkit

pytestmark = pytest.mark.slow


def test_two_nodes_train_mirror_their_parts_and_node0_publishes(s3, tmp_path):
    bucket = s3.bucket("multinode")
    out = f"s3://{bucket}/runs/mn"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        log = tmp_path / f"node{rank}.log"
        procs.append((trainkit.start(
            "run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", out,
            "--max-steps", "6", "--logging-steps", "2", "--save-steps", "3", "--max-length", "256",
            "--distributed", "ddp", "--num-machines", "2", "--main-process-ip", "127.0.0.1",
            "--main-process-port", str(port),
            env={"SFTJOB_CACHE_DIR": str(tmp_path / f"cache{rank}"), "JOB_COMPLETION_INDEX": str(rank)},
            log=log), log))
    for proc, log in procs:
        try:
            assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    keys = s3.keys(bucket, "runs/mn/")
    c = s3.client()
    for step in (3, 6):
        prefix = f"runs/mn/checkpoints/step-{step}"
        parts = {k: json.loads(c.get_object(Bucket=bucket, Key=f"{prefix}/.nodes/node-{k}.json")["Body"].read())
                 for k in (0, 1)}
        assert [f["path"] for f in parts[1]["files"]] == ["rng_state_1.pth"]  # node 1 uploaded only its rank's file
        marker = json.loads(c.get_object(Bucket=bucket, Key=f"{prefix}/COMPLETE")["Body"].read())
        files = {f["path"] for f in marker["files"]}
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= files
    assert "runs/mn/_SUCCESS" in keys
    status = json.loads(c.get_object(Bucket=bucket, Key="runs/mn/status.json")["Body"].read())
    assert status["state"] == "succeeded"
    topo = json.loads(c.get_object(Bucket=bucket, Key="runs/mn/launch/topology.json")["Body"].read())
    assert (topo["num_machines"], topo["num_processes"], topo["machine_rank"]) == (2, 2, 0)
    assert '{"event": "done"' in (tmp_path / "node0.log").read_text()  # node 0 published
    assert '{"event": "done"' not in (tmp_path / "node1.log").read_text()  # node 1 only trained
    # the data was prepared once: node 0 prepared and published it, node 1 downloaded the same shards
    assert "downloaded the prepared data from node 0" in (tmp_path / "node1.log").read_text()
    assert "downloaded the prepared data" not in (tmp_path / "node0.log").read_text()
    shards = [[p for p in (tmp_path / f"cache{rank}" / "prepared").iterdir() if not p.name.startswith(".")]
              for rank in (0, 1)]
    assert [len(s) for s in shards] == [1, 1] and shards[0][0].name == shards[1][0].name
    assert _sha(shards[0][0] / "train.parquet") == _sha(shards[1][0] / "train.parquet")
    assert not s3.keys(bucket, "runs/mn/.prepared/")  # node 0 removed the run's copy after publishing


def _sha(p):
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_of_the_rank_on_node_1_ends_both_nodes_within_60s_and_the_rerun_resumes(s3, tmp_path):
    """A dead rank on another node: both pods end with a retryable code well inside a minute (node 1 names
    its dead rank, 71), and the next attempt of both resumes from the last COMPLETE and publishes."""
    import os
    import signal
    import time

    from job.errors import NON_RETRYABLE

    bucket = s3.bucket("multinode-dead")
    out = f"s3://{bucket}/runs/dead"

    def start(rank, steps, port, log):
        return trainkit.start(
            "run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", out,
            "--max-steps", str(steps), "--logging-steps", "1", "--save-steps", "3", "--max-length", "256",
            "--distributed", "ddp", "--num-machines", "2", "--main-process-ip", "127.0.0.1",
            "--main-process-port", str(port),
            "--lr-scheduler-type", "constant",  # the rerun shortens the run: allowed only where the LR ignores it
            env={"SFTJOB_CACHE_DIR": str(tmp_path / f"cache{rank}"), "JOB_COMPLETION_INDEX": str(rank)}, log=log)

    def complete():
        return sorted(int(k.split("/")[3][5:]) for k in s3.keys(bucket, "runs/dead/checkpoints/")
                      if k.endswith("/COMPLETE"))

    def node1_rank():
        files = list((tmp_path / "cache1").glob("runs/*/ranks/rank-*.json"))
        return json.loads(files[0].read_text()) if files else {}

    port = _free_port()
    procs = [start(r, 400, port, tmp_path / f"first{r}.log") for r in (0, 1)]
    try:
        trainkit.wait_until(lambda: bool(complete()), procs[0], "a COMPLETE checkpoint", timeout=600)
        trainkit.wait_until(lambda: bool(node1_rank().get("pid")), procs[1], "node 1's rank heartbeat")
        os.kill(node1_rank()["pid"], signal.SIGKILL)
        t0 = time.time()
        for p in procs:
            p.wait(timeout=120)
        took = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    print(f"two nodes: rank on node 1 killed -> exits {codes} after {took:.1f}s")
    assert took < 60, codes
    assert codes[1] == 71, (tmp_path / "first1.log").read_text()[-3000:]
    assert all(c != 0 and c not in NON_RETRYABLE for c in codes), codes
    last = complete()[-1]

    port = _free_port()
    procs = [start(r, last + 3, port, tmp_path / f"rerun{r}.log") for r in (0, 1)]
    try:
        for r, p in enumerate(procs):
            assert p.wait(timeout=600) == 0, (tmp_path / f"rerun{r}.log").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/dead/status.json")["Body"].read())
    assert status["state"] == "succeeded" and status["resumed_from"] == last
    assert "runs/dead/_SUCCESS" in s3.keys(bucket, "runs/dead/")
