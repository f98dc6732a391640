"""Publishing to a local output directory has the same order and refusal semantics as S3."""
from __future__ import annotations

import json

import pytest

from job import publish
from job.errors import AlreadyPublishedError, VerificationError


def _out(d):
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (d / "sub" / "x.json").write_text("{}")
    return d


def test_local_publish_writes_manifest_and_success_and_verifies(tmp_path):
    out = _out(tmp_path / "work")
    m = publish.publish(out, str(tmp_path / "pub"), run_info={"run_id": "l1", "metrics": {"loss": 1.0}})
    assert json.loads((tmp_path / "pub" / "manifest.json").read_text()) == m
    assert json.loads((tmp_path / "pub" / "_SUCCESS").read_text())["run_id"] == "l1"
    assert sorted(e["path"] for e in m["files"]) == ["adapter_model.safetensors", "sub/x.json"]
    assert publish.verify_published(str(tmp_path / "pub"))["metrics"] == {"loss": 1.0}


def test_local_republish_refused_unless_overwrite(tmp_path):
    out = _out(tmp_path / "work")
    publish.publish(out, str(tmp_path / "pub"), run_info={"run_id": "a"})
    with pytest.raises(AlreadyPublishedError) as e:
        publish.publish(out, str(tmp_path / "pub"), run_info={"run_id": "b"})
    assert e.value.exit_code == 73 and "--overwrite" in str(e.value)
    assert publish.publish(out, str(tmp_path / "pub"), run_info={"run_id": "b"}, overwrite=True)["run_id"] == "b"
    assert publish.verify_published(str(tmp_path / "pub"))["run_id"] == "b"


def test_local_manifest_without_success_does_not_verify(tmp_path):
    out = _out(tmp_path / "work")
    publish.publish(out, str(tmp_path / "pub"), run_info={})
    (tmp_path / "pub" / "_SUCCESS").unlink()
    with pytest.raises(VerificationError):
        publish.verify_published(str(tmp_path / "pub"))
