"""Operating runs on a cluster (submit/status/logs/cancel/list); filled in by the ops issue."""
from __future__ import annotations


def add_commands(sub) -> None:
    return None


def dispatch(args) -> int:
    raise SystemExit(f"unknown command {args.command}")
