"""Kubeflow Trainer (v2) fit: the shipped ClusterTrainingRuntime and TrainJob validate against the CRD
schemas of a released Trainer (v2.3.0, vendored under tests/crds/ with their source), the Job they
make is valid Kubernetes, and `sftjob` reads the PET_* topology the torch runtime injects.
No kube-apiserver can run here: schema validation stands in for `kubectl apply --dry-run=server`."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_chart_helpers import K8S_VERSIONS, run, tool

from job.errors import NON_RETRYABLE, ConfigError
from job.specload import build
from job.train import launch

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "tests" / "crds" / "kubeflow-trainer-v2.3.0"
KF = ROOT / "manifests" / "kubeflow"


def crd(name: str) -> dict:
    return json.loads(gzip.open(CRDS / f"{name}.schema.json.gz").read())


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the structural schema does not declare (the apiserver would prune them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None and path and not extra:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize(("manifest", "name", "kind"), [
    ("clustertrainingruntime.yaml", "clustertrainingruntimes", "ClusterTrainingRuntime"),
    ("trainjob.yaml", "trainjobs", "TrainJob"),
])
def test_manifest_validates_against_the_released_crd(manifest, name, kind):
    doc = yaml.safe_load((KF / manifest).read_text())
    c = crd(name)
    assert (doc["kind"], doc["apiVersion"]) == (kind, f"{c['group']}/{c['version']}")
    jsonschema.validate(doc, c["openAPIV3Schema"])
    assert unknown_fields(doc["spec"], c["openAPIV3Schema"]["properties"]["spec"], "spec") == []


def test_the_schema_check_catches_a_wrong_field():
    """The check above can fail: a misspelt or mistyped TrainJob field is reported."""
    doc = yaml.safe_load((KF / "trainjob.yaml").read_text())
    schema = crd("trainjobs")["openAPIV3Schema"]
    doc["spec"]["trainer"]["numNode"] = 2
    assert unknown_fields(doc["spec"], schema["properties"]["spec"], "spec") == ["spec.trainer.numNode"]
    doc["spec"]["trainer"].pop("numNode")
    doc["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


@pytest.fixture(scope="module")
def node_job(tmp_path_factory) -> tuple[Path, dict]:
    """The runtime's replicated job as the batch/v1 Job JobSet creates from it."""
    rt = yaml.safe_load((KF / "clustertrainingruntime.yaml").read_text())
    (rj,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sft-smol-es-node-0", "namespace": "ml",
                                                                  **rj["template"].get("metadata", {})},
           "spec": rj["template"]["spec"]}
    path = tmp_path_factory.mktemp("kf") / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, job


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_runtime_job_template_is_valid_kubernetes(node_job, version):
    run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(node_job[0]))


def test_runtime_never_retries_a_mistake_and_trainer_injects_into_the_node_container(node_job):
    _, job = node_job
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["values"] == sorted(int(x) for x in NON_RETRYABLE)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == fail["onExitCodes"]["containerName"] == "node"  # PET_* go to "node"
    assert container["command"] == ["sftjob", "run"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_trainjob_args_load_as_a_runspec():
    from job.cli import build_parser, spec_from_args

    tj = yaml.safe_load((KF / "trainjob.yaml").read_text())
    args = build_parser().parse_args(["run", *tj["spec"]["trainer"]["args"]])
    s = spec_from_args(args)
    assert s.model.path.startswith("s3://") and s.output.uri == "s3://runs/sft-smol-es/"
    assert s.distributed.strategy == "deepspeed" and s.resilience.save_steps == 200


def spec(**kw):
    return build(overrides=kw, environ={})


def test_pet_nnodes_and_nproc_per_node_set_the_topology():
    env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "sft-node-0-0.sft", "PET_MASTER_PORT": "29400"}
    t = launch.topology(spec(), environ=env, cuda_devices=8, bf16_ok=True)
    assert (t.num_machines, t.per_node, t.num_processes, t.machine_rank) == (2, 4, 8, 1)
    assert (t.main_process_ip, t.main_process_port) == ("sft-node-0-0.sft", 29400)
    auto = launch.topology(spec(), environ={**env, "PET_NPROC_PER_NODE": "auto"}, cuda_devices=8, bf16_ok=True)
    assert (auto.per_node, auto.num_processes) == (8, 16)


def test_the_spec_wins_over_pet_variables():
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": "m"}
    s = spec(**{"distributed.num_machines": 2, "distributed.gpus_per_node": 2})
    t = launch.topology(s, environ=env, cuda_devices=8, bf16_ok=True)
    assert (t.num_machines, t.per_node) == (2, 2)


@pytest.mark.parametrize("bad", ["1:4", "0", "two"])
def test_an_elastic_or_bad_pet_count_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="PET_NNODES"):
        launch.topology(spec(), environ={"PET_NNODES": bad, "PET_MASTER_ADDR": "m"}, cuda_devices=1, bf16_ok=True)


def test_plan_under_a_two_node_trainjob_reports_two_nodes_and_two_processes(tmp_path):
    """The acceptance line: PET_NNODES=2 PET_NPROC_PER_NODE=1 sftjob plan … --json."""
    from job import demo_data, tiny

    model = tiny.write(tmp_path / "tiny")
    data = demo_data.write_jsonl(tmp_path / "train.jsonl", n=20)
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SFTJOB_NUM", "MASTER_"))}
    env.update({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
                "SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    p = subprocess.run([sys.executable, "-m", "job", "plan", "--model", str(model), "--data", str(data),
                        "--output", str(tmp_path / "out"), "--json"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(p.stdout)
    assert (plan["nodes"], plan["processes"], plan["gpus_per_node"]) == (2, 2, 1)
