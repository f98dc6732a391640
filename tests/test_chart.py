"""charts/sftjob: lint, schema, render matrix, Kubernetes 1.29–1.35 validation, PSS, Job semantics, checkov."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_chart_helpers import (
    CHART,
    CI_VALUES,
    K8S_VERSIONS,
    ROOT,
    by_kind,
    env_of,
    helm_template,
    release_for,
    render,
    run,
    tool,
)

from job import schema, spec
from job.errors import NON_RETRYABLE

#: checkov findings we accept, with the reason (docs/kubernetes.md repeats them)
CHECKOV_SKIPS = {
    "CKV_K8S_43": "image by tag is allowed (dev clusters); image.digest is supported and used in the "
                  "production examples",
    "CKV_K8S_35": "S3 keys as env via secretKeyRef is what boto3 reads; only with s3.credentialsSecret, "
                  "IRSA/workload identity need no keys",
}


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Every charts/sftjob/ci/*-values.yaml rendered once: name → (file, objects)."""
    out = tmp_path_factory.mktemp("rendered")
    res = {}
    for f in CI_VALUES:
        name = release_for(f)
        text = helm_template(name, "-f", str(f)).stdout
        path = out / f"{name}.yaml"
        path.write_text(text)
        res[name] = (path, [d for d in yaml.safe_load_all(text) if d])
    assert {"one-1gpu", "two-8gpu-kueue", "secret-creds", "irsa", "existing-sa", "volcano"} <= set(res)
    return res


def job_of(docs):
    (job,) = by_kind(docs, "Job")
    return job


def pod_of(docs):
    return job_of(docs)["spec"]["template"]["spec"]


def trainer_of(docs):
    (c,) = pod_of(docs)["containers"]
    return c


# ---- lint, schema ---------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict_passes(values):
    args = ["-f", str(values)] if values else []
    run(tool("helm"), "lint", "--strict", str(CHART), *args)


def test_values_schema_is_what_make_schema_generates():
    want = json.dumps(schema.helm_values_schema(), indent=2) + "\n"
    have = (CHART / "values.schema.json").read_text()
    assert have == want, "charts/sftjob/values.schema.json drifted from job/spec.py: run `make schema`"


def test_values_schema_is_strict_and_self_contained():
    s = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, where):
        if isinstance(node, dict):
            if "$ref" in node:
                assert node["$ref"].startswith("#/$defs/"), f"{where}: non-local $ref {node['$ref']}"
                assert node["$ref"].split("/")[-1] in s["$defs"], f"{where}: dangling {node['$ref']}"
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{where}: not strict"
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(s, "#")
    assert s["additionalProperties"] is False
    assert set(s["properties"]["run"]["properties"]) == set(spec.RunSpec.model_fields)


@pytest.mark.parametrize("bad", ["run.learning_rat=1", "run.train.learning_rat=1", "nodez=2",
                                 "scheduling.kueue.queue=x", "run.train.learning_rate=-1",
                                 "run.distributed=mpi"])
def test_helm_rejects_values_the_schema_does_not_allow(bad):
    p = helm_template("r", "--set", bad, check=False)
    assert p.returncode != 0
    assert "values don't meet the specifications of the schema" in p.stderr, p.stderr
    assert bad.split("=")[0].split(".")[-1] in p.stderr


def test_helm_set_of_a_float_and_shorthands_render_a_spec_the_loader_accepts(tmp_path):
    docs = render("r", "--set", "run.train.learning_rate=1e-4", "--set", "run.output=s3://b/runs/r/",
                  "--set", "run.distributed=ddp", "--set-json", 'run.data={"sources": ["s3://b/a.jsonl"]}')
    f = tmp_path / "run.yaml"
    f.write_text(by_kind(docs, "ConfigMap")[0]["data"]["run.yaml"])
    s = spec.build(f, environ={})
    assert (s.train.learning_rate, s.output.uri, s.distributed.strategy) == (1e-4, "s3://b/runs/r/", "ddp")
    assert s.data_sources()[0].path == "s3://b/a.jsonl"


# ---- the run spec the pods read --------------------------------------------------------------------

def test_configmap_holds_values_run_as_the_runspec_the_cli_reads(matrix, tmp_path):
    for name, (_, docs) in matrix.items():
        values = yaml.safe_load((CHART / "ci" / f"{_file_of(name)}").read_text())
        (cm,) = by_kind(docs, "ConfigMap")
        f = tmp_path / f"{name}.yaml"
        f.write_text(cm["data"]["run.yaml"])
        direct = tmp_path / f"{name}-direct.yaml"
        direct.write_text(yaml.safe_dump({"run": values["run"]}))
        assert spec.build(f, environ={}) == spec.build(direct, environ={}), name
        mounts = {m["name"]: m for m in trainer_of(docs)["volumeMounts"]}
        assert mounts["run-spec"]["mountPath"] == "/etc/sftjob" and mounts["run-spec"]["readOnly"]
        assert trainer_of(docs)["args"] == ["run", "--config", "/etc/sftjob/run.yaml"]


def _file_of(release: str) -> str:
    return next(f.name for f in CI_VALUES if release_for(f) == release)


def test_pod_env_is_read_by_the_runspec_loader(matrix, tmp_path):
    """The env the chart sets uses RunSpec's own SFTJOB_<FLAG> names: the loader turns it into the spec."""
    path, docs = matrix["two-8gpu-kueue"]
    env = {k: v["value"] for k, v in env_of(trainer_of(docs)).items() if "value" in v}
    f = tmp_path / "run.yaml"
    f.write_text(by_kind(docs, "ConfigMap")[0]["data"]["run.yaml"])
    s = spec.build(f, environ={**env, "JOB_COMPLETION_INDEX": "1"})
    assert s.distributed.num_machines == 2
    assert s.distributed.gpus_per_node == 8
    assert s.resilience.grace_seconds == 300 - 10
    assert s.cache_dir == "/var/cache/sftjob"
    sftjob_env = [k for k in env if k.startswith("SFTJOB_")]
    known = {"SFTJOB_" + flag.replace("-", "_").upper() for flag in spec.ALL_FLAGS}
    assert set(sftjob_env) <= known, f"unknown SFTJOB_ env: {set(sftjob_env) - known}"


# ---- acceptance 3: two nodes find rank 0 -----------------------------------------------------------

def test_two_node_release_renders_indexed_job_and_headless_service_that_reach_rank_0(matrix):
    _, docs = matrix["two-8gpu-kueue"]
    job, (svc,) = job_of(docs), by_kind(docs, "Service")
    js, pod = job["spec"], pod_of(docs)
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    # pod hostname is <job name>-<index>, DNS name <hostname>.<subdomain>
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = env_of(trainer_of(docs))
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["SFTJOB_NUM_MACHINES"]["value"] == "2" and env["SFTJOB_GPUS_PER_NODE"]["value"] == "8"
    assert "JOB_COMPLETION_INDEX" not in env  # Kubernetes sets it on Indexed Job pods
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in trainer_of(docs)["ports"]}
    assert ports["rendezvous"] == 29500 and svc["spec"]["ports"][0]["targetPort"] == "rendezvous"


def test_single_node_has_no_service_or_master_addr(matrix):
    _, docs = matrix["one-1gpu"]
    assert by_kind(docs, "Service") == []
    assert "subdomain" not in pod_of(docs) and "MASTER_ADDR" not in env_of(trainer_of(docs))
    assert job_of(docs)["spec"]["completions"] == 1


def test_run_spec_machine_count_must_agree_with_nodes():
    p = helm_template("r", "--set", "nodes=2", "--set", "run.distributed.num_machines=3", check=False)
    assert p.returncode != 0 and "differs from nodes" in p.stderr


def test_names_that_cannot_be_pod_hostnames_are_refused():
    assert helm_template("r", "--set", "fullnameOverride=" + "a" * 54, check=False).returncode != 0
    assert helm_template("r" * 54, check=False).returncode != 0
    docs = render("a" * 53, "--set", "nodes=2")
    assert len(pod_of(docs)["subdomain"]) == 53
    assert helm_template("42run", check=False).returncode == 0  # no Service with one node
    p = helm_template("42run", "--set", "nodes=2", check=False)
    assert p.returncode != 0 and "must start with a letter" in p.stderr


# ---- Job semantics -------------------------------------------------------------------------------------

def test_pod_failure_policy_fails_fast_on_non_retryable_codes_and_ignores_disruptions(matrix):
    for name, (_, docs) in matrix.items():
        js = job_of(docs)["spec"]
        rules = js["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert len(fail) == 1 and fail[0]["onExitCodes"]["operator"] == "In"
        assert fail[0]["onExitCodes"]["values"] == sorted(int(c) for c in NON_RETRYABLE), name
        assert fail[0]["onExitCodes"]["containerName"] == trainer_of(docs)["name"]
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
        assert rules.index(ignore[0]) < rules.index(fail[0])
        assert js["podReplacementPolicy"] == "Failed"
        assert js["template"]["spec"]["restartPolicy"] == "Never"
        assert isinstance(js["backoffLimit"], int)


def test_grace_period_matches_run_spec_and_leaves_a_margin(matrix):
    assert yaml.safe_load((CHART / "values.yaml").read_text())["run"]["resilience"]["grace_seconds"] == \
        spec.ResilienceSpec.model_fields["grace_seconds"].default
    for name, (_, docs) in matrix.items():
        values = yaml.safe_load((CHART / "ci" / _file_of(name)).read_text())
        grace = values["run"].get("resilience", {}).get("grace_seconds", 120)
        assert pod_of(docs)["terminationGracePeriodSeconds"] == grace
        assert env_of(trainer_of(docs))["SFTJOB_GRACE_SECONDS"]["value"] == str(grace - 10)
        c = trainer_of(docs)
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["terminationMessagePath"] == "/dev/termination-log"


def test_kueue_queue_labels_the_job_and_creates_it_suspended(matrix):
    job = job_of(matrix["two-8gpu-kueue"][1])
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert job["spec"]["suspend"] is True
    other = job_of(matrix["one-1gpu"][1])
    assert other["spec"]["suspend"] is False and "kueue.x-k8s.io/queue-name" not in other["metadata"]["labels"]
    assert job["spec"]["activeDeadlineSeconds"] == 259200


def test_scheduling_knobs_reach_the_pod(matrix):
    pod = pod_of(matrix["two-8gpu-kueue"][1])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "training-high"


def test_kueue_topology_aware_scheduling_annotates_the_pod_template(matrix):
    """Kueue TAS reads the podset topology annotations from the pod template (not the Job)."""
    ann = job_of(matrix["two-8gpu-kueue"][1])["spec"]["template"]["metadata"]["annotations"]
    assert ann["kueue.x-k8s.io/podset-required-topology"] == "cloud.provider.com/topology-block"
    assert "kueue.x-k8s.io/podset-preferred-topology" not in ann
    docs = render("pref", "--set", "scheduling.kueue.queueName=q",
                  "--set", "scheduling.kueue.preferredTopology=topology.kubernetes.io/zone")
    ann = job_of(docs)["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"kueue.x-k8s.io/podset-preferred-topology": "topology.kubernetes.io/zone"}
    assert "annotations" not in job_of(matrix["one-1gpu"][1])["spec"]["template"]["metadata"]


def test_volcano_gang_schedules_all_nodes_with_a_pod_group(matrix):
    docs = matrix["volcano"][1]
    job, (pg,) = job_of(docs), by_kind(docs, "PodGroup")
    pod = job["spec"]["template"]
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == pg["metadata"]["name"]
    assert pg["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert pg["spec"]["minMember"] == job["spec"]["parallelism"] == 2
    assert pg["spec"]["minResources"] == {"nvidia.com/gpu": "8"} and pg["spec"]["queue"] == "research"
    assert job["spec"]["suspend"] is False  # no Kueue: Volcano holds the pods, not a suspended Job
    for name, (_, other) in matrix.items():
        if name != "volcano":
            assert by_kind(other, "PodGroup") == [] and "schedulerName" not in pod_of(other)


def test_pod_group_validates_against_volcanos_crd_schema(matrix):
    import jsonschema

    crd = json.loads((ROOT / "tests" / "crds" / "volcano" / "podgroups.schema.json").read_text())
    (pg,) = by_kind(matrix["volcano"][1], "PodGroup")
    assert pg["apiVersion"] == f"{crd['group']}/{crd['version']}"
    jsonschema.validate(pg, crd["openAPIV3Schema"])
    assert set(pg["spec"]) <= set(crd["openAPIV3Schema"]["properties"]["spec"]["properties"])


@pytest.mark.parametrize("bad", [
    ["--set", "scheduling.volcano.enabled=true", "--set", "scheduling.kueue.queueName=q"],
    ["--set", "scheduling.kueue.requiredTopology=block"],
    ["--set", "scheduling.kueue.queueName=q", "--set", "scheduling.kueue.requiredTopology=a",
     "--set", "scheduling.kueue.preferredTopology=b"],
])
def test_contradictory_scheduling_values_are_refused(bad):
    p = helm_template("bad", *bad, "--set", "run.output.uri=s3://b/r/", check=False)
    assert p.returncode != 0 and "scheduling" in p.stderr


# ---- resources, volumes -------------------------------------------------------------------------------

def test_gpu_limits_shm_and_cache_volumes(matrix):
    _, docs = matrix["two-8gpu-kueue"]
    res = trainer_of(docs)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 8 and res["requests"]["nvidia.com/gpu"] == 8
    vols = {v["name"]: v for v in pod_of(docs)["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    assert vols["cache"]["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "2Ti"
    mounts = {m["mountPath"]: m["name"] for m in trainer_of(docs)["volumeMounts"]}
    assert mounts["/dev/shm"] == "dshm" and mounts["/var/cache/sftjob"] == "cache"
    cpu = trainer_of(matrix["secret-creds"][1])["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "SFTJOB_GPUS_PER_NODE" not in env_of(trainer_of(matrix["secret-creds"][1]))
    pvc = {v["name"]: v for v in pod_of(matrix["irsa"][1])["volumes"]}["cache"]
    assert pvc["persistentVolumeClaim"]["claimName"] == "sftjob-model-cache"
    default = {v["name"]: v for v in pod_of(matrix["one-1gpu"][1])["volumes"]}
    assert default["dshm"]["emptyDir"]["medium"] == "Memory" and "emptyDir" in default["cache"]


def test_every_writable_path_is_a_mounted_volume_under_a_read_only_root(matrix):
    for name, (_, docs) in matrix.items():
        c = trainer_of(docs)
        env = {k: v.get("value") for k, v in env_of(c).items()}
        mounts = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
        for var in ("HOME", "TMPDIR", "HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR",
                    "XDG_CACHE_HOME", "SFTJOB_CACHE_DIR"):
            assert any(env[var] == m or env[var].startswith(m + "/") for m in mounts), f"{name}: {var}"


# ---- security -----------------------------------------------------------------------------------------

def test_pods_meet_the_restricted_pod_security_standard(matrix):
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["uid"]
    for name, (_, docs) in matrix.items():
        pod = pod_of(docs)
        psc, csc = pod["securityContext"], trainer_of(docs)["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid and uid > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["readOnlyRootFilesystem"] is True and csc["runAsNonRoot"] is True
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        allowed = {"configMap", "emptyDir", "ephemeral", "persistentVolumeClaim", "secret", "projected"}
        for v in pod["volumes"]:
            assert set(v) - {"name"} <= allowed, f"{name}: volume {v}"
        for sa in by_kind(docs, "ServiceAccount"):
            assert sa["automountServiceAccountToken"] is False
        for d in docs:
            assert d["metadata"]["namespace"] == "ml"


def test_s3_keys_only_by_secret_reference(matrix):
    for name, (_, docs) in matrix.items():
        assert by_kind(docs, "Secret") == []
        for k, e in env_of(trainer_of(docs)).items():
            if k.startswith("AWS_") and ("KEY" in k or "TOKEN" in k):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{name}: {k}"
    env = env_of(trainer_of(matrix["secret-creds"][1]))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "access-key"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "secret-key"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert trainer_of(matrix["secret-creds"][1])["envFrom"] == [{"secretRef": {"name": "hf-token"}}]


def test_mlflow_settings_reach_the_pod_and_its_credentials_only_by_optional_secret_reference(matrix):
    env = env_of(trainer_of(matrix["secret-creds"][1]))
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow.svc:5000"
    assert env["MLFLOW_EXPERIMENT_NAME"]["value"] == "smoke"
    refs = {k: env[k]["valueFrom"]["secretKeyRef"] for k in
            ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    assert refs == {"MLFLOW_TRACKING_TOKEN": {"name": "mlflow-auth", "key": "token", "optional": True},
                    "MLFLOW_TRACKING_USERNAME": {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_USERNAME", "optional": True},
                    "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-auth", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}}
    assert not [k for k in env_of(trainer_of(matrix["one-1gpu"][1])) if k.startswith("MLFLOW_")]  # defaults: none


def test_irsa_annotation_and_existing_service_account(matrix):
    _, docs = matrix["irsa"]
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/sftjob-runner"}
    assert pod_of(docs)["serviceAccountName"] == sa["metadata"]["name"]
    assert not any(k.startswith("AWS_ACCESS") for k in env_of(trainer_of(docs)))
    _, docs = matrix["existing-sa"]
    assert by_kind(docs, "ServiceAccount") == [] and pod_of(docs)["serviceAccountName"] == "sftjob-runner"
    p = helm_template("r", "--set", "serviceAccount.create=false", check=False)
    assert p.returncode != 0 and "serviceAccount.name is required" in p.stderr


def test_network_policy_admits_only_pods_of_the_release(matrix):
    _, docs = matrix["two-8gpu-kueue"]
    (np,) = by_kind(docs, "NetworkPolicy")
    labels = job_of(docs)["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert np["spec"]["ingress"] == [{"from": [{"podSelector": np["spec"]["podSelector"]}]}]
    assert by_kind(render("r", "--set", "networkPolicy.enabled=false"), "NetworkPolicy") == []


def test_notes_tell_how_to_follow_logs_and_where_outputs_land(tmp_path):
    chart = tmp_path / "sftjob"
    shutil.copytree(CHART, chart)
    # `helm template` skips NOTES.txt and `helm install --dry-run` needs a cluster: render it via tpl.
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    out = run(tool("helm"), "template", "run-42", str(chart), "-n", "ml", "-f", str(CHART / "ci" / "1node-1gpu-values.yaml"),
              "--show-only", "templates/notes.yaml").stdout
    notes = yaml.safe_load(out)["notes"]
    assert "kubectl -n ml logs -f -l job-name=run-42,batch.kubernetes.io/job-completion-index=0" in notes
    assert "s3://runs/support-lora/status.json" in notes
    assert "helm -n ml uninstall run-42" in notes
    assert "sftjob status run-42 --namespace ml --watch" in notes
    assert "sftjob logs run-42 --namespace ml --follow" in notes


def test_chart_readme_is_what_make_schema_generates():
    """charts/sftjob/README.md drifts the moment a value or its help changes; `make schema` regenerates it."""
    readme = (CHART / "README.md").read_text()
    assert readme == schema.chart_readme(), "charts/sftjob/README.md is stale: run `make schema`"
    chart_keys = json.loads((ROOT / "job" / "chart_values.schema.json").read_text())["properties"]
    for key in ("nodes", "gpusPerNode", "image.digest", "scheduling.volcano.enabled", "scheduling.kueue.requiredTopology"):
        assert f"| `{key}` |" in readme, key
    assert set(chart_keys) - {"global"} <= {ln.split("`")[1].split(".")[0] for ln in readme.splitlines()
                                           if ln.startswith("| `")}


def test_values_comments_are_read_per_nested_key():
    text = "a:\n  # -- first\n  # more\n  b: 1\n# -- top\nc: {}\n"
    assert schema._values_comments(text) == {"a.b": "first more", "c": "top"}


# ---- validators over the whole matrix -------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_matrix_validates_strictly_against_kubernetes(matrix, version):
    files = [str(p) for p, _ in matrix.values()]
    run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files)


def test_strict_validation_catches_an_unknown_field(matrix, tmp_path):
    path, _ = matrix["two-8gpu-kueue"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("publishNotReadyAddresses", "publishNotReadyAdresses"))
    p = run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0], str(bad), check=False)
    assert p.returncode != 0 and "publishNotReadyAdresses" in p.stdout + p.stderr


def test_checkov_finds_nothing_beyond_documented_skips(matrix):
    directory = next(iter(matrix.values()))[0].parent
    p = run(tool("checkov"), "--skip-download", "--framework", "kubernetes", "-d", str(directory),
            "--skip-check", ",".join(CHECKOV_SKIPS), "-o", "json", check=False)
    report = json.loads(p.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert failed == [], failed
    assert passed > 100, "checkov scanned nothing"
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for check_id in CHECKOV_SKIPS:
        assert re.search(rf"\b{check_id}\b", docs), f"{check_id} skip is not documented in docs/kubernetes.md"
