"""Checkpoint mirroring across nodes, COMPLETE last, newest complete wins, incomplete cleaned."""
import hashlib
import json
import time

from job import checkpoints


def _ckpt(root, step, files):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name, body in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(body)
    return d


def test_two_nodes_mirror_one_checkpoint_and_complete_lists_both_parts(tmp_path):
    out = str(tmp_path / "out")
    n0 = checkpoints.Mirror(out, node_rank=0, num_nodes=2, is_main=True, keep=2)
    n1 = checkpoints.Mirror(out, node_rank=1, num_nodes=2, is_main=False, keep=2)
    n0.submit(_ckpt(tmp_path / "node0", 5, {"trainer_state.json": "{}", "global_step5/rank0.pt": "a"}), 5)
    n1.submit(_ckpt(tmp_path / "node1", 5, {"global_step5/rank1.pt": "b"}), 5)
    assert n0.wait(30) and n1.wait(30)
    marker = json.loads((tmp_path / "out/checkpoints/step-5/COMPLETE").read_text())
    assert sorted(f["path"] for f in marker["files"]) == ["global_step5/rank0.pt", "global_step5/rank1.pt",
                                                           "trainer_state.json"]
    assert checkpoints.complete_steps(out) == [5]


def test_complete_is_not_written_until_every_node_has_uploaded(tmp_path):
    out = str(tmp_path / "out")
    main = checkpoints.Mirror(out, node_rank=0, num_nodes=2, is_main=True, keep=2)
    main.submit(_ckpt(tmp_path / "node0", 7, {"a.pt": "a"}), 7)
    assert not main.wait(1.5)  # waiting for node 1
    assert checkpoints.complete_steps(out) == []
    checkpoints.Mirror(out, node_rank=1, num_nodes=2, is_main=False, keep=2).submit(
        _ckpt(tmp_path / "node1", 7, {"b.pt": "b"}), 7)
    assert main.wait(30)
    assert checkpoints.complete_steps(out) == [7]


def test_find_and_fetch_takes_the_newest_complete_and_removes_incomplete(tmp_path, caplog):
    out = str(tmp_path / "out")
    m = checkpoints.Mirror(out, node_rank=0, num_nodes=1, is_main=True, keep=3)
    for step in (2, 4):
        m.submit(_ckpt(tmp_path / "local", step, {"optimizer.pt": f"opt{step}"}), step)
        assert m.wait(30)
    partial = tmp_path / "out/checkpoints/step-6"
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").write_text("half")
    found = checkpoints.find_and_fetch(out, tmp_path / "resume")
    assert found.step == 4 and (found.path / "optimizer.pt").read_text() == "opt4"
    assert not partial.exists()
    assert "skipping incomplete checkpoint step-6" in caplog.text


def test_a_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    out = str(tmp_path / "out")
    m = checkpoints.Mirror(out, node_rank=0, num_nodes=1, is_main=True, keep=3)
    for step in (2, 4):
        m.submit(_ckpt(tmp_path / "local", step, {"optimizer.pt": f"opt{step}"}), step)
        assert m.wait(30)
    (tmp_path / "out/checkpoints/step-4/optimizer.pt").write_text("bitrot")
    found = checkpoints.find_and_fetch(out, tmp_path / "resume")
    assert found.step == 2


def test_only_the_last_save_total_limit_checkpoints_are_kept(tmp_path):
    out = str(tmp_path / "out")
    m = checkpoints.Mirror(out, node_rank=0, num_nodes=1, is_main=True, keep=2)
    for step in (1, 2, 3, 4):  # each mirrored before the next (a newer pending one replaces an older)
        m.submit(_ckpt(tmp_path / "local", step, {"x": str(step)}), step)
        assert m.wait(30)
    assert checkpoints.complete_steps(out) == [3, 4]
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["checkpoint-3", "checkpoint-4"]


# ---- a COMPLETE marker or node file written by someone else never leads outside the checkpoint ----

def _entry(path, body: bytes) -> dict:
    """A marker entry whose size and sha256 are right: only confinement can stop it."""
    return {"path": path, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _two_checkpoints(out, local):
    m = checkpoints.Mirror(out, node_rank=0, num_nodes=1, is_main=True, keep=3)
    for step in (2, 4):  # one at a time: a newer checkpoint replaces a pending one
        m.submit(_ckpt(local, step, {"optimizer.pt": f"opt{step}"}), step)
        assert m.wait(30)


def test_a_complete_marker_with_dotdot_paths_is_skipped_and_nothing_is_written_outside(tmp_path, caplog):
    out = str(tmp_path / "out")
    _two_checkpoints(out, tmp_path / "local")
    step4 = tmp_path / "out/checkpoints/step-4"
    (tmp_path / "out/checkpoints/escape.txt").write_bytes(b"planted")  # what `../escape.txt` reads
    (tmp_path / "out/planted.txt").write_bytes(b"planted")  # what `../../planted.txt` reads
    marker = json.loads((step4 / "COMPLETE").read_text())
    marker["files"] += [_entry("../escape.txt", b"planted"), _entry("../../planted.txt", b"planted")]
    (step4 / "COMPLETE").write_text(json.dumps(marker))
    node = tmp_path / "node"

    found = checkpoints.find_and_fetch(out, node / "resume")
    assert found.step == 2 and (found.path / "optimizer.pt").read_text() == "opt2"
    assert [p.relative_to(node).as_posix() for p in node.rglob("*") if p.is_file()] == [
        "resume/checkpoint-2/optimizer.pt"], "nothing planted beside the checkpoint"
    assert "skipping checkpoint step-4" in caplog.text and "'../escape.txt'" in caplog.text
    # the skip is an ERROR (INFO lines about step-4 may be captured too, when an earlier test lowered the level)
    assert [r.levelname for r in caplog.records if "step-4" in r.getMessage() and r.levelno >= 30] == ["ERROR"]


def test_a_complete_marker_with_an_absolute_path_is_skipped_against_real_s3(s3, tmp_path, caplog):
    """S3 keys cannot hold `..`, but `/x/y` joined to a local directory is `/x/y`: the S3 output attack."""
    b = s3.bucket("ckpt-hostile")
    out = f"s3://{b}/runs/h"
    _two_checkpoints(out, tmp_path / "local")
    target = tmp_path / "victim-dir" / "planted.sh"
    body = b"#!/bin/sh\necho owned\n"
    c = s3.client()
    c.put_object(Bucket=b, Key=f"runs/h/checkpoints/step-4/{str(target).lstrip('/')}", Body=body)
    marker = json.loads(c.get_object(Bucket=b, Key="runs/h/checkpoints/step-4/COMPLETE")["Body"].read())
    marker["files"] += [_entry(str(target), body), _entry("../step-2/optimizer.pt", b"opt2")]
    c.put_object(Bucket=b, Key="runs/h/checkpoints/step-4/COMPLETE", Body=json.dumps(marker).encode())
    before = set(tmp_path.rglob("*"))

    found = checkpoints.find_and_fetch(out, tmp_path / "resume")
    assert found.step == 2 and (found.path / "optimizer.pt").read_text() == "opt2"
    assert not target.parent.exists()
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "resume")} == before
    assert f"'{target}'" in caplog.text and "absolute" in caplog.text
    assert "runs/h/checkpoints/step-4/COMPLETE" in s3.keys(b, "runs/h/"), "kept for inspection, not deleted"


def test_a_node_file_naming_a_path_outside_the_checkpoint_never_becomes_a_complete_marker(tmp_path, caplog):
    out = str(tmp_path / "out")
    nodes = tmp_path / "out/checkpoints/step-3/.nodes"
    nodes.mkdir(parents=True)
    (nodes / "node-1.json").write_text(json.dumps({"files": [{"path": "/etc/cron.d/x", "size": 1, "sha256": "0"}]}))
    main = checkpoints.Mirror(out, node_rank=0, num_nodes=2, is_main=True, keep=2)
    main.submit(_ckpt(tmp_path / "node0", 3, {"a.pt": "a"}), 3)
    deadline = time.monotonic() + 30
    while "'/etc/cron.d/x'" not in caplog.text and not checkpoints.complete_steps(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "'/etc/cron.d/x'" in caplog.text and "node-1.json" in caplog.text
    assert checkpoints.complete_steps(out) == []


def test_the_main_node_stops_waiting_for_a_step_the_other_nodes_skipped_for_a_newer_one(tmp_path):
    """With one pending checkpoint per node, node 1 may skip step 3 for step 6: node 0 must not wait for
    its part of step 3 (600 s) but move on to step 6, which both nodes send."""
    out = str(tmp_path / "out")
    main = checkpoints.Mirror(out, node_rank=0, num_nodes=2, is_main=True, keep=2)
    three = main.submit(_ckpt(tmp_path / "node0", 3, {"a.pt": "a3"}), 3)
    assert not main.wait(1)  # gathering: node 1 never sends step 3
    six = main.submit(_ckpt(tmp_path / "node0", 6, {"a.pt": "a6"}), 6)
    checkpoints.Mirror(out, node_rank=1, num_nodes=2, is_main=False, keep=2).submit(
        _ckpt(tmp_path / "node1", 6, {"b.pt": "b6"}), 6)
    assert main.wait(30)
    assert six.result() == 6 and isinstance(three.exception(), checkpoints.Superseded)
    assert checkpoints.complete_steps(out) == [6]
