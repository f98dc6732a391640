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
