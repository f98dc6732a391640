"""manifests/: the Argo WorkflowTemplate (hera round trip, same Job as the chart), Kueue quota, submitter RBAC."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_chart_helpers import K8S_VERSIONS, ROOT, by_kind, env_of, render, run, tool, tools_python

from job.errors import NON_RETRYABLE

MANIFESTS = ROOT / "manifests"
WFT = MANIFESTS / "argo" / "sftjob-workflowtemplate.yaml"
RBAC = MANIFESTS / "rbac" / "submitter.yaml"
KUEUE = MANIFESTS / "kueue" / "gpu-quota.yaml"

ROUND_TRIP = """
import json, sys, yaml
from hera.workflows.models import WorkflowTemplate
doc = yaml.safe_load(open(sys.argv[1]))
back = WorkflowTemplate.model_validate(doc).model_dump(by_alias=True, exclude_none=True, mode="json")
print(json.dumps({"same": back == doc, "back": back}))
"""


def wft() -> dict:
    return yaml.safe_load(WFT.read_text())


def template(name: str) -> dict:
    return next(t for t in wft()["spec"]["templates"] if t["name"] == name)


def substituted(manifest: str, params: dict[str, str]) -> dict:
    """The manifest as Argo would submit it, for sample parameter values."""
    def expr(m):
        e = m.group(1)
        if e.startswith("toJson("):
            return json.dumps(params["run-spec"])
        if e.startswith("asInt("):
            return str(int(params["grace-seconds"]) - 10)
        raise AssertionError(f"unknown expression {e}")
    text = re.sub(r"\{\{=(.*?)\}\}", expr, manifest)
    text = re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], text)
    assert "{{" not in text
    return yaml.safe_load(text)


SAMPLE = {"name": "run-42", "data": "s3://d/train.jsonl", "output": "s3://o/runs/run-42/", "model": "s3://m/base/",
          "run-spec": '{"train": {"learning_rate": 0.0001}}', "image": "ghcr.io/sftjob/sftjob:0.1.0", "nodes": "2",
          "gpus-per-node": "8", "queue-name": "sftjob", "service-account": "sftjob", "grace-seconds": "120"}


def test_workflow_template_round_trips_through_hera_models():
    p = run(tools_python(), "-c", ROUND_TRIP, str(WFT))
    out = json.loads(p.stdout)
    assert out["same"], "hera's WorkflowTemplate model dropped or changed fields"
    assert out["back"]["kind"] == "WorkflowTemplate"


def test_workflow_template_parameters_cover_every_placeholder():
    declared = {p["name"] for p in wft()["spec"]["arguments"]["parameters"]}
    used = set(re.findall(r"workflow\.parameters(?:\.([\w-]+)|\['([\w-]+)'\])", WFT.read_text()))
    used = {a or b for a, b in used}
    assert used <= declared and set(SAMPLE) == declared


@pytest.fixture(scope="module")
def argo_objects(tmp_path_factory) -> tuple[Path, list[dict]]:
    objs = [substituted(template(n)["resource"]["manifest"], SAMPLE)
            for n in ("run-spec", "rendezvous-service", "indexed-job")]
    for o in objs:
        o["metadata"]["namespace"] = "ml"
    path = tmp_path_factory.mktemp("argo") / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objs))
    return path, objs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_the_workflow_creates_validate_against_kubernetes(argo_objects, version):
    run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(argo_objects[0]), str(RBAC))


def test_workflow_job_matches_the_chart_job(argo_objects, tmp_path):
    _, objs = argo_objects
    (job,) = by_kind(objs, "Job")
    chart = by_kind(render("run-42", "--set", "nodes=2", "--set", "gpusPerNode=8",
                           "--set", "scheduling.kueue.queueName=sftjob"), "Job")[0]
    a, c = job["spec"], chart["spec"]
    assert a["podFailurePolicy"] == c["podFailurePolicy"]
    fail = next(r for r in a["podFailurePolicy"]["rules"] if r["action"] == "FailJob")
    assert fail["onExitCodes"]["values"] == sorted(int(x) for x in NON_RETRYABLE)
    for k in ("completionMode", "completions", "parallelism", "suspend", "podReplacementPolicy"):
        assert a[k] == c[k], k
    ap, cp = a["template"]["spec"], c["template"]["spec"]
    assert ap["securityContext"] | {"fsGroupChangePolicy": "OnRootMismatch"} == cp["securityContext"]
    for k in ("restartPolicy", "automountServiceAccountToken", "subdomain", "terminationGracePeriodSeconds"):
        assert ap[k] == cp[k], k
    ac, cc = ap["containers"][0], cp["containers"][0]
    assert ac["securityContext"] == cc["securityContext"]
    assert (ac["command"], ac["args"], ac["name"]) == (cc["command"], cc["args"], cc["name"])
    ae, ce = env_of(ac), env_of(cc)
    for k in ("MASTER_ADDR", "MASTER_PORT", "SFTJOB_NUM_MACHINES", "SFTJOB_GPUS_PER_NODE", "SFTJOB_GRACE_SECONDS",
              "SFTJOB_CACHE_DIR", "HOME", "TMPDIR", "HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR"):
        assert ae[k] == ce[k], k
    assert {m["mountPath"] for m in ac["volumeMounts"]} == {m["mountPath"] for m in cc["volumeMounts"]}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "sftjob"


def test_workflow_spec_configmap_and_uri_env_load_as_a_runspec(argo_objects, tmp_path):
    from job import specload

    _, objs = argo_objects
    (cm,) = by_kind(objs, "ConfigMap")
    f = tmp_path / "run.yaml"
    f.write_text(cm["data"]["run.yaml"])
    env = {k: v["value"] for k, v in env_of(by_kind(objs, "Job")[0]["spec"]["template"]["spec"]["containers"][0]).items()}
    s = specload.build(f, environ=env)
    assert (s.data.path, s.model.path, s.output.uri) == (SAMPLE["data"], SAMPLE["model"], SAMPLE["output"])
    assert s.train.learning_rate == 1e-4 and s.distributed.num_machines == 2


def test_workflow_waits_for_the_jobs_terminal_condition():
    steps = [s["template"] for group in template("train")["steps"] for s in group]
    assert steps[-1] == "wait-for-job"
    src = template("wait-for-job")["script"]["source"]
    assert "--for=condition=Complete" in src and "--for=condition=Failed" in src
    assert all(template(n)["resource"]["setOwnerReference"] for n in ("run-spec", "rendezvous-service", "indexed-job"))


def test_ci_trigger_submits_from_the_workflow_template():
    text = (MANIFESTS / "argo" / "ci-submit.sh").read_text()
    assert "argo submit" in text and "--from workflowtemplate/" + wft()["metadata"]["name"] in text
    passed = set(re.findall(r"-p ([\w-]+)=", text))
    declared = {p["name"] for p in wft()["spec"]["arguments"]["parameters"]}
    assert passed <= declared
    required = {p["name"] for p in wft()["spec"]["arguments"]["parameters"] if "value" not in p}
    assert required <= passed


def test_submitter_rbac_is_least_privilege():
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    grants = set()
    for rule in role["rules"]:
        for field in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        assert "resourceNames" not in rule or rule["resourceNames"]
        grants |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for need in [("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "configmaps", "create"),
                 ("", "services", "create"), ("", "pods", "list"), ("", "pods/log", "get")]:
        assert need in grants, need
    assert not any(r in ("secrets", "pods/exec", "roles", "rolebindings") for _, r, _ in grants)
    assert not any(v in ("escalate", "bind", "impersonate") for _, _, v in grants)
    assert "namespace" in role["metadata"] and by_kind(docs, "ClusterRole") == []
    argo_sa = wft()["spec"]["serviceAccountName"]
    assert any(s["kind"] == "ServiceAccount" and s["name"] == argo_sa for s in binding["subjects"])


def test_kueue_example_wires_local_queue_to_a_gpu_quota():
    docs = {d["kind"]: d for d in yaml.safe_load_all(KUEUE.read_text()) if d}
    assert set(docs) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    assert all(d["apiVersion"] == "kueue.x-k8s.io/v1beta1" for d in docs.values())
    assert docs["LocalQueue"]["spec"]["clusterQueue"] == docs["ClusterQueue"]["metadata"]["name"]
    default_queue = next(p["value"] for p in wft()["spec"]["arguments"]["parameters"] if p["name"] == "queue-name")
    assert docs["LocalQueue"]["metadata"]["name"] == default_queue
    (group,) = docs["ClusterQueue"]["spec"]["resourceGroups"]
    assert "nvidia.com/gpu" in group["coveredResources"]
    flavor = group["flavors"][0]
    assert flavor["name"] == docs["ResourceFlavor"]["metadata"]["name"]
    assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
