"""manifests/rbac/submitter.yaml grants every request the ops commands send, in every mode.

A mocked API server stands in for kube-apiserver, which cannot run on this machine (and so no real
RBAC evaluation either): tests/fake_kube.py serves the requests of the real clients (the pinned
helm and the official kubernetes client) and `fake_kube.attributes` turns each one into what the
apiserver's authorizer checks (verb, API group, resource[/subresource], namespace). Each ops command
(submit, submit --wait, status, logs, list, cancel --checkpoint, resume, cancel) runs once per way
the chart can make a run (one node, two nodes with their Service, Kueue, Volcano), with helm set up
the way the Role's comment says (HELM_DRIVER=configmap), and every request must be granted by the
Role. There is no TrainJob mode: sftjob does not operate TrainJobs (manifests/kubeflow is applied
with kubectl). The reverse (the Role grants only what these commands use) is not checked: the same
Role serves Argo's executor (workflowtaskresults, its resource templates) and `helm upgrade`/`kubectl`.
"""
from __future__ import annotations

import json

import pytest
import yaml
from fake_kube import FakeKube, attributes  # tests/ is on sys.path (rootdir conftest)
from test_ops import HELM, NS, REPO, complete, sftjob, values, wait_for

ROLES = REPO / "manifests" / "rbac"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MODES = {
    "one-node": {},
    "two-nodes": {"nodes": 2},  # + the headless Service for rendezvous
    "kueue": {"scheduling": {"kueue": {"queueName": "gpu"}}},
    "volcano": {"scheduling": {"volcano": {"enabled": True}}},  # + a PodGroup
}
#: needs a ClusterRole, which the namespaced submitter deliberately is not (docs/ops.md)
CLUSTER_WIDE = {("list", "batch", "jobs")}  # `sftjob list -A`


def role_rules() -> list[dict]:
    docs = [d for f in sorted(ROLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    rules = [r for d in docs if d["kind"] == "Role" and d["metadata"].get("namespace") == NS for r in d["rules"]]
    assert rules, f"no Role for namespace {NS} in {ROLES}"
    return rules


def granted(a, rules: list[dict]) -> bool:
    return any(a.group in r["apiGroups"] and a.resource in r["resources"] and a.verb in r["verbs"]
               and (not r.get("resourceNames") or a.name in r["resourceNames"]) for r in rules)


def controller(fake: FakeKube, job: dict) -> None:
    """The Job controller, kubelet and Kueue: a Workload under Kueue, a running pod per rank;
    runs named *-done complete at once."""
    meta = job["metadata"]
    if QUEUE_LABEL in (meta.get("labels") or {}):
        fake.create("workloads", {"metadata": {"name": f"job-{meta['name']}",
                                               "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]}},
                                  "spec": {"active": True},
                                  "status": {"conditions": [{"type": "Admitted", "status": "True"}]}}, NS)
        fake.update("jobs", NS, meta["name"], lambda j: j["spec"].update(suspend=False))  # admitted
    pods = [fake.run_pod(NS, meta["name"], i, log="step 1\n") for i in range(job["spec"].get("completions") or 1)]
    if meta["name"].endswith("-done"):
        for pod in pods:
            fake.finish_pod(NS, pod, 0)
        complete(fake, meta["name"])


@pytest.fixture
def kube(tmp_path, monkeypatch):
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make tools` (the RBAC test runs the pinned helm)")
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig", NS)))
        monkeypatch.setenv("SFTJOB_HELM", str(HELM))
        monkeypatch.setenv("SFTJOB_CHART", str(REPO / "charts" / "sftjob"))
        monkeypatch.setenv("SFTJOB_POLL_SECONDS", "0.05")
        monkeypatch.setenv("HELM_DRIVER", "configmap")  # as manifests/rbac/submitter.yaml says
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            monkeypatch.setenv(var, str(tmp_path / "helm" / var))
        fake.on_create("jobs", controller)
        yield fake


@pytest.mark.parametrize("mode", MODES)
def test_the_submitter_role_grants_every_request_of_every_ops_command(kube, tmp_path, capsys, mode):
    out = tmp_path / "output"
    out.mkdir()
    spec = values(tmp_path, out, **MODES[mode])
    name = f"rbac-{mode}"
    sent: list[tuple[str, object]] = []  # (command, attributes) in order

    def run(*argv: str) -> str:
        start = len(kube.requests)
        assert sftjob(*argv) == 0, f"sftjob {' '.join(argv)}: {capsys.readouterr().err}"
        cmd = "sftjob " + " ".join(argv).replace(spec, "my-run.yaml")
        sent.extend((cmd, a) for m, p in kube.requests[start:] if (a := attributes(m, p)))
        return capsys.readouterr().out

    run("submit", "-f", spec, "--name", name)
    ranks = MODES[mode].get("nodes", 1)
    wait_for(lambda: len(kube.list("pods", NS, f"job-name={name}")) == ranks)
    if mode == "kueue":
        wait_for(lambda: kube.list("workloads", NS))
    assert json.loads(run("status", name, "--json"))["state"] == "running"
    run("status", name)
    assert run("logs", name, "--rank", str(ranks - 1), "--tail", "1") == "step 1\n"
    run("list")
    run("list", "--all-namespaces")
    run("cancel", name, "--checkpoint")
    run("resume", name)
    kube.delete("configmaps", NS, name)  # the run spec then comes from the helm release's values
    from_release = json.loads(run("status", name, "--json"))["output"]
    run("cancel", name)
    run("submit", "-f", spec, "--name", f"{name}-done", "--wait", "--timeout", "1m")
    run("cancel", f"{name}-done")

    assert {a.namespace for _, a in sent} == {NS, ""}
    wide = {(a.verb, a.group, a.resource) for _, a in sent if not a.namespace}
    assert wide == CLUSTER_WIDE
    rules = role_rules()
    missing = {}
    for cmd, a in sent:
        if a.namespace and not granted(a, rules):
            missing.setdefault(f"{a.verb} {a.resource}{'.' + a.group if a.group else ''}", cmd)
    assert not missing, (f"{ROLES}/ does not grant in namespace {NS}:\n"
                         + "\n".join(f"  {what}  (sent by `{cmd}`)" for what, cmd in sorted(missing.items())))
    assert from_release == str(out)  # read from the release ConfigMap: no Secret needed
