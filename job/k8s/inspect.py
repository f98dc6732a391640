"""One view of a run: the Job, its pods, events and Kueue Workload, joined with <output>/status.json.

Fetching (:func:`fetch`) and judging (:func:`summarize`, :func:`exit_code`) are separate so the
rules that decide a run's exit code read as plain functions over API objects (dicts, as the API
serves them). The Job's terminal condition decides; a pod that exited 75 or was evicted and then
replaced is an intermediate event, not the run's result.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import re
from datetime import UTC, datetime

import yaml

from job import storage
from job.errors import MEANING, ExitCode, NotFoundError, SftjobError

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
PROGRESS_FIELDS = ("state", "step", "max_steps", "epoch", "loss", "tokens_per_second", "eta_seconds",
                   "attempt", "resumed_from", "started_at", "updated_at", "error")


def _time(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None


def meaning(code: int | None) -> str:
    if code is None:
        return ""
    try:
        return MEANING[ExitCode(code)]
    except ValueError:
        return "killed (OOM or SIGKILL)" if code == 137 else "crash / OOM / NCCL (retryable)"


# ---- fetching ---------------------------------------------------------------------------------
def get_job(kube, name: str) -> dict:
    """The Job named NAME, else the one Job of release NAME (the chart's fullnameOverride renames it)."""
    try:
        return kube.call("get", "jobs.batch", kube.batch.read_namespaced_job, name, kube.namespace, name=name)
    except NotFoundError:
        found = kube.call("list", "jobs.batch", kube.batch.list_namespaced_job, kube.namespace, optional=True,
                          label_selector=f"app.kubernetes.io/instance={name}")
        if found and len(found["items"]) == 1:
            return found["items"][0]
        raise


def get_pods(kube, job: dict) -> list[dict]:
    """The Job's pods (label job-name, owner uid: a same-named older Job's pods don't count)."""
    name, uid = job["metadata"]["name"], job["metadata"].get("uid")
    items = kube.call("list", "pods", kube.core.list_namespaced_pod, kube.namespace,
                      label_selector=f"job-name={name}")["items"]
    return [p for p in items if not p["metadata"].get("ownerReferences")
            or any(r.get("uid") == uid for r in p["metadata"]["ownerReferences"])]


def get_workload(kube, job: dict) -> dict | None:
    """Kueue's Workload for the Job (label kueue.x-k8s.io/job-uid); None without Kueue or RBAC."""
    if QUEUE_LABEL not in (job["metadata"].get("labels") or {}):
        return None
    for version in KUEUE_VERSIONS:
        found = kube.call("list", "workloads.kueue.x-k8s.io", kube.custom.list_namespaced_custom_object,
                          "kueue.x-k8s.io", version, kube.namespace, "workloads", optional=True,
                          label_selector=f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}")
        if found and found.get("items"):
            wl = found["items"][0]
            wl["_version"] = version
            return wl
    return None


def get_events(kube, names: list[str]) -> list[dict]:
    out = []
    for n in names:
        got = kube.call("list", "events", kube.core.list_namespaced_event, kube.namespace, optional=True,
                        field_selector=f"involvedObject.name={n}")
        out += (got or {}).get("items", [])
    return out


def run_spec(kube, job: dict) -> dict:
    """The RunSpec the pods read: the ConfigMap mounted by the pod template (the chart writes
    run.yaml there); else the Helm release's values. Env SFTJOB_OUTPUT in the template wins."""
    pod = job["spec"]["template"]["spec"]
    spec: dict = {}
    for vol in pod.get("volumes") or []:
        if not (cm_name := (vol.get("configMap") or {}).get("name")):
            continue
        cm = kube.call("get", "configmaps", kube.core.read_namespaced_config_map, cm_name, kube.namespace,
                       optional=True) or {}
        for text in (cm.get("data") or {}).values():
            try:
                doc = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(doc, dict) and ("output" in doc or isinstance(doc.get("run"), dict)):
                spec = doc.get("run", doc) if isinstance(doc.get("run"), dict) else doc
                break
    release = (job["metadata"].get("annotations") or {}).get("meta.helm.sh/release-name")
    if not spec and release:
        spec = helm_release_values(kube, release).get("run") or {}
    for c in pod.get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == "SFTJOB_OUTPUT" and e.get("value"):
                spec = {**spec, "output": e["value"]}
    return spec


def helm_release_values(kube, release: str) -> dict:
    """Decode Helm 3's release record (base64 → gzip → JSON): chart defaults merged with user values.
    It is where the helm that submitted keeps it ($HELM_DRIVER): a Secret by default, a ConfigMap with
    HELM_DRIVER=configmap, the least-privilege setup (manifests/rbac: no Secrets readable)."""
    in_configmap = os.environ.get("HELM_DRIVER", "").lower() in ("configmap", "configmaps")
    resource, fn = (("configmaps", kube.core.list_namespaced_config_map) if in_configmap
                    else ("secrets", kube.core.list_namespaced_secret))
    got = kube.call("list", resource, fn, kube.namespace, optional=True, label_selector=f"owner=helm,name={release}")
    items = sorted((got or {}).get("items", []), key=lambda s: int(s["metadata"]["labels"].get("version", 0)))
    if not items:
        return {}
    try:
        raw = base64.b64decode(items[-1]["data"]["release"])
        raw = raw if in_configmap else base64.b64decode(raw)  # a Secret's data is base64 once more
        rel = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (KeyError, ValueError, OSError):
        return {}

    def merge(a, b):
        return {**a, **{k: merge(a[k], v) if isinstance(a.get(k), dict) and isinstance(v, dict) else v
                        for k, v in b.items()}}
    return merge(rel.get("chart", {}).get("values") or {}, rel.get("config") or {})


def read_progress(run: dict) -> tuple[dict | None, str | None]:
    """<output>/status.json with the operator's own storage credentials; a note when absent."""
    out = run.get("output")
    out = out.get("uri") if isinstance(out, dict) else out
    if not out:
        return None, "no output prefix in the run spec"
    if isinstance(run.get("storage"), dict) and storage.is_remote(out):
        from job.spec import StorageSpec

        try:
            storage.configure(StorageSpec.model_validate(run["storage"]))
        except ValueError:
            pass
    try:
        doc = json.loads(storage.read_bytes(storage.join(out, "status.json")))
        return (doc, None) if isinstance(doc, dict) else (None, "status.json unreadable: not a JSON object")
    except SftjobError as e:
        return None, "no status.json yet" if e.exit_code == ExitCode.NOT_FOUND else f"status.json unreadable: {e.message}"
    except ValueError:
        return None, "status.json is being written (not valid JSON yet)"


# ---- judging ----------------------------------------------------------------------------------
def _conditions(job: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def pod_view(p: dict) -> dict:
    st = p.get("status") or {}
    cs = (st.get("containerStatuses") or [{}])
    term = next((c["state"]["terminated"] for c in cs if (c.get("state") or {}).get("terminated", {}).get("exitCode")), None) \
        or next((c["state"]["terminated"] for c in cs if (c.get("state") or {}).get("terminated")), None)
    disruption = next((c.get("reason") or "DisruptionTarget" for c in st.get("conditions") or []
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    labels = p["metadata"].get("labels") or {}
    return {"name": p["metadata"]["name"], "rank": int(labels.get(INDEX_LABEL, 0)), "phase": st.get("phase"),
            "exit_code": term.get("exitCode") if term else None, "reason": (term or {}).get("reason"),
            "message": ((term or {}).get("message") or "").strip() or None, "evicted": disruption,
            "restarts": sum(c.get("restartCount", 0) for c in cs), "node": (p.get("spec") or {}).get("nodeName"),
            "created": p["metadata"].get("creationTimestamp"), "finished_at": (term or {}).get("finishedAt")}


def exit_code(job: dict, pods: list[dict], progress: dict | None) -> tuple[int | None, str]:
    """The run's exit code once the Job is finished (None while it isn't), and why.
    Complete → 0. Failed → the failing pod's container exit code and termination message
    (for PodFailurePolicy, the pod the condition names), cross-checked with status.json."""
    conds = _conditions(job)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        return 0, "completed"
    cond = conds.get("Failed") or conds.get("FailureTarget")
    if cond is None:
        return None, ""
    views = [pod_view(p) for p in pods]
    m = re.search(r"for pod [^/\s]+/(\S+) failed with exit code (\d+)", cond.get("message") or "")
    named = [v for v in views if m and v["name"] == m.group(1)]
    failed = sorted((v for v in views if v["exit_code"] not in (None, 0)), key=lambda v: (v["finished_at"] or "", v["created"] or ""))
    pod = (named or failed[-1:] or [None])[0]
    error = (progress or {}).get("error") or {}
    code = (pod or {}).get("exit_code") or (int(m.group(2)) if m else None) or error.get("exit_code") or 1
    message = (pod or {}).get("message") or error.get("message") or cond.get("message") or ""
    why = f"{cond.get('reason') or 'Failed'}" + (f" (pod {pod['name']})" if pod else "") + (f": {message}" if message else "")
    if error.get("exit_code") and error["exit_code"] != code:
        why += f" [status.json reports exit {error['exit_code']} ({error.get('kind')})]"
    return int(code), why


def job_state(job: dict, workload: dict | None) -> str:
    conds = _conditions(job)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        return "succeeded"
    if "Failed" in conds or "FailureTarget" in conds:
        return "failed"
    if (job.get("spec") or {}).get("suspend"):
        kueue = QUEUE_LABEL in (job["metadata"].get("labels") or {})
        return "queued" if kueue and (workload or {}).get("spec", {}).get("active", True) else "suspended"
    return "running" if (job.get("status") or {}).get("active") else "pending"


def kueue_view(job: dict, workload: dict | None) -> dict | None:
    queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
    if not queue:
        return None
    if workload is None:
        return {"queue": queue, "workload": None, "admitted": None, "active": None, "message": None}
    conds = {c["type"]: c for c in (workload.get("status") or {}).get("conditions") or []}
    admitted = (conds.get("Admitted") or {}).get("status") == "True"
    pending = next((c for t in ("Evicted", "Preempted", "QuotaReserved") if (c := conds.get(t))
                    and (c.get("status") == "True") == (t != "QuotaReserved")), None)
    return {"queue": queue, "workload": workload["metadata"]["name"], "admitted": admitted,
            "active": workload.get("spec", {}).get("active", True),
            "message": None if admitted else (pending or {}).get("message")}


def summarize(job: dict, pods: list[dict], *, workload: dict | None = None, events: list[dict] = (),
              output: str | None = None, progress: dict | None = None, note: str | None = None,
              now: datetime | None = None) -> dict:
    """The `sftjob status --json` object (shape documented in docs/ops.md)."""
    now = now or datetime.now(UTC)
    st, meta = job.get("status") or {}, job["metadata"]
    views = sorted((pod_view(p) for p in pods), key=lambda v: (v["created"] or "", v["name"]))
    finished = [v for v in views if v["exit_code"] is not None]
    code, why = exit_code(job, pods, progress)
    created = _time(meta.get("creationTimestamp"))
    prog = None
    if progress:
        prog = {k: progress.get(k) for k in PROGRESS_FIELDS}
        step, total = progress.get("step") or 0, progress.get("max_steps") or 0
        prog["percent"] = round(100.0 * step / total, 1) if total > 0 else None
    return {
        "name": meta["name"], "namespace": meta.get("namespace"), "state": job_state(job, workload),
        "exit_code": code, "reason": why or None, "meaning": meaning(code) or None,
        "job": {"suspended": bool(job["spec"].get("suspend")), "completions": job["spec"].get("completions"),
                "active": st.get("active", 0), "ready": st.get("ready", 0), "succeeded": st.get("succeeded", 0),
                "failed": st.get("failed", 0), "evictions": sum(1 for v in views if v["evicted"]),
                "restarts": sum(v["restarts"] for v in views) + max(0, len(views) - len({v["rank"] for v in views})),
                "conditions": [{k: c.get(k) for k in ("type", "reason", "message")} for c in _conditions(job).values()],
                "created": meta.get("creationTimestamp"), "start_time": st.get("startTime"),
                "completion_time": st.get("completionTime"),
                "age_seconds": int((now - created).total_seconds()) if created else None},
        "kueue": kueue_view(job, workload),
        "pods": views,
        "last_exit": max(finished, key=lambda v: (v["finished_at"] or "", v["created"] or "")) if finished else None,
        "events": [{"time": e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp"),
                    "type": e.get("type"), "reason": e.get("reason"), "message": e.get("message"),
                    "object": f"{e['involvedObject'].get('kind')}/{e['involvedObject'].get('name')}"}
                   for e in sorted(events, key=lambda e: e.get("lastTimestamp") or "")][-10:],
        "output": output,
        "progress": prog,
        "progress_note": note,
    }


def view(kube, name: str, *, run: dict | None = None, with_events: bool = True) -> tuple[dict, dict]:
    """Fetch everything and summarize; returns (view, run spec) so callers can reuse the spec."""
    job = get_job(kube, name)
    pods = get_pods(kube, job)
    workload = get_workload(kube, job)
    run = run_spec(kube, job) if run is None else run
    progress, note = read_progress(run)
    latest = {}
    for p in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        latest[pod_view(p)["rank"]] = p["metadata"]["name"]
    events = get_events(kube, [name, *latest.values()]) if with_events else []
    out = run.get("output")
    out = out.get("uri") if isinstance(out, dict) else out
    return summarize(job, pods, workload=workload, events=events, output=out, progress=progress, note=note), run
