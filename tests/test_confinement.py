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
