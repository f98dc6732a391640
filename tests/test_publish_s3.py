"""Publishing: files, then manifest.json, then _SUCCESS; never over a finished run; a killed publish reruns."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from job import publish, storage
from job.errors import AlreadyPublishedError, ConfigError, DataError, PermissionDeniedError, VerificationError
from job.spec import StorageSpec
from job.storage import s3 as s3backend

ROOT = Path(__file__).resolve().parents[1]


def make_output(d: Path, n_small: int = 3, big_bytes: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big_bytes or 4096))
    (d / "checkpoints" / "step-2").mkdir(parents=True)
    for i in range(n_small):
        (d / "checkpoints" / "step-2" / f"shard-{i:03d}.bin").write_bytes(os.urandom(1000 + i))
    return d


def test_publish_uploads_files_then_manifest_then_success_last(s3, tmp_path):
    storage.configure(StorageSpec(multipart_chunksize_mb=5, max_concurrency=4))
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out", big_bytes=6 * 1024 * 1024)
    order: list[str] = []
    for op in ("PutObject", "CompleteMultipartUpload"):
        s3backend.client().meta.events.register(f"before-parameter-build.s3.{op}",
                                                lambda params, **_: order.append(params["Key"]))
    run_info = {"run_id": "r42", "spec_hash": "abc123", "base_model": "s3://models/llama/",
                "metrics": {"train_loss": 1.25}}
    manifest = publish.publish(out, f"s3://{b}/runs/r42/", run_info=run_info)

    assert order[0].startswith("runs/r42/.sftjob-probe-")  # pre-flight: prove a write, then delete it
    assert order[-2:] == ["runs/r42/manifest.json", "runs/r42/_SUCCESS"]
    assert sorted(order[1:-2]) == sorted(f"runs/r42/{e['path']}" for e in manifest["files"])
    remote = json.loads(storage.read_bytes(f"s3://{b}/runs/r42/manifest.json"))
    assert remote == manifest
    assert {e["path"] for e in manifest["files"]} == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert manifest["run_id"] == "r42" and manifest["spec_hash"] == "abc123" and manifest["partial"] is False
    assert manifest["metrics"] == {"train_loss": 1.25} and manifest["base_model"] == "s3://models/llama/"
    assert "boto3" in manifest["versions"] and "python" in manifest["versions"]
    assert publish.verify_published(f"s3://{b}/runs/r42/")["run_id"] == "r42"


def test_republish_is_refused_with_73_and_changes_nothing(s3, tmp_path):
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out")
    publish.publish(out, f"s3://{b}/runs/again", run_info={"run_id": "first"})
    before = s3.keys(b, "runs/again/")
    (out / "adapter_model.safetensors").write_bytes(b"different weights")
    with pytest.raises(AlreadyPublishedError) as e:
        publish.publish(out, f"s3://{b}/runs/again", run_info={"run_id": "second"})
    assert e.value.exit_code == 73
    assert f"s3://{b}/runs/again" in str(e.value) and "output.overwrite: true" in str(e.value)
    assert s3.keys(b, "runs/again/") == before
    with pytest.raises(AlreadyPublishedError):
        publish.check_output(f"s3://{b}/runs/again", overwrite=False)


def test_concurrent_publisher_loses_on_the_server_side_412(s3, tmp_path, monkeypatch):
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out")
    publish.publish(out, f"s3://{b}/runs/race", run_info={"run_id": "winner"})
    monkeypatch.setattr(publish, "check_output", lambda *a, **k: None)  # as if _SUCCESS appeared after the check
    with pytest.raises(AlreadyPublishedError) as e:
        publish.publish(out, f"s3://{b}/runs/race", run_info={"run_id": "loser"})
    assert e.value.exit_code == 73 and "If-None-Match" in str(e.value)
    assert json.loads(storage.read_bytes(f"s3://{b}/runs/race/_SUCCESS"))["run_id"] == "winner"


def test_overwrite_true_republishes(s3, tmp_path):
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out")
    publish.publish(out, f"s3://{b}/runs/ow", run_info={"run_id": "one"})
    (out / "adapter_model.safetensors").write_bytes(b"v2")
    m = publish.publish(out, f"s3://{b}/runs/ow", run_info={"run_id": "two"}, overwrite=True)
    assert publish.verify_published(f"s3://{b}/runs/ow")["run_id"] == "two" == m["run_id"]
    assert storage.read_bytes(f"s3://{b}/runs/ow/adapter_model.safetensors") == b"v2"


def test_replacing_a_finished_run_retires_it_and_leaves_none_of_its_files(s3, tmp_path):
    b = s3.bucket("publish")
    uri = f"s3://{b}/runs/replace"
    old = make_output(tmp_path / "old")
    (old / "eval.json").write_text("{}")
    publish.publish(old, uri, run_info={"run_id": "old"})
    storage.write_bytes(f"{uri}/checkpoints/step-9/COMPLETE", b"{}")  # the finished run's checkpoint
    storage.write_bytes(f"{uri}/status.json", b"{}")

    assert publish.retire(uri) is True  # output.overwrite at the start of the new run
    keys = s3.keys(b, "runs/replace/")
    assert not any("/checkpoints/" in k for k in keys) and "runs/replace/_SUCCESS" not in keys
    assert "runs/replace/eval.json" in keys  # files stay until the new publish replaces them
    publish.check_output(uri, overwrite=False)  # no longer "published": a restart resumes its own checkpoints
    assert publish.retire(uri) is False

    new = tmp_path / "new"
    new.mkdir()
    (new / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (new / "adapter_model.safetensors").write_bytes(b"new")
    m = publish.publish(new, uri, run_info={"run_id": "new"})
    keys = s3.keys(b, "runs/replace/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "_SUCCESS", "status.json"])
    assert {f["path"] for f in m["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    assert publish.verify_published(uri)["run_id"] == "new"


def test_republish_sends_only_files_whose_checksum_changed(s3, tmp_path):
    storage.configure(StorageSpec(multipart_chunksize_mb=5, max_concurrency=4))
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out", big_bytes=6 * 1024 * 1024)  # multipart: composite checksum
    publish.publish(out, f"s3://{b}/runs/delta", run_info={}, partial=True)
    (out / "checkpoints" / "step-2" / "shard-000.bin").write_bytes(b"changed, other size")
    (out / "checkpoints" / "step-2" / "shard-001.bin").write_bytes(os.urandom(1001))  # same size
    sent: list = []
    for op in ("PutObject", "UploadPart"):
        s3backend.client().meta.events.register(f"before-parameter-build.s3.{op}",
                                                lambda params, **_: sent.append(params["Key"]))
    publish.publish(out, f"s3://{b}/runs/delta", run_info={})
    sent = sorted({k for k in sent if "/.sftjob-probe-" not in k})  # the pre-flight write probe
    assert sent == ["runs/delta/_SUCCESS", "runs/delta/checkpoints/step-2/shard-000.bin",
                    "runs/delta/checkpoints/step-2/shard-001.bin", "runs/delta/manifest.json"]
    publish.verify_published(f"s3://{b}/runs/delta")


def test_partial_publish_writes_manifest_but_no_success(s3, tmp_path):
    b = s3.bucket("publish")
    out = make_output(tmp_path / "out")
    m = publish.publish(out, f"s3://{b}/runs/partial", run_info={}, partial=True)
    assert m["partial"] is True and not storage.exists(f"s3://{b}/runs/partial/_SUCCESS")
    publish.check_output(f"s3://{b}/runs/partial", overwrite=False)  # not finished: a rerun may publish


def test_verify_published_detects_a_tampered_file(s3, tmp_path):
    b = s3.bucket("publish")
    publish.publish(make_output(tmp_path / "out"), f"s3://{b}/runs/tamper", run_info={})
    s3.client().put_object(Bucket=b, Key="runs/tamper/adapter_config.json", Body=b"{}")
    with pytest.raises(VerificationError) as e:
        publish.verify_published(f"s3://{b}/runs/tamper")
    assert "adapter_config.json" in str(e.value)


def test_publish_to_a_missing_bucket_fails_fast_with_66(s3, tmp_path):
    with pytest.raises(Exception) as e:
        publish.check_output("s3://no-such-output-bucket/runs/x", overwrite=False)
    assert getattr(e.value, "exit_code", None) == 66


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from job import publish, storage
    from job.spec import StorageSpec
    from job.storage import s3
    storage.configure(StorageSpec(max_concurrency=1))
    s3.client().meta.events.register("before-send.s3.PutObject", lambda **kw: time.sleep(0.05))
    publish.publish(Path(sys.argv[1]), sys.argv[2], run_info={"run_id": "killed"})
    print("PUBLISHED")
""")


def test_publish_killed_midway_leaves_no_success_and_a_rerun_completes_it(s3, tmp_path):
    b = s3.bucket("killed")
    out = make_output(tmp_path / "out", n_small=80)
    uri = f"s3://{b}/runs/k1"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), uri], cwd=ROOT, env=os.environ.copy(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(s3.keys(b, "runs/k1/")) < 10:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    keys = s3.keys(b, "runs/k1/")
    assert 10 <= len(keys) < 82
    assert "runs/k1/_SUCCESS" not in keys and "runs/k1/manifest.json" not in keys

    publish.check_output(uri, overwrite=False)  # an unfinished prefix is not "published"
    (out / "adapter_config.json").write_text(json.dumps({"r": 16}))  # changed since the killed attempt
    puts: list = []
    s3backend.client().meta.events.register("before-parameter-build.s3.PutObject",
                                            lambda params, **_: puts.append(params["Key"]))
    manifest = publish.publish(out, uri, run_info={"run_id": "rerun"})
    assert len(manifest["files"]) == 82
    already = {k for k in keys if k.endswith((".bin", ".safetensors"))} - {"runs/k1/adapter_config.json"}
    assert not already & set(puts), "files stored intact by the killed attempt are not sent again"
    assert "runs/k1/adapter_config.json" in puts
    assert publish.verify_published(uri)["run_id"] == "rerun"


# ---- nothing read back from the prefix leads outside it; pre-flight proves a write ----------------

def _reseal(uri: str, manifest: dict) -> None:
    """Write a manifest and a _SUCCESS that seals it: whoever can write the prefix can do this."""
    body = json.dumps(manifest).encode()
    storage.write_bytes(f"{uri}/manifest.json", body)
    storage.write_bytes(f"{uri}/_SUCCESS", json.dumps({"manifest_sha256": hashlib.sha256(body).hexdigest()}).encode())


def test_a_hostile_manifest_is_refused_with_65_and_nothing_outside_the_prefix_is_deleted(s3, tmp_path):
    b = s3.bucket("publish-hostile")
    uri = f"s3://{b}/runs/hm"
    out = make_output(tmp_path / "out")
    manifest = publish.publish(out, uri, run_info={"run_id": "old"})
    s3.client().put_object(Bucket=b, Key="runs/victim/file", Body=b"someone else's")
    manifest["files"].append({"path": "../victim/file", "size": 14, "sha256": "0" * 64})
    _reseal(uri, manifest)
    before = s3.keys(b, "runs/")

    for attempt in (lambda: publish.check_output(uri, overwrite=True),
                    lambda: publish.publish(out, uri, run_info={"run_id": "new"}, overwrite=True),
                    lambda: publish.verify_published(uri)):
        with pytest.raises(DataError) as e:
            attempt()
        assert e.value.exit_code == 65 and "'../victim/file'" in str(e.value) and "manifest.json" in str(e.value)
    assert s3.keys(b, "runs/") == before, "nothing written or deleted, inside or outside the prefix"


def test_a_manifest_no_success_seals_deletes_nothing_and_says_so(s3, tmp_path, caplog):
    b = s3.bucket("publish-unsealed")
    uri = f"s3://{b}/runs/u"
    old = make_output(tmp_path / "old")
    (old / "eval.json").write_text("{}")
    publish.publish(old, uri, run_info={"run_id": "interrupted"})
    s3.client().delete_object(Bucket=b, Key="runs/u/_SUCCESS")  # killed between manifest and _SUCCESS
    new = tmp_path / "new"
    new.mkdir()
    (new / "adapter_model.safetensors").write_bytes(b"new")

    publish.publish(new, uri, run_info={"run_id": "new"})
    keys = s3.keys(b, "runs/u/")
    assert "runs/u/eval.json" in keys and "runs/u/adapter_config.json" in keys  # stale, but not deleted
    assert "is not sealed by _SUCCESS" in caplog.text and "deleting none" in caplog.text
    assert publish.verify_published(uri)["run_id"] == "new"


def test_preflight_creates_and_deletes_a_probe_and_leaves_nothing(s3):
    b = s3.bucket("preflight")
    puts: list = []
    s3backend.client().meta.events.register("before-parameter-build.s3.PutObject",
                                            lambda params, **_: puts.append(params["Key"]))
    assert publish.check_output(f"s3://{b}/runs/p", overwrite=False) is False
    assert len(puts) == 1 and puts[0].startswith("runs/p/.sftjob-probe-")
    assert s3.keys(b) == {}


def test_read_only_output_credentials_fail_preflight_with_77_before_any_fetch(s3, tmp_path, monkeypatch, capsys):
    from job import cli

    b = s3.bucket("preflight-ro")
    for k, v in s3.reader_env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PermissionDeniedError) as e:
        publish.check_output(f"s3://{b}/runs/ro", overwrite=False)
    assert e.value.exit_code == 77 and f"cannot write under s3://{b}/runs/ro" in str(e.value)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    rc = cli.main(["run", "--model", f"s3://{b}/no-such-model/", "--data", str(data), "--output", f"s3://{b}/runs/ro"])
    err = capsys.readouterr().err
    assert rc == 77 and "cannot write under" in err, err  # before the model (66) is fetched
    assert "Traceback" not in err
    assert s3.keys(b) == {}


def test_an_output_that_names_an_object_fails_preflight_with_64(s3):
    b = s3.bucket("preflight-obj")
    s3.client().put_object(Bucket=b, Key="data/train.jsonl", Body=b"{}\n")
    with pytest.raises(ConfigError) as e:
        publish.check_output(f"s3://{b}/data/train.jsonl", overwrite=False)
    assert e.value.exit_code == 64 and "is an object, not a prefix" in str(e.value)
    assert set(s3.keys(b)) == {"data/train.jsonl"}
