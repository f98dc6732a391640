"""sftjob submit | status | logs | cancel | resume | list against a fake Kubernetes API server.

No kube-apiserver can run here, so tests/fake_kube.py serves the endpoints the real clients use:
the pinned `tools/bin/helm` installs and uninstalls the real charts/sftjob through it (discovery,
OpenAPI, release Secrets, creating the rendered objects), and `sftjob` reads it through the
official `kubernetes` client — the same code paths as against a real cluster. What the fake cannot
show (a real Job controller, kubelet, Kueue, RBAC, logs from real containers) is played by each
test's scenario and listed in docs/ops.md under "Tested against a fake API server".
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_kube import FakeKube  # tests/ is on sys.path (rootdir conftest)

from job import cli

REPO = Path(__file__).resolve().parents[1]
HELM = REPO / "tools" / "bin" / "helm"
NS = "ml"


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make tools` (the ops tests use the pinned helm)")
    return HELM


@pytest.fixture
def kube(tmp_path, monkeypatch, helm_bin):
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig", NS)))
        monkeypatch.setenv("SFTJOB_HELM", str(helm_bin))
        monkeypatch.setenv("SFTJOB_CHART", str(REPO / "charts" / "sftjob"))
        monkeypatch.setenv("SFTJOB_POLL_SECONDS", "0.05")
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            monkeypatch.setenv(var, str(tmp_path / "helm" / var))
        yield fake


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "output"
    d.mkdir()
    return d


def values(tmp_path: Path, out: Path, **extra) -> str:
    doc = {"run": {"model": {"path": "s3://models/tiny/"}, "data": {"path": "s3://data/train.jsonl"},
                   "output": {"uri": str(out)}, "train": {"max_steps": 100}}, "gpusPerNode": 1, **extra}
    path = tmp_path / "my-run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def write_status(out: Path, **fields) -> None:
    """What the job writes to <output>/status.json (job/status.py)."""
    doc = {"state": "training", "step": 0, "max_steps": 100, "epoch": 0.0, "loss": None,
           "tokens_per_second": None, "eta_seconds": None, "attempt": 1, "resumed_from": None,
           "started_at": "2026-11-25T10:00:00+00:00", "updated_at": "2026-11-25T10:05:00+00:00",
           "events": [], "error": None, "run_id": "r1", "output": str(out), **fields}
    (out / "status.json").write_text(json.dumps(doc))


def sftjob(*argv: str) -> int:
    return cli.main(list(argv))


def wait_for(cond, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := cond():
            return got
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def seen_by_waiter(fake: FakeKube, name: str, polls: int = 2) -> None:
    """Block the fake controller until the waiter has polled the Job `polls` more times, so it has
    read what was just written whatever the machine's load (a fixed sleep is not enough in CI)."""
    def gets():
        return sum(1 for m, p in list(fake.requests) if m == "GET" and p.split("?")[0].endswith(f"/jobs/{name}"))
    start = gets()
    wait_for(lambda: gets() >= start + polls, timeout=60)


def complete(fake: FakeKube, name: str) -> None:
    fake.set_condition(NS, name, "SuccessCriteriaMet", "CompletionsReached")
    fake.set_condition(NS, name, "Complete", "CompletionsReached")


# ---- submit --wait: the run's exit code ----------------------------------------------------------
def test_submit_wait_returns_0_when_the_run_completes(kube, out, tmp_path, capsys):
    def controller(fake, job):
        name = job["metadata"]["name"]
        pod = fake.run_pod(NS, name, 0, log="training...\n")
        write_status(out, step=50, loss=1.25, tokens_per_second=2100.0, eta_seconds=60)
        seen_by_waiter(fake, name)
        write_status(out, state="succeeded", step=100, loss=0.9)
        fake.finish_pod(NS, pod, 0)
        complete(fake, name)
    kube.on_create("jobs", controller)

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-ok", "--wait", "--timeout", "1m") == 0

    err = capsys.readouterr().err
    assert "run run-ok succeeded (exit 0)" in err
    assert "step 50/100" in err  # progress from status.json while waiting
    created = [p.split("?")[0] for m, p in kube.requests if m == "POST"]
    assert f"/api/v1/namespaces/{NS}/secrets" in created  # a normal Helm release
    assert f"/apis/batch/v1/namespaces/{NS}/jobs" in created
    assert kube.get("secrets", NS, "sh.helm.release.v1.run-ok.v1")["metadata"]["labels"]["status"] == "deployed"


def test_submit_wait_returns_65_when_failjob_stops_a_run_on_bad_data(kube, out, tmp_path, capsys):
    why = "bad data: s3://data/train.jsonl:3: messages[1].content: expected a string"

    def controller(fake, job):
        name = job["metadata"]["name"]
        pod = fake.run_pod(NS, name, 0)
        write_status(out, state="failed", error={"exit_code": 65, "kind": "data", "message": why})
        fake.finish_pod(NS, pod, 65, message=why)
        msg = f"Container trainer for pod {NS}/{pod} failed with exit code 65 matching FailJob rule at index 1"
        fake.set_condition(NS, name, "FailureTarget", "PodFailurePolicy", msg)
        fake.set_condition(NS, name, "Failed", "PodFailurePolicy", msg)
    kube.on_create("jobs", controller)

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-bad", "--wait") == 65

    err = capsys.readouterr().err
    assert "failed with exit 65 (bad data)" in err
    assert "train.jsonl:3: messages[1].content" in err  # says why, from the termination message


@pytest.mark.parametrize("disruption", ["EvictionByEvictionAPI", None])
def test_submit_wait_returns_0_when_a_run_exits_75_and_its_replacement_resumes(kube, out, tmp_path, capsys,
                                                                              disruption):
    def controller(fake, job):
        name = job["metadata"]["name"]
        first = fake.run_pod(NS, name, 0)
        write_status(out, step=20, loss=1.5)
        fake.finish_pod(NS, first, 75, message="interrupted: SIGTERM; saved checkpoints/step-20",
                        disruption=disruption)
        seen_by_waiter(fake, name)  # the waiter sees the 75 and keeps waiting
        second = fake.run_pod(NS, name, 0)
        write_status(out, step=60, attempt=2, resumed_from=20, loss=1.1)
        seen_by_waiter(fake, name)
        write_status(out, state="succeeded", step=100, attempt=2, resumed_from=20)
        fake.finish_pod(NS, second, 0)
        complete(fake, name)
    kube.on_create("jobs", controller)

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-75", "--wait") == 0

    err = capsys.readouterr().err
    assert "attempt 2, resumed from step 20" in err
    assert ("1 evictions" in err) == bool(disruption)
    assert "succeeded (exit 0)" in err


def test_submit_wait_returns_75_when_the_job_gives_up_after_interruptions(kube, out, tmp_path):
    def controller(fake, job):
        name = job["metadata"]["name"]
        for _ in range(2):
            fake.finish_pod(NS, fake.run_pod(NS, name, 0), 75, message="interrupted: deadline")
        fake.set_condition(NS, name, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    kube.on_create("jobs", controller)

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-giveup", "--wait") == 75


def test_cancel_checkpoint_then_resume_during_submit_wait_ends_with_0(kube, out, tmp_path, capsys):
    """The manual path: suspend (pods SIGTERM → checkpoint → 75), un-suspend, resumed run succeeds."""
    def controller(fake, job):  # plays the Job controller reacting to spec.suspend
        name = job["metadata"]["name"]
        pod = fake.run_pod(NS, name, 0)
        write_status(out, step=30)
        wait_for(lambda: fake.get("jobs", NS, name)["spec"].get("suspend"))
        write_status(out, state="interrupted", step=30)
        fake.finish_pod(NS, pod, 75, message="interrupted: SIGTERM; saved checkpoints/step-30")
        wait_for(lambda: not fake.get("jobs", NS, name)["spec"].get("suspend"))
        pod = fake.run_pod(NS, name, 0)
        write_status(out, state="succeeded", step=100, attempt=2, resumed_from=30)
        fake.finish_pod(NS, pod, 0)
        complete(fake, name)
    kube.on_create("jobs", controller)
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault(
        "rc", sftjob("submit", "-f", values(tmp_path, out), "--name", "run-pause", "--wait")))
    waiter.start()
    wait_for(lambda: kube.logs and (out / "status.json").exists())

    assert sftjob("cancel", "run-pause", "--checkpoint") == 0
    wait_for(lambda: any(p["status"]["phase"] == "Failed" for p in kube.list("pods", NS)))
    assert waiter.is_alive()  # 75 while suspended is not the end
    assert sftjob("resume", "run-pause") == 0
    waiter.join(10)

    assert result["rc"] == 0
    assert ("PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/run-pause") in kube.requests
    assert "suspended" in capsys.readouterr().err


def test_submit_rejects_a_bad_spec_with_64_before_touching_the_cluster(kube, out, tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"run": {"output": str(out), "train": {"learnin_rate": 1e-4}}}))

    assert sftjob("submit", "-f", str(path), "--wait") == 64

    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert kube.requests == []


def test_submit_accepts_a_bare_run_spec_and_names_the_release_after_the_file(kube, out, tmp_path, capsys):
    path = tmp_path / "My_Run.yaml"
    path.write_text(yaml.safe_dump({"output": str(out), "learning_rate": 1e-4, "model": "s3://models/tiny/",
                                  "data": "s3://data/train.jsonl"}))  # the chart requires the run's inputs

    assert sftjob("submit", "-f", str(path)) == 0

    assert capsys.readouterr().out == "my-run\n"  # NAME=$(sftjob submit -f ...)
    run = json.loads(kube.get("configmaps", NS, "my-run")["data"]["run.yaml"])
    assert run["output"] == {"uri": str(out)} and run["train"]["learning_rate"] == 1e-4  # canonical form
    assert kube.get("jobs", NS, "my-run") is not None


def test_submit_of_a_name_in_use_is_64_with_the_way_out(kube, out, tmp_path, capsys):
    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-twice") == 0

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-twice") == 64

    err = capsys.readouterr().err
    assert 'a release named "run-twice" already exists in namespace "ml"' in err
    assert "sftjob cancel run-twice" in err


def test_submit_wait_timeout_is_69_and_says_the_run_goes_on(kube, out, tmp_path, capsys):
    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-slow", "--wait", "--timeout", "0.3s") == 69
    assert "timed out after 0s waiting for run run-slow (still pending)" in capsys.readouterr().err


# ---- status -------------------------------------------------------------------------------------
def test_status_json_joins_a_kueue_queued_job_without_status_json(kube, out, tmp_path, capsys):
    def kueue(fake, job):  # what Kueue does for a Job with a queue-name label
        fake.create("workloads", {
            "metadata": {"name": f"job-{job['metadata']['name']}-1a2b3",
                         "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
            "spec": {"active": True, "queueName": "gpu"},
            "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                       "message": "couldn't assign flavors to pod set main: insufficient "
                                                  "quota for nvidia.com/gpu in flavor h100, 8 more needed"}]}}, NS)
        fake.add_event(NS, "Job", job["metadata"]["name"], "Suspended", "Job suspended")
    kube.on_create("jobs", kueue)
    assert sftjob("submit", "-f", values(tmp_path, out, scheduling={"kueue": {"queueName": "gpu"}}),
                  "--name", "run-q") == 0
    wait_for(lambda: kube.list("workloads", NS))
    capsys.readouterr()

    assert sftjob("status", "run-q", "--json") == 0

    v = json.loads(capsys.readouterr().out)
    assert v["state"] == "queued" and v["exit_code"] is None
    assert v["job"]["suspended"] is True and v["job"]["active"] == 0
    assert v["kueue"]["queue"] == "gpu" and v["kueue"]["admitted"] is False
    assert "insufficient quota for nvidia.com/gpu" in v["kueue"]["message"]
    assert v["output"] == str(out)
    assert v["progress"] is None and v["progress_note"] == "no status.json yet"
    assert v["events"][0]["reason"] == "Suspended"


def test_status_text_shows_pods_last_exit_and_progress(kube, out, tmp_path, capsys):
    def controller(fake, job):
        name = job["metadata"]["name"]
        fake.finish_pod(NS, fake.run_pod(NS, name, 0), 137, message="OOMKilled")
        fake.run_pod(NS, name, 0)
    kube.on_create("jobs", controller)
    sftjob("submit", "-f", values(tmp_path, out), "--name", "run-text")
    wait_for(lambda: len(kube.list("pods", NS)) == 2)
    write_status(out, step=40, loss=1.2345, tokens_per_second=1500.0, eta_seconds=3700, attempt=2, resumed_from=30)
    capsys.readouterr()

    assert sftjob("status", "run-text") == 0

    text = capsys.readouterr().out
    assert "running [1 active, 1 failed, 1 restarts]" in text
    assert "exit 137: OOMKilled" in text
    assert "step 40/100 (40.0%), loss 1.234, 1,500 tok/s, ETA 1h01m, attempt 2, resumed from step 30" in text


def test_status_watch_shows_a_progress_bar_until_the_run_ends(kube, out, tmp_path, capsys):
    def controller(fake, job):
        name = job["metadata"]["name"]
        pod = fake.run_pod(NS, name, 0)
        for step in (25, 50, 75, 100):
            write_status(out, step=step, state="succeeded" if step == 100 else "training")
            time.sleep(0.1)
        fake.finish_pod(NS, pod, 0)
        complete(fake, name)
    kube.on_create("jobs", controller)
    sftjob("submit", "-f", values(tmp_path, out), "--name", "run-watch")
    capsys.readouterr()

    assert sftjob("status", "run-watch", "--watch") == 0

    shown = capsys.readouterr().out
    assert "━" in shown and "100.0% 100/100 steps" in shown


def test_status_of_an_unknown_run_is_66(kube, capsys):
    assert sftjob("status", "nope") == 66
    assert 'jobs.batch "nope" not found in namespace "ml"' in capsys.readouterr().err


# ---- errors: forbidden (77), unreachable (69), no cluster configured (64) -----------------------
def test_status_forbidden_is_77_naming_the_verb_and_resource(kube, out, tmp_path, capsys):
    sftjob("submit", "-f", values(tmp_path, out), "--name", "run-rbac")
    kube.deny.add(("get", "jobs"))
    capsys.readouterr()

    assert sftjob("status", "run-rbac") == 77

    err = capsys.readouterr().err
    assert 'forbidden: cannot get jobs.batch in namespace "ml"' in err
    assert 'cannot get resource "jobs" in API group "batch"' in err  # the server's own words


def test_submit_forbidden_by_helm_is_77_naming_the_verb_and_resource(kube, out, tmp_path, capsys):
    kube.deny.add(("create", "jobs"))

    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-rbac2") == 77

    assert 'forbidden: cannot create jobs.batch in namespace "ml"' in capsys.readouterr().err


def closed_port() -> int:
    """A local port nothing listens on (bound, then closed): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [["status", "run"], ["logs", "run"], ["cancel", "run", "--checkpoint"],
                                  ["resume", "run"], ["list"], ["cancel", "run"], ["submit", "--name", "run"]])
def test_a_configured_but_unreachable_cluster_is_69(kube, out, tmp_path, monkeypatch, capsys, argv):
    cfg = json.loads(Path(kube.kubeconfig(tmp_path / "dead", NS)).read_text())
    url = f"http://127.0.0.1:{closed_port()}"
    cfg["clusters"][0]["cluster"]["server"] = url
    (tmp_path / "dead").write_text(json.dumps(cfg))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "dead"))
    argv = argv + (["-f", values(tmp_path, out)] if argv[0] == "submit" else [])

    assert sftjob(*argv) == 69

    err = capsys.readouterr().err
    assert "cannot reach" in err and (url in err or "connection refused" in err)
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["status", "run"], ["status", "run", "--json"], ["logs", "run"],
                                  ["cancel", "run"], ["cancel", "run", "--checkpoint"], ["resume", "run"],
                                  ["list"], ["submit", "--name", "run"]])
def test_no_kubeconfig_and_no_service_account_is_64_saying_what_was_looked_for(out, tmp_path, monkeypatch,
                                                                              capsys, argv):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("SFTJOB_HELM", "/nonexistent/helm")  # submit and cancel must stop before helm
    argv = argv + (["-f", values(tmp_path, out)] if argv[0] == "submit" else [])

    assert sftjob(*argv) == 64

    err = capsys.readouterr().err
    assert "no Kubernetes cluster configured" in err
    assert "KUBECONFIG: not set" in err
    assert f"~/.kube/config: {tmp_path / 'home' / '.kube' / 'config'} does not exist" in err
    assert "in-cluster service account" in err and "/var/run/secrets/kubernetes.io/serviceaccount/token" in err
    assert "fix: point KUBECONFIG" in err
    assert "Traceback" not in err


def test_a_kubeconfig_that_cannot_be_used_is_64(tmp_path, monkeypatch, capsys):
    (tmp_path / "kubeconfig").write_text("clusters: [oops")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))

    assert sftjob("status", "run") == 64

    err = capsys.readouterr().err
    assert "cannot load the Kubernetes configuration" in err and "fix: check KUBECONFIG" in err
    assert "Traceback" not in err


# ---- logs, cancel, list ----------------------------------------------------------------------------
def test_logs_follow_streams_the_pod_of_a_rank_until_it_ends(kube, out, tmp_path, capsys):
    def controller(fake, job):
        name = job["metadata"]["name"]
        pods = [fake.run_pod(NS, name, i, log=f"rank {i}: starting\n") for i in (0, 1)]
        time.sleep(0.2)
        fake.logs[(NS, pods[1])] += "rank 1: step 10 loss 1.2\n"
        fake.logs[(NS, pods[1])] += ('{"event": "progress", "step": 20, "max_steps": 40, "loss": 0.5, '
                                     '"tokens_per_second": 900.0, "eta_seconds": 12.0}\n')
        fake.logs[(NS, pods[1])] += ('{"time": "2026-11-29T21:00:00.000Z", "level": "INFO", "logger": "sftjob", '
                                     '"message": "checkpoint step-20 mirrored"}\n')
        time.sleep(0.1)
        fake.finish_pod(NS, pods[1], 0)
    kube.on_create("jobs", controller)
    sftjob("submit", "-f", values(tmp_path, out, nodes=2), "--name", "run-logs")
    wait_for(lambda: len(kube.list("pods", NS)) == 2)
    capsys.readouterr()

    assert sftjob("logs", "run-logs", "--rank", "1", "--follow") == 0

    assert capsys.readouterr().out == ("rank 1: starting\nrank 1: step 10 loss 1.2\n"
                                       "step 20/40  loss 0.5000  900 tok/s  eta 12s\n"
                                       "2026-11-29T21:00:00.000Z INFO sftjob: checkpoint step-20 mirrored\n")
    assert sftjob("logs", "run-logs", "--rank", "1", "--raw") == 0
    assert '{"event": "progress", "step": 20' in capsys.readouterr().out
    assert sftjob("logs", "run-logs", "--rank", "5") == 66


def test_cancel_uninstalls_the_release(kube, out, tmp_path):
    sftjob("submit", "-f", values(tmp_path, out), "--name", "run-gone")
    assert kube.get("jobs", NS, "run-gone")

    assert sftjob("cancel", "run-gone") == 0

    assert kube.get("jobs", NS, "run-gone") is None
    assert kube.list("secrets", NS, "owner=helm") == []
    assert sftjob("cancel", "run-gone") == 66


def test_cancel_checkpoint_under_kueue_deactivates_the_workload(kube, out, tmp_path):
    kube.on_create("jobs", lambda fake, job: fake.create("workloads", {
        "metadata": {"name": "wl-1", "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
        "spec": {"active": True}, "status": {"conditions": [{"type": "Admitted", "status": "True"}]}}, NS))
    sftjob("submit", "-f", values(tmp_path, out, scheduling={"kueue": {"queueName": "gpu"}}), "--name", "run-kq")
    wait_for(lambda: kube.list("workloads", NS))

    assert sftjob("cancel", "run-kq", "--checkpoint") == 0
    assert kube.get("workloads", NS, "wl-1")["spec"]["active"] is False
    assert sftjob("resume", "run-kq") == 0
    assert kube.get("workloads", NS, "wl-1")["spec"]["active"] is True


def test_list_shows_runs_with_state_and_progress(kube, out, tmp_path, capsys):
    kube.on_create("jobs", lambda fake, job: fake.run_pod(NS, job["metadata"]["name"], 0))
    sftjob("submit", "-f", values(tmp_path, out), "--name", "run-a")
    wait_for(lambda: kube.list("pods", NS))
    write_status(out, step=10)
    capsys.readouterr()

    assert sftjob("list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["progress"]["step"]) for r in rows] == [("run-a", "running", 10)]
    assert sftjob("list") == 0
    assert "run-a" in capsys.readouterr().out


def test_status_reads_progress_from_an_s3_output(kube, s3, tmp_path, capsys):
    bucket = s3.bucket("ops-runs")
    uri = f"s3://{bucket}/runs/run-s3/"
    path = tmp_path / "s3-run.yaml"
    path.write_text(yaml.safe_dump({"run": {"output": uri, "storage": {"endpoint_url": s3.endpoint},
                                          "model": "s3://models/tiny/", "data": "s3://data/train.jsonl"}}))
    assert sftjob("submit", "-f", str(path), "--name", "run-s3") == 0
    capsys.readouterr()
    assert sftjob("status", "run-s3", "--json") == 0
    assert json.loads(capsys.readouterr().out)["progress_note"] == "no status.json yet"

    s3.client().put_object(Bucket=bucket, Key="runs/run-s3/status.json",
                           Body=json.dumps({"state": "training", "step": 7, "max_steps": 70}).encode())
    assert sftjob("status", "run-s3", "--json") == 0

    v = json.loads(capsys.readouterr().out)
    assert (v["output"], v["progress"]["step"], v["progress"]["percent"]) == (uri, 7, 10.0)


def test_in_a_pod_without_kubeconfig_the_service_account_and_its_namespace_are_used(tmp_path, monkeypatch):
    from kubernetes.config import incluster_config

    from job.k8s import client

    for name, text in (("token", "t0ken"), ("ca.crt", "dummy"), ("namespace", "team-ml")):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setattr(client, "SA_NAMESPACE", tmp_path / "namespace")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    kube = client.Kube()

    assert (kube.host, kube.namespace) == ("https://10.0.0.1:443", "team-ml")
    assert client.Kube("other").namespace == "other"


def test_status_finds_the_job_of_a_release_whose_chart_renamed_it(kube, out, tmp_path, capsys):
    assert sftjob("submit", "-f", values(tmp_path, out, fullnameOverride="renamed-job"), "--name", "rel") == 0
    capsys.readouterr()

    assert sftjob("status", "rel", "--json") == 0
    assert json.loads(capsys.readouterr().out)["name"] == "renamed-job"
    assert sftjob("cancel", "rel", "--checkpoint") == 0
    assert kube.get("jobs", NS, "renamed-job")["spec"]["suspend"] is True


@pytest.mark.parametrize("driver", ["", "configmap"])  # helm's default (Secrets), the manifests/rbac setup
def test_status_takes_the_output_from_the_helm_release_when_the_run_spec_configmap_is_gone(
        kube, out, tmp_path, monkeypatch, capsys, driver):
    monkeypatch.setenv("HELM_DRIVER", driver)
    assert sftjob("submit", "-f", values(tmp_path, out), "--name", "run-rel") == 0
    kube.delete("configmaps", NS, "run-rel")
    capsys.readouterr()
    start = len(kube.requests)

    assert sftjob("status", "run-rel", "--json") == 0

    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    listed = {p.split("?")[0] for m, p in kube.requests[start:] if "owner%3Dhelm" in p}
    assert listed == {f"/api/v1/namespaces/{NS}/{'configmaps' if driver else 'secrets'}"}


@pytest.mark.parametrize("text,seconds", [("6h", 21600), ("1h30m", 5400), ("90", 90), ("2d", 172800), ("0", None)])
def test_timeouts_accept_s_m_h_d_durations(text, seconds):
    from job.k8s.commands import parse_duration

    assert parse_duration(text) == seconds


def test_a_bad_timeout_is_64_before_touching_the_cluster(kube, out, tmp_path):
    assert sftjob("submit", "-f", values(tmp_path, out), "--wait", "--timeout", "6 hours") == 64
    assert kube.requests == []
