"""The one confinement check for names read back from the store (job/storage/paths.py)."""
from __future__ import annotations

import hashlib
import json

import pytest

from job import checkpoints
from job.errors import DataError, VerificationError
from job.storage import paths


@pytest.mark.parametrize("rel, why", [
    ("/etc/passwd", "absolute"), ("../victim/file", "'..'"), ("a/../../x", "'..'"), ("a/./b", "'.'"),
    ("a\\..\\x", "backslash"), ("", "empty"), ("a//b", "empty part"), ("a/", "empty part"),
    ("a\x00b", "NUL"), (None, "not a string"), (7, "not a string"),
])
def test_names_that_could_leave_the_prefix_are_refused_naming_the_entry(rel, why):
    with pytest.raises(DataError) as e:
        paths.confine(rel, "s3://b/runs/x/manifest.json")
    assert e.value.exit_code == 65 and why in str(e.value)
    assert "s3://b/runs/x/manifest.json" in str(e.value) and repr(rel) in str(e.value)


@pytest.mark.parametrize("rel", ["adapter_model.safetensors", "global_step5/rank0.pt", "a/b..c/.hidden", "..x"])
def test_ordinary_relative_names_pass_unchanged(rel, tmp_path):
    assert paths.confine(rel, "x") == rel
    assert paths.child("s3://b/runs/x/", rel, "x") == f"s3://b/runs/x/{rel}"
    assert paths.local_child(tmp_path, rel, "x") == tmp_path / rel


def test_the_error_class_is_the_callers(tmp_path):
    with pytest.raises(VerificationError) as e:
        paths.confine("../x", "COMPLETE", error=VerificationError)
    assert e.value.exit_code == 70


def test_a_local_name_through_a_symlink_out_of_its_root_is_refused(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(DataError) as e:
        paths.local_child(root, "link/file", "listing")
    assert "outside" in str(e.value) and "symbolic link" in str(e.value)
    with pytest.raises(DataError):
        paths.child(f"file://{root}", "link/file", "listing")


def test_resume_from_a_local_output_does_not_follow_a_symlink_out_of_the_checkpoint(tmp_path, caplog):
    """A checkpoint file that is a link to a node file (right size and sha256) is not copied into the resume."""
    out = tmp_path / "out"
    m = checkpoints.Mirror(str(out), node_rank=0, num_nodes=1, is_main=True, keep=3)
    for step in (2, 4):
        d = tmp_path / "local" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "optimizer.pt").write_text(f"opt{step}")
        m.submit(d, step)
        assert m.wait(30)  # one at a time: a newer checkpoint replaces a pending one
    secret = tmp_path / "node-secret"
    secret.write_bytes(b"node private key")
    step4 = out / "checkpoints" / "step-4"
    (step4 / "key.pem").symlink_to(secret)
    marker = json.loads((step4 / "COMPLETE").read_text())
    marker["files"].append({"path": "key.pem", "size": 16, "sha256": hashlib.sha256(b"node private key").hexdigest()})
    (step4 / "COMPLETE").write_text(json.dumps(marker))

    found = checkpoints.find_and_fetch(str(out), tmp_path / "resume")
    assert found.step == 2
    assert not list((tmp_path / "resume").rglob("key.pem"))
    assert "'key.pem' leads outside" in caplog.text


SHA = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("body, problem", [
    (b"not json", "not a file list"), (b"\xff\xfe", "not a file list"), (b"[]", "not a file list"),
    (b'{"files": "x"}', "not a file list"), (b'{"files": null}', "not a file list"),
    (b"[" * 5000 + b"]" * 5000, "not a file list"),
    (b'{"files": [["a"]]}', "malformed entry"), (b'{"files": [{"nopath": 1}]}', "malformed entry"),
    (json.dumps({"files": [{"path": "a", "size": 1, "sha256": 5}]}).encode(), "malformed entry"),
    (json.dumps({"files": [{"path": "a", "size": "1", "sha256": SHA}]}).encode(), "malformed entry"),
    (json.dumps({"files": [{"path": "a", "size": -1, "sha256": SHA}]}).encode(), "malformed entry"),
    (json.dumps({"files": [{"path": "a", "size": 1, "sha256": "ab"}]}).encode(), "malformed entry"),
    (json.dumps({"files": [{"path": "../a", "size": 1, "sha256": SHA}]}).encode(), "unsafe path '../a'"),
])
def test_a_file_list_read_from_the_store_is_checked_whole_before_use(body, problem):
    """Manifests, COMPLETE markers and node files: each of these crashed a reader (exit 1, a traceback:
    JSONDecodeError, AttributeError, TypeError, KeyError) or, for the last, is an escape."""
    with pytest.raises(DataError, match="m.json") as e:
        paths.file_entries(body, "m.json")
    assert problem in str(e.value)
    with pytest.raises(VerificationError):
        paths.file_entries(body, "m.json", error=VerificationError)


def test_a_well_formed_file_list_passes_unchanged():
    files = [{"path": "a/b.bin", "size": 0, "sha256": SHA, "extra": 1}]
    assert paths.file_entries(json.dumps({"files": files}).encode(), "m.json") == files
    assert paths.file_entries({"files": []}, "m.json") == []


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"files": [{"path": "a", "sha256": 5}]}'])
def test_verify_published_refuses_a_broken_manifest_with_65_naming_it(tmp_path, body):
    from job import publish
    from job.errors import ExitCode

    (tmp_path / "manifest.json").write_bytes(body)
    (tmp_path / "_SUCCESS").write_text(json.dumps({"manifest_sha256": hashlib.sha256(body).hexdigest()}))
    with pytest.raises(DataError) as e:
        publish.verify_published(str(tmp_path))
    assert e.value.exit_code == ExitCode.DATA and f"{tmp_path}/manifest.json" in str(e.value)


@pytest.mark.parametrize("seal", [b"[]", b"not json", b'{"manifest_sha256": 5}'])
def test_verify_published_refuses_a_broken_success_marker_as_unsealed(tmp_path, seal):
    from job import publish

    body = json.dumps({"files": [{"path": "a", "size": 1, "sha256": SHA}]}).encode()
    (tmp_path / "manifest.json").write_bytes(body)
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "_SUCCESS").write_bytes(seal)  # `[]` crashed with AttributeError
    with pytest.raises(VerificationError, match="does not match the one _SUCCESS sealed"):
        publish.verify_published(str(tmp_path))


@pytest.mark.parametrize("previous, attempt", [
    (b"[]", 1), (b'{"attempt": "x"}', 1), (b'{"attempt": 2, "events": [{}, 5, {"time": "t", "type": "a", '
                                            b'"message": "m"}], "mlflow_run_id": 7}', 3), (b"not json", 1)])
def test_an_attempt_reads_only_well_formed_fields_of_the_previous_status(tmp_path, monkeypatch, previous, attempt):
    """The output's status.json counts attempts; a list there, or an attempt of "x", crashed every retry
    at its start (AttributeError / ValueError: exit 1, retried until backoffLimit)."""
    from job.status import Status

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (out / "status.json").write_bytes(previous)
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", str(tmp_path / "termlog"))
    status = Status(work, str(out))
    doc = status.start(run_id="r")
    assert doc["attempt"] == attempt and doc["mlflow_run_id"] is None
    assert all(set(e) >= {"time", "type", "message"} for e in doc["events"])
    status.fail(65, "data", "bad row")  # the termination log reads every kept event
    assert "exit_code=65" in (tmp_path / "termlog").read_text()
