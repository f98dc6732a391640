"""The whole pipeline against a real S3 server (SeaweedFS): model, data and output all in S3."""
import hashlib
import json

import pytest
import trainkit
import yaml

ENDPOINT_PASSWORD = "pa55word-e2e"


@pytest.fixture(scope="module")
def published(s3):
    bucket = s3.bucket("e2e")
    c = s3.client()
    c.upload_file(str(trainkit.chat_data()), bucket, "data/train.jsonl")
    model = trainkit.tiny_model()
    for f in model.iterdir():
        c.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    out = f"s3://{bucket}/runs/x"
    # an endpoint with credentials in it (proxies want them): used by every process, published by none
    endpoint = s3.endpoint.replace("://", f"://sftjob:{ENDPOINT_PASSWORD}@")
    r = trainkit.run("run", "--model", f"s3://{bucket}/models/tiny/", "--data", f"s3://{bucket}/data/train.jsonl",
                     "--output", out, "--max-steps", "10", "--logging-steps", "4", "--endpoint-url", endpoint,
                     env=s3.env)
    return s3, bucket, out, r


def test_run_with_model_data_and_output_in_s3_publishes_a_verified_adapter(published):
    s3, bucket, out, r = published
    assert r.returncode == 0, r.stderr[-3000:]
    c = s3.client()
    keys = s3.keys(bucket, "runs/x/")
    for name in ("_SUCCESS", "manifest.json", "adapter_config.json", "adapter_model.safetensors",
                 "chat_template.jinja", "data_report.json", "metrics.jsonl", "loss.png", "run.yaml", "status.json"):
        assert f"runs/x/{name}" in keys, name
    manifest = json.loads(c.get_object(Bucket=bucket, Key="runs/x/manifest.json")["Body"].read())
    assert manifest["partial"] is False and manifest["spec_hash"] and manifest["versions"]["torch"]
    for entry in manifest["files"]:
        body = c.get_object(Bucket=bucket, Key=f"runs/x/{entry['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], entry["path"]
        assert len(body) == entry["size"]
    status = json.loads(c.get_object(Bucket=bucket, Key="runs/x/status.json")["Body"].read())
    assert status["state"] == "succeeded" and status["step"] == 10  # the last step logs even off the 4-step grid
    states = [e["type"] for e in status["events"]]
    assert states.index("fetching") < states.index("preparing") < states.index("training") \
        < states.index("publishing") < states.index("succeeded")
    done = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"event": "done"')]
    assert done and done[0]["steps"] == 10 and done[0]["final_loss"] > 0
    logged = [json.loads(x)["step"] for x in r.stdout.splitlines() if x.startswith('{"event": "progress"')]
    assert logged == [4, 8, 10]


def test_success_marker_is_written_after_everything_else(published):
    s3, bucket, _, _ = published
    objs = s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/x/")["Contents"]
    when = {o["Key"].rsplit("/", 1)[-1]: o["LastModified"] for o in objs if "/checkpoints/" not in o["Key"]}
    assert all(when["_SUCCESS"] >= t for k, t in when.items() if k != "status.json")
    assert all(when["manifest.json"] >= t for k, t in when.items() if k not in ("_SUCCESS", "status.json"))


def test_second_run_to_a_published_output_exits_73_and_changes_nothing(published):
    s3, bucket, out, _ = published
    before = s3.keys(bucket, "runs/x/")
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", f"s3://{bucket}/data/train.jsonl",
                     "--output", out, "--max-steps", "3", env=s3.env)
    assert r.returncode == 73, r.stderr[-2000:]
    assert "already published" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert s3.keys(bucket, "runs/x/") == before


def test_no_secret_appears_in_logs_or_published_files(published):
    s3, bucket, _, r = published
    for secret in (s3.secret_key, ENDPOINT_PASSWORD):
        assert secret not in r.stdout + r.stderr
    c = s3.client()
    keys = s3.keys(bucket, "runs/x/")
    assert "runs/x/launch/plan.json" in keys and "runs/x/run.yaml" in keys
    for key in keys:
        if key.endswith((".json", ".yaml", ".jsonl", "_SUCCESS", ".jinja")):
            body = c.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            assert s3.secret_key not in body and ENDPOINT_PASSWORD not in body, key
    masked = s3.endpoint.replace("://", "://***@")
    run_yaml = yaml.safe_load(c.get_object(Bucket=bucket, Key="runs/x/run.yaml")["Body"].read())
    plan = json.loads(c.get_object(Bucket=bucket, Key="runs/x/launch/plan.json")["Body"].read())
    assert run_yaml["storage"]["endpoint_url"] == masked == plan["spec"]["storage"]["endpoint_url"]


def test_bad_data_fails_with_65_and_status_says_why(s3, tmp_path):
    bucket = s3.bucket("e2e-bad")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hola"}]}\n{not json\n')
    s3.client().upload_file(str(bad), bucket, "bad.jsonl")
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", f"s3://{bucket}/bad.jsonl",
                     "--output", f"s3://{bucket}/runs/bad", "--max-steps", "3", env=s3.env)
    assert r.returncode == 65, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and ":2:" in r.stderr
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/bad/status.json")["Body"].read())
    assert status["state"] == "failed" and status["error"]["exit_code"] == 65 and status["error"]["kind"] == "data"
    assert [e["type"] for e in status["events"]][-1] == "failed"
    assert "runs/bad/_SUCCESS" not in s3.keys(bucket, "runs/bad/")


def test_a_one_step_smoke_test_trains_and_a_run_whose_only_step_is_warm_up_is_refused_with_64(tmp_path):
    """Warm-up starts at lr 0. With max_steps known it never takes every step, so `--max-steps 1` trains (it
    failed verification with 70, retried by Kubernetes). Epochs over data that make one step cannot be
    capped ahead: that is 64 with the reason (not retried: every retry would train the same single step)."""
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(out), "--max-steps", "1", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "_SUCCESS").exists()

    out = tmp_path / "epoch"
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data(4)),
                     "--output", str(out), "--max-steps", "-1", "--num-train-epochs", "1",
                     "--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "1", env=env)
    assert r.returncode == 64, r.stderr[-2000:]
    assert "lora_B tensors are all zero" in r.stderr and "warm-up" in r.stderr and "warmup_ratio 0" in r.stderr
    assert "Traceback" not in r.stderr and not (out / "_SUCCESS").exists()
    assert json.loads((out / "status.json").read_text())["error"]["exit_code"] == 64


def test_a_full_fine_tune_publishes_verified_full_weights(tmp_path):
    out = tmp_path / "out"
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(out), "--method", "full", "--max-steps", "3",
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model verified" in r.stderr
    files = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(f.startswith("adapter_") for f in files) and (out / "_SUCCESS").exists()


def test_overwrite_replaces_a_finished_run_without_resuming_from_it(tmp_path):
    out, env = tmp_path / "out", {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    common = ["run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", str(out)]
    first = trainkit.run(*common, "--max-steps", "4", "--save-steps", "2", "--eval-split", "0.1", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / "eval.json").exists() and (out / "checkpoints" / "step-4" / "COMPLETE").exists()

    second = trainkit.run(*common, "--max-steps", "3", "--overwrite", env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "replacing the finished run" in second.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["resumed_from"] is None and status["step"] == 3
    assert not (out / "checkpoints").exists()  # the old run's, removed; this run saved none
    assert not (out / "eval.json").exists() and not (out / "eval.md").exists()  # not this run's
    files = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == files | {"manifest.json", "_SUCCESS", "status.json"}
