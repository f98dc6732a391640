"""submit | status | logs | cancel | resume | list: each a short function over client, helm, inspect.

`submit --wait` exits with the run's own exit code, so a CI step fails exactly when the run fails.
Waiting is polling (every $SFTJOB_POLL_SECONDS, default 5 s): a GET of the Job and a LIST of its pods
per round is cheap, needs only get/list RBAC, and survives apiserver restarts that break watches.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import UTC, datetime

from rich.console import Console
from rich.live import Live

from job.errors import ConfigError, NotFoundError, UnavailableError
from job.k8s import helm, inspect, render
from job.k8s.client import Kube


def poll_seconds() -> float:
    return float(os.environ.get("SFTJOB_POLL_SECONDS") or 5)


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '30m', '6h', '1h30m', '2d' → seconds; None/'0' → no limit."""
    if not text or text.strip() in ("0", "none"):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ConfigError(f"invalid duration {text!r}", hint="use e.g. 90s, 30m, 6h or 1h30m")
    return sum(float(n) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait(kube: Kube, name: str, timeout: float | None) -> int:
    """Follow a run to its end; return its exit code. Kueue queueing, suspension and pod
    replacements (75, evictions) are waited through: only the Job's terminal condition ends it."""
    deadline = time.monotonic() + timeout if timeout else None
    run, last = None, None
    while True:
        try:
            v, run = inspect.view(kube, name, run=run, with_events=False)
        except NotFoundError:
            raise NotFoundError(f'run "{name}" disappeared while waiting (uninstalled?)',
                                hint="see `helm history` / `sftjob list`") from None
        line = render.one_line(v)
        if line != last:
            _say(line)
            last = line
        if v["exit_code"] is not None:
            _say(render.result_line(v))
            return int(v["exit_code"])
        if deadline and time.monotonic() > deadline:
            raise UnavailableError(
                f"timed out after {render.duration(timeout)} waiting for run {name} (still {v['state']}); "
                "the run itself goes on", hint=f"check it with `sftjob status {name} --watch`, "
                                               "or raise --timeout")
        time.sleep(poll_seconds())


def submit(args) -> int:
    values = helm.load_values(args.file)  # exit 64 here, before the cluster is touched
    name = helm.release_name(args.name, values, args.file)
    timeout = parse_duration(args.timeout)
    kube = Kube(args.namespace, context=args.context)
    helm.install(name, values, kube.namespace, chart=args.chart, context=args.context)
    _say(f"submitted {name} (helm release and Job) in namespace {kube.namespace}; "
         f"output: {helm.output_uri(values['run']) or '-'}")
    if not args.wait:
        _say(f"follow it: sftjob status {name} --watch   (logs: sftjob logs {name} --follow)")
        print(name)  # stdout: the name alone, for NAME=$(sftjob submit -f ...)
        return 0
    return wait(kube, name, timeout)


def status(args) -> int:
    kube = Kube(args.namespace, context=args.context)
    v, run = inspect.view(kube, args.name)
    if not args.watch:
        print(json.dumps(v, indent=2) if args.json else render.text(v))
        return 0
    if args.json:  # one object per line per refresh, until the run ends
        while True:
            print(json.dumps(v), flush=True)
            if v["exit_code"] is not None:
                return 0
            time.sleep(poll_seconds())
            v, run = inspect.view(kube, args.name, run=run)
    with Live(render.watch_view(v), console=Console(), refresh_per_second=2) as live:
        while v["exit_code"] is None:
            time.sleep(poll_seconds())
            v, run = inspect.view(kube, args.name, run=run)
            live.update(render.watch_view(v))
    return 0


def logs(args) -> int:
    kube = Kube(args.namespace, context=args.context)
    job = inspect.get_job(kube, args.name)
    pods = [p for p in inspect.get_pods(kube, job) if inspect.pod_view(p)["rank"] == args.rank]
    if not pods:
        state = inspect.job_state(job, inspect.get_workload(kube, job))
        raise NotFoundError(f"run {args.name} has no pod for rank {args.rank} (job {state})",
                            hint=f"ranks are 0..{(job['spec'].get('completions') or 1) - 1}; "
                                 f"see `sftjob status {args.name}`")
    pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    if (pod.get("status") or {}).get("phase") == "Pending":
        raise UnavailableError(f"pod {pod['metadata']['name']} is still Pending: no logs yet",
                               hint=f"sftjob status {args.name}")
    container = args.container or pod["spec"]["containers"][0]["name"]
    kwargs = {"container": container, "follow": args.follow}
    if args.tail is not None:
        kwargs["tail_lines"] = args.tail
    resp = kube.call("get", "pods/log", kube.core.read_namespaced_pod_log, pod["metadata"]["name"],
                     kube.namespace, stream=True, **kwargs)
    out = sys.stdout.buffer
    if getattr(args, "raw", False):
        for chunk in resp.stream(4096, decode_content=True):
            out.write(chunk)
            out.flush()
        return 0
    from job.logsetup import as_text

    pending = b""
    for chunk in resp.stream(4096, decode_content=True):  # whole lines only: a JSON object may span chunks
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            out.write(as_text(line.decode("utf-8", "replace")).encode() + b"\n")
        out.flush()
    if pending:
        out.write(as_text(pending.decode("utf-8", "replace")).encode())
        out.flush()
    return 0


def _set_suspended(kube: Kube, name: str, suspend: bool) -> str:
    """Suspend/resume. Under Kueue the Workload's spec.active is the switch: Kueue would
    un-suspend a Job suspended behind its back, and re-queues the Workload when reactivated."""
    job = inspect.get_job(kube, name)
    name = job["metadata"]["name"]
    wl = inspect.get_workload(kube, job)
    patch = {"_content_type": "application/merge-patch+json", "_request_timeout": (10, 60)}
    if wl is not None:
        kube.call("patch", "workloads.kueue.x-k8s.io", kube.custom.patch_namespaced_custom_object,
                  "kueue.x-k8s.io", wl["_version"], kube.namespace, "workloads", wl["metadata"]["name"],
                  {"spec": {"active": not suspend}}, name=wl["metadata"]["name"], **patch)
        return f"Kueue Workload {wl['metadata']['name']} {'deactivated' if suspend else 'reactivated'}"
    kube.call("patch", "jobs.batch", kube.batch.patch_namespaced_job, name, kube.namespace,
              {"spec": {"suspend": suspend}}, name=name, **patch)
    return f"Job {name} {'suspended' if suspend else 'resumed'}"


def cancel(args) -> int:
    kube = Kube(args.namespace, context=args.context)
    if args.checkpoint:
        what = _set_suspended(kube, args.name, True)
        _say(f"{what}: its pods get SIGTERM, save a checkpoint and exit 75 within the grace period.\n"
             f"resume: sftjob resume {args.name}   (the release and output stay)")
        return 0
    helm.uninstall(args.name, kube.namespace, context=args.context)
    _say(f"uninstalled {args.name}: Job and pods deleted (pods get SIGTERM); the output prefix is kept")
    return 0


def resume(args) -> int:
    kube = Kube(args.namespace, context=args.context)
    _say(_set_suspended(kube, args.name, False) + "; it resumes from its newest complete checkpoint")
    return 0


def list_runs(args) -> int:
    kube = Kube(args.namespace, context=args.context)
    if args.all_namespaces:
        jobs = kube.call("list", "jobs.batch", kube.batch.list_job_for_all_namespaces, label_selector=args.selector)
    else:
        jobs = kube.call("list", "jobs.batch", kube.batch.list_namespaced_job, kube.namespace,
                         label_selector=args.selector)
    rows = []
    for job in jobs["items"]:
        kube.namespace = job["metadata"]["namespace"]
        pods = inspect.get_pods(kube, job)
        run = inspect.run_spec(kube, job)
        progress, note = inspect.read_progress(run)
        out = run.get("output")
        rows.append(inspect.summarize(job, pods, workload=inspect.get_workload(kube, job),
                                      output=out.get("uri") if isinstance(out, dict) else out,
                                      progress=progress, note=note, now=datetime.now(UTC)))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        _say(f"no runs (jobs with {args.selector}) in " + ("any namespace" if args.all_namespaces
                                                          else f"namespace {kube.namespace}"))
    else:
        Console(width=200).print(render.list_table(rows))
    return 0


COMMANDS = {"submit": submit, "status": status, "logs": logs, "cancel": cancel, "resume": resume,
            "list": list_runs}
