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
    INPUTS,
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

from job import schema, spec, specload
from job.errors import NON_RETRYABLE, ConfigError

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
        text = helm_template(name, "-f", str(f), inputs=False).stdout
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

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults+inputs")
def test_helm_lint_strict_passes(values):
    """The chart's defaults have no model, data or output (there is no sensible default): with them given, and
    with every ci/ values file, `helm lint --strict` passes."""
    args = ["-f", str(values)] if values else ["-f", "-"]
    run(tool("helm"), "lint", "--strict", str(CHART), *args, input=None if values else yaml.safe_dump(INPUTS))


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
                  "--set", "run.distributed=ddp", "--set-json", 'run.data={"sources": ["s3://b/a.jsonl"]}',
                  "--set", "run.model=s3://b/models/m/", inputs=False)
    f = tmp_path / "run.yaml"
    f.write_text(by_kind(docs, "ConfigMap")[0]["data"]["run.yaml"])
    s = specload.build(f, environ={})
    assert (s.train.learning_rate, s.output.uri, s.distributed.strategy) == (1e-4, "s3://b/runs/r/", "ddp")
    assert s.data_sources()[0].path == "s3://b/a.jsonl"


# ---- what the run spec (or the run) refuses, the chart refuses --------------------------------------------

SCHEMA_ERROR = "values don't meet the specifications of the schema"


def _template_with(tmp_path, run_values: dict, *args: str):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"run": run_values}))
    return helm_template("r", "-f", str(f), *args, check=False, inputs=False)


@pytest.mark.parametrize("steps", [0, -2])
def test_helm_refuses_max_steps_the_run_spec_refuses(steps):
    """The spec's validator takes -1 (epochs) or a positive count; the schema says the same, from the field."""
    with pytest.raises(ConfigError, match="train.max_steps"):
        specload.build(overrides={"train.max_steps": steps}, environ={})
    p = helm_template("r", "--set", f"run.train.max_steps={steps}", check=False)
    assert p.returncode != 0 and SCHEMA_ERROR in p.stderr and "max_steps" in p.stderr, p.stderr
    lint = run(tool("helm"), "lint", str(CHART), "-f", "-", "--set", f"run.train.max_steps={steps}",
               input=yaml.safe_dump(INPUTS), check=False)
    assert lint.returncode != 0 and "max_steps" in lint.stdout + lint.stderr


@pytest.mark.parametrize("steps", [-1, 1, 500])
def test_helm_takes_max_steps_the_run_spec_takes(steps):
    cm = by_kind(render("r", "--set", f"run.train.max_steps={steps}"), "ConfigMap")[0]
    assert json.loads(cm["data"]["run.yaml"])["train"]["max_steps"] == steps


MISSING_INPUTS = {  # id → (run values, the key helm names)
    "no-model": ({"data": "s3://d/train.jsonl", "output": "s3://o/r/"}, "model"),
    "no-output": ({"model": "s3://m/", "data": "s3://d/train.jsonl"}, "output"),
    "no-data": ({"model": "s3://m/", "output": "s3://o/r/"}, "data"),
    "model-without-path": ({"model": {"chat_template": "chatml"}, "data": "s3://d/x.jsonl", "output": "s3://o/r/"},
                           "path"),
    "output-without-uri": ({"model": "s3://m/", "data": "s3://d/x.jsonl", "output": {"overwrite": True}}, "uri"),
    "empty-output": ({"model": "s3://m/", "data": "s3://d/x.jsonl", "output": ""}, "output"),
    "data-without-path-or-sources": ({"model": "s3://m/", "data": {"format": "messages"}, "output": "s3://o/r/"},
                                     "sources"),
    "data-with-no-sources": ({"model": "s3://m/", "data": {"sources": []}, "output": "s3://o/r/"}, "sources"),
    "data-path-and-sources": ({"model": "s3://m/", "data": {"path": "s3://d/x.jsonl", "sources": ["s3://d/y.jsonl"]},
                               "output": "s3://o/r/"}, "data"),
}


@pytest.mark.parametrize("case", MISSING_INPUTS)
def test_helm_refuses_a_run_without_model_output_or_data(case, tmp_path):
    """`sftjob run` needs model.path, output.uri and data (path or sources): without them the pod would exit 64 after
    scheduling; the chart refuses them at `helm template`/`install`, naming the key."""
    values, key = MISSING_INPUTS[case]
    p = _template_with(tmp_path, values)
    assert p.returncode != 0 and SCHEMA_ERROR in p.stderr, p.stderr
    assert re.search(rf"\b{key}\b", p.stderr), p.stderr


@pytest.mark.parametrize("values", [
    {"model": "s3://m/", "data": "s3://d/x.jsonl", "output": "s3://o/r/"},
    {"model": {"path": "s3://m/"}, "data": {"path": "s3://d/x.jsonl"}, "output": {"uri": "s3://o/r/"}},
    {"model": {"path": "s3://m/"}, "data": {"sources": ["s3://d/x.jsonl", {"path": "s3://d/y.jsonl", "weight": 2}]},
     "output": {"uri": "s3://o/r/", "overwrite": True}},
    {"model": "s3://m/", "data": {"path": "s3://d/x.jsonl", "sources": []}, "output": "s3://o/r/"},
], ids=["shorthands", "mappings", "sources", "path-and-no-sources"])
def test_helm_takes_model_output_and_data_in_every_form_the_loader_takes(values, tmp_path):
    p = _template_with(tmp_path, values)
    assert p.returncode == 0, p.stderr
    f = tmp_path / "run.yaml"
    f.write_text(by_kind([d for d in yaml.safe_load_all(p.stdout) if d], "ConfigMap")[0]["data"]["run.yaml"])
    s = specload.build(f, environ={})
    assert s.model.path == "s3://m/" and s.output.uri == "s3://o/r/" and s.data_sources()


def test_chart_defaults_alone_are_refused_naming_the_run_inputs():
    """The chart ships no model/data/output (a placeholder would only fail later, in the pod)."""
    for p in (helm_template("r", check=False, inputs=False),
              run(tool("helm"), "lint", str(CHART), check=False)):
        out = p.stdout + p.stderr
        assert p.returncode != 0 and SCHEMA_ERROR in out, out
        assert all(re.search(rf"\b{k}\b", out) for k in ("model", "data", "output")), out


def test_run_inputs_the_schema_requires_are_those_the_run_requires(tmp_path, monkeypatch):
    """job/schema.py RUN_INPUTS against the pipeline's own check: each one missing stops `run` with exit 64."""
    from job import pipeline, storage

    monkeypatch.setattr(storage.config, "current", storage.config.current)  # run() configures the store: undone after

    full = {"model": {"path": str(tmp_path / "m")}, "data": {"path": str(tmp_path / "d.jsonl")},
            "output": {"uri": str(tmp_path / "out")}}
    assert {k.split(".")[0] for k in schema.RUN_INPUTS} == set(full)
    for key in schema.RUN_INPUTS:
        section, leaf = key.split(".")
        tree = {**full, section: {}}
        with pytest.raises(ConfigError, match=f"missing required setting '{section}.{leaf}'"):
            pipeline.run(specload.build(tree=tree, environ={}))


@pytest.mark.parametrize("bad", ["run.train.learning_rate=-1.0", "run.train.learning_rate=0.0",
                                 "run.train.weight_decay=-0.5", "run.data.prepare_timeout=0.0"])
def test_helm_set_of_a_float_string_keeps_the_lower_bound(bad):
    """`--set` passes 1e-4 as a string (numbers only as ints): the numeric-string form keeps a bound at 0."""
    p = helm_template("r", "--set", bad, check=False)
    assert p.returncode != 0 and SCHEMA_ERROR in p.stderr, p.stderr
    assert bad.split("=")[0].split(".")[-1] in p.stderr


def test_helm_set_of_float_strings_within_bounds_is_taken():
    cm = by_kind(render("r", "--set", "run.train.learning_rate=2.5e-5", "--set", "run.train.weight_decay=0.0",
                        "--set", "run.train.warmup_ratio=.1"), "ConfigMap")[0]
    train = json.loads(cm["data"]["run.yaml"])["train"]
    assert (train["learning_rate"], train["weight_decay"], train["warmup_ratio"]) == ("2.5e-5", "0.0", ".1")


# ---- the grace period: room for the trainer to save before SIGKILL --------------------------------------------

def test_run_spec_refuses_a_grace_period_that_leaves_no_time_to_save():
    """5 s passed; the trainer keeps the last SIGTERM_RESERVE_SECONDS for teardown and waits for the checkpoint upload
    only in what is left before it, so a shorter grace period saved nothing before SIGKILL."""
    from job.train import sft

    with pytest.raises(ConfigError, match=r"resilience.grace_seconds.*at least \d+") as e:
        specload.build(overrides={"resilience.grace_seconds": 5}, environ={})
    low = spec.ResilienceSpec.MIN_GRACE_SECONDS
    assert low > sft.SIGTERM_RESERVE_SECONDS, "the minimum must leave the ranks time to save after the reserve"
    assert f"at least {low}" in str(e.value) and "SIGKILL" in str(e.value) and f"to {low} or more" in str(e.value)
    with pytest.raises(ConfigError, match=f"at least {low}"):
        specload.build(overrides={"resilience.grace_seconds": low - 1}, environ={"SFTJOB_MAX_STEPS": "3"})
    with pytest.raises(ConfigError, match="from SFTJOB_GRACE_SECONDS"):
        specload.build(environ={"SFTJOB_GRACE_SECONDS": str(low - 1)})
    assert specload.build(overrides={"resilience.grace_seconds": low}, environ={}).resilience.grace_seconds == low


@pytest.mark.parametrize("grace", [5, 29])
def test_helm_refuses_a_grace_period_under_the_run_spec_minimum(grace):
    for p in (helm_template("r", "--set", f"run.resilience.grace_seconds={grace}", check=False),
              run(tool("helm"), "lint", str(CHART), "-f", "-", "--set", f"run.resilience.grace_seconds={grace}",
                  input=yaml.safe_dump(INPUTS), check=False)):
        out = p.stdout + p.stderr
        assert p.returncode != 0 and SCHEMA_ERROR in out and "grace_seconds" in out, out
    assert grace < spec.ResilienceSpec.MIN_GRACE_SECONDS


def test_helm_refuses_a_grace_period_whose_margin_leaves_the_trainer_under_the_minimum(tmp_path):
    """The pod gets grace_seconds, the trainer grace_seconds - job.graceMarginSeconds (SFTJOB_GRACE_SECONDS): that
    too must meet the spec's minimum, or the pod would start and exit 64 at load."""
    low = spec.ResilienceSpec.MIN_GRACE_SECONDS
    p = helm_template("r", "--set", f"run.resilience.grace_seconds={low + 9}", check=False)
    assert p.returncode != 0, p.stdout
    assert f"run.resilience.grace_seconds ({low + 9}) - job.graceMarginSeconds (10)" in p.stderr, p.stderr
    assert f"at least {low}" in p.stderr and f"fix: set run.resilience.grace_seconds to at least {low + 10}" in p.stderr
    for grace, margin in ((low + 10, 10), (low, 0)):
        docs = render("r", "--set", f"run.resilience.grace_seconds={grace}", "--set", f"job.graceMarginSeconds={margin}")
        (job,) = by_kind(docs, "Job")
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
        env = {k: v["value"] for k, v in env_of(c).items() if "value" in v}
        f = tmp_path / "run.yaml"
        f.write_text(by_kind(docs, "ConfigMap")[0]["data"]["run.yaml"])
        assert specload.build(f, environ={k: v for k, v in env.items() if k.startswith("SFTJOB_")}).resilience.grace_seconds \
            == grace - margin == low


# ---- the run spec the pods read --------------------------------------------------------------------

def test_configmap_holds_values_run_as_the_runspec_the_cli_reads(matrix, tmp_path):
    for name, (_, docs) in matrix.items():
        values = yaml.safe_load((CHART / "ci" / f"{_file_of(name)}").read_text())
        (cm,) = by_kind(docs, "ConfigMap")
        f = tmp_path / f"{name}.yaml"
        f.write_text(cm["data"]["run.yaml"])
        direct = tmp_path / f"{name}-direct.yaml"
        direct.write_text(yaml.safe_dump({"run": values["run"]}))
        assert specload.build(f, environ={}) == specload.build(direct, environ={}), name
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
    s = specload.build(f, environ={**env, "JOB_COMPLETION_INDEX": "1"})
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
