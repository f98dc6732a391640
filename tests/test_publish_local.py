"""Publishing to a local output directory has the same order and refusal semantics as S3."""
from __future__ import annotations

import hashlib
import json

import pytest

from job import publish
from job.errors import AlreadyPublishedError, ConfigError, DataError, VerificationError


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


def _reseal(pub, manifest: dict) -> None:
    body = json.dumps(manifest).encode()
    (pub / "manifest.json").write_bytes(body)
    (pub / "_SUCCESS").write_text(json.dumps({"manifest_sha256": hashlib.sha256(body).hexdigest()}))


def _tree(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad", ["../victim/file", "ABS", "sub/../../victim/file", "sub\\..\\..\\victim\\file"])
def test_overwrite_never_deletes_what_a_hostile_manifest_names_outside_the_output(tmp_path, bad):
    out = _out(tmp_path / "work")
    pub = tmp_path / "pub"
    manifest = publish.publish(out, str(pub), run_info={"run_id": "old"})
    victim = tmp_path / "victim" / "file"
    victim.parent.mkdir()
    victim.write_text("someone else's")
    bad = str(victim) if bad == "ABS" else bad
    manifest["files"].append({"path": bad, "size": 14, "sha256": "0" * 64})
    _reseal(pub, manifest)
    before = _tree(tmp_path)

    with pytest.raises(DataError) as e:
        publish.publish(out, str(pub), run_info={"run_id": "new"}, overwrite=True)
    assert e.value.exit_code == 65 and repr(bad) in str(e.value) and "manifest.json" in str(e.value)
    with pytest.raises(DataError):
        publish.verify_published(str(pub))
    assert _tree(tmp_path) == before and victim.read_text() == "someone else's"


def test_a_manifest_whose_seal_does_not_match_deletes_nothing(tmp_path):
    out = _out(tmp_path / "work")
    pub = tmp_path / "pub"
    publish.publish(out, str(pub), run_info={"run_id": "old"})
    (pub / "manifest.json").write_text(json.dumps({"files": [{"path": "sub/x.json"}]}))  # not what _SUCCESS sealed
    (out / "sub" / "x.json").unlink()
    publish.publish(out, str(pub), run_info={"run_id": "new"}, overwrite=True)
    assert (pub / "sub" / "x.json").is_file()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_output_that_is_a_file_fails_preflight_with_64_before_any_fetch(tmp_path, capsys, where):
    from job import cli

    f = tmp_path / "adapter.bin"
    f.write_bytes(b"x")
    output = f if where == "file" else f / "runs" / "r1"
    with pytest.raises(ConfigError) as e:
        publish.check_output(str(output), overwrite=False)
    assert e.value.exit_code == 64 and ("is a file" if where == "file" else f"under a file ({f})") in str(e.value)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    rc = cli.main(["run", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--output", str(output)])
    err = capsys.readouterr().err
    assert rc == 64 and "not a directory" in err and "Traceback" not in err, err  # before the model (66)
    assert f.read_bytes() == b"x"


def test_preflight_leaves_no_probe_and_no_directories_behind(tmp_path):
    publish.check_output(str(tmp_path / "a" / "b" / "out"), overwrite=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    publish.check_output(str(tmp_path / "out"), overwrite=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_symlink_planted_in_the_output_does_not_redirect_the_publish(tmp_path):
    out = _out(tmp_path / "work")
    pub, elsewhere = tmp_path / "pub", tmp_path / "elsewhere"
    pub.mkdir()
    elsewhere.mkdir()
    (pub / "sub").symlink_to(elsewhere)  # the stage has sub/x.json
    with pytest.raises(DataError) as e:
        publish.publish(out, str(pub), run_info={})
    assert "'sub/x.json' leads outside" in str(e.value)
    assert list(elsewhere.iterdir()) == [] and not (pub / "_SUCCESS").exists()
