"""The CLI side of operating runs on a cluster; the logic lives in job/k8s/ (see docs/ops.md)."""
from __future__ import annotations

import argparse

HELPS = {
    "submit": "install a run (helm release of charts/sftjob); --wait exits with the run's exit code",
    "status": "Job state (Kueue, pods, evictions, exit code) + training progress from status.json",
    "logs": "logs of the pod of one node rank (default 0)",
    "cancel": "uninstall the run, or --checkpoint: suspend it (SIGTERM → checkpoint → exit 75)",
    "resume": "un-suspend a run stopped with `cancel --checkpoint`; it resumes from its checkpoint",
    "list": "runs in a namespace with state, age and progress",
}


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_commands(sub) -> None:
    p = {name: sub.add_parser(name, help=h, description=h) for name, h in HELPS.items()}
    for sp in p.values():
        _cluster_flags(sp)
    s = p["submit"]
    s.add_argument("-f", "--values", dest="file", required=True,
                   help="Helm values file (RunSpec under `run:`) or a bare run spec YAML")
    s.add_argument("--name", help="release and Job name (default: the spec's name, else the file name)")
    s.add_argument("--wait", action="store_true", help="follow the run and exit with its exit code")
    s.add_argument("--timeout", default=None,
                   help="with --wait: give up after this long (90s, 30m, 6h, 1h30m) with exit 69")
    s.add_argument("--chart", default=None, help="chart path or reference (default: $SFTJOB_CHART, charts/sftjob)")
    for name in ("status", "logs", "cancel", "resume"):
        p[name].add_argument("name", help="run (release / Job) name")
    p["status"].add_argument("--watch", "-w", action="store_true", help="refresh with a progress bar until the run ends")
    p["status"].add_argument("--json", action="store_true", help="one JSON object (docs/ops.md); with --watch, one per line")
    p["logs"].add_argument("--rank", type=int, default=0, help="node rank (Job completion index)")
    p["logs"].add_argument("--follow", "-f", action="store_true", help="stream until the pod ends")
    p["logs"].add_argument("--container", default=None, help="container (default: the pod's first)")
    p["logs"].add_argument("--tail", type=int, default=None, help="only the last N lines")
    p["logs"].add_argument("--raw", action="store_true", help="the lines as the pod wrote them (JSON when not on a "
                           "terminal); default: JSON lines rendered as text")
    p["cancel"].add_argument("--checkpoint", action="store_true",
                             help="suspend instead of uninstall: pods checkpoint and exit 75; `sftjob resume` continues")
    p["list"].add_argument("--all-namespaces", "-A", action="store_true", help="every namespace")
    p["list"].add_argument("--selector", "-l", default="app.kubernetes.io/name=sftjob",
                           help="label selector for the runs' Jobs")
    p["list"].add_argument("--json", action="store_true", help="a JSON list of status objects")


def dispatch(args) -> int:
    from job.k8s import commands

    if args.command not in commands.COMMANDS:
        raise SystemExit(f"unknown command {args.command}")
    return commands.COMMANDS[args.command](args)
