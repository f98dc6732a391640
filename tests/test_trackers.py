"""Trackers against real parts: `--report-to mlflow` logs to a real MLflow server (tests/mlflowserver.py, from
tools/), a SIGTERMed run resumes into the same MLflow run, `--report-to tensorboard` publishes event files."""
import json
from pathlib import Path

import pytest
import trainkit

COMMON = ["--seed", "3", "--learning-rate", "1e-3", "--max-length", "256", "--per-device-train-batch-size", "2",
          "--lr-scheduler-type", "constant"]


def _args(out, steps, *extra):
    return ["run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", out,
            "--max-steps", str(steps), *COMMON, *extra]


def _env(server, tmp_path, experiment):
    return {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": experiment,
            "SFTJOB_CACHE_DIR": str(tmp_path / "cache")}


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_run_is_named_after_the_run_id_with_params_tags_and_one_loss_point_per_logged_step(
        mlflow_server, tmp_path):
    out = tmp_path / "out"
    p = trainkit.run(*_args(str(out), 6, "--logging-steps", "2", "--eval-split", "0.1", "--eval-steps", "3",
                            "--report-to", "mlflow"), env=_env(mlflow_server, tmp_path, "trackers-e2e"))
    assert p.returncode == 0, p.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    client = mlflow_server.client()
    exp = client.get_experiment_by_name("trackers-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [status["mlflow_run_id"]]
    run = runs[0]
    assert run.info.run_name == status["run_id"] and run.info.status == "FINISHED"
    # one point per logged step, the same values the progress records carry
    logged = trainkit.losses((out / "metrics.jsonl").read_text().splitlines())
    loss = _history(client, run.info.run_id, "loss")
    assert [s for s, _ in loss] == sorted(logged) == [2, 4, 6]
    assert [v for _, v in loss] == pytest.approx([logged[s] for s in sorted(logged)])
    for key in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [2, 4, 6], key
    assert [s for s, _ in _history(client, run.info.run_id, "eval_loss")] == [3, 6]
    # the public spec as params; output and version as tags
    params, tags = run.data.params, run.data.tags
    assert params["train.max_steps"] == "6" and params["train.report_to"] == '["mlflow"]'
    assert params["model.path"] == str(trainkit.tiny_model())
    assert tags["sftjob.output"] == str(out) and tags["sftjob.run_id"] == status["run_id"]
    assert tags["sftjob.version"] == status["version"]
    assert "mlflow: could not" not in p.stderr


@pytest.mark.slow
def test_a_sigterm_then_resumed_run_continues_the_same_mlflow_run(mlflow_server, s3, tmp_path):
    bucket = s3.bucket("trackers")
    out = f"s3://{bucket}/runs/resumed"
    env = _env(mlflow_server, tmp_path, "trackers-resume")
    log = tmp_path / "first.log"
    extra = ["--logging-steps", "1", "--save-steps", "1000", "--report-to", "mlflow"]
    proc = trainkit.start(*_args(out, 400, *extra), env=env, log=log)
    trainkit.wait_for_step(log, proc, 5)
    assert trainkit.sigterm_and_wait(proc) == 75, log.read_text()[-3000:]
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/resumed/status.json")["Body"].read())
    stopped_at, first_id, first_name = status["step"], status["mlflow_run_id"], status["run_id"]
    client = mlflow_server.client()
    assert client.get_run(first_id).info.status == "KILLED"
    assert [s for s, _ in _history(client, first_id, "loss")] == list(range(1, stopped_at + 1))

    steps = stopped_at + 3
    rerun = trainkit.run(*_args(out, steps, *extra), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    status = json.loads(s3.client().get_object(Bucket=bucket, Key="runs/resumed/status.json")["Body"].read())
    assert status["attempt"] == 2 and status["resumed_from"] == stopped_at and status["mlflow_run_id"] == first_id
    exp = client.get_experiment_by_name("trackers-resume")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [first_id]  # no second run
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED" and run.info.run_name == first_name  # named by the attempt that made it
    # one history across both attempts: one point per step
    assert [s for s, _ in _history(client, first_id, "loss")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_tensorboard_event_files_are_published_under_tensorboard_and_listed_in_the_manifest(tmp_path):
    out = tmp_path / "out"
    p = trainkit.run(*_args(str(out), 4, "--logging-steps", "1", "--report-to", "tensorboard"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    events = sorted(Path(out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {str(e.relative_to(out)) for e in events} <= listed
    # the records hold the training loss at each step
    loss = {ev.step for e in events for ev in _events(e) for v in ev.summary.value if v.tag == "train/loss"}
    assert loss == {1, 2, 3, 4}


def _events(path):
    """TFRecord framing (length, crc, data, crc) around tensorboard Event protos."""
    import struct

    from tensorboardX.proto import event_pb2

    data, i = path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        yield event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4


def test_mlflow_is_ours_not_transformers_and_tensorboard_stays_with_transformers(tmp_path):
    from job.specload import build
    from job.train import recipe, trackers

    spec = build(overrides={"train.report_to": ["mlflow", "tensorboard"]})
    args = recipe.training_args(spec, {"checkpoint_dir": str(tmp_path / "ckpt"), "mixed_precision": "no"})
    assert args.report_to == ["tensorboard"]
    assert trackers.for_transformers(["mlflow"]) == "none" and trackers.trackers(["mlflow"], {}, None, rank=1) == []


def test_params_are_the_redacted_spec_flattened(monkeypatch):
    from job.train import trackers

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret-pw")
    spec = {"storage": {"endpoint_url": "http://key:sekrit@minio:9000"}, "train": {"report_to": ["mlflow"]},
            "model": {"path": "note hunter2-secret-pw"}}
    t = trackers.MlflowTracker({"spec": spec}, None)
    params = trackers.flatten(trackers.redact.data(t.plan["spec"]))
    assert params == {"storage.endpoint_url": "http://***@minio:9000", "train.report_to": '["mlflow"]',
                      "model.path": "note ***"}


def test_an_unreachable_or_unset_tracking_server_costs_a_warning_not_the_run(monkeypatch, caplog, tmp_path):
    import socket
    import time

    from job.status import Status
    from job.train import trackers

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw-not-printed@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    status = Status(tmp_path, None)
    status.update(run_id="r1", push=False)
    t0 = time.time()
    (t,) = trackers.trackers(["mlflow"], {"spec": {}}, status, rank=0)
    t.progress({"step": 1, "loss": 1.0, "time": time.time()})  # no run: nothing sent, nothing raised
    t.end(interrupted=False)
    assert time.time() - t0 < 120
    assert "mlflow: could not start the run" in caplog.text and "pw-not-printed" not in caplog.text
    assert "mlflow_run_id" not in status.read()
    caplog.clear()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert trackers.trackers(["mlflow"], {"spec": {}}, status, rank=0)[0].client is None
    assert "MLFLOW_TRACKING_URI is not set" in caplog.text
