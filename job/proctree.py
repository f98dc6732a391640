"""A `sftjob run`'s process tree, as the fault tests and the soak (bench/soak.py) see it from outside.

The launcher and each rank run in sessions of their own, so a process group is not the pod: the tree is
found by parentage, listed whole first, then signalled, as a node loss or a container OOM-kill does.
"""
from __future__ import annotations

import signal

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid` (none when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def ranks(pid: int) -> list[psutil.Process]:
    """The training processes (one per rank) under the `sftjob run` whose pid is given."""
    found = []
    for p in descendants(pid):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "job.train.sft" in cmd and not any("accelerate" in c for c in cmd):
            found.append(p)
    return found


def kill_tree(pid: int, timeout: float = 30) -> int:
    """SIGKILL `pid` and every descendant (listed before any dies, so none is orphaned out of reach) and
    wait for the descendants; → how many were killed. The root is not reaped here: its exit status stays
    for whoever started it (Popen.wait)."""
    try:
        tree = [psutil.Process(pid), *descendants(pid)]
    except psutil.NoSuchProcess:
        return 0
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree[1:], timeout=timeout)
    return len(tree)
