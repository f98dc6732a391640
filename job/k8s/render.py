"""Human views of the status object (the --json shape is the contract; these only present it)."""
from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_text(v: dict) -> str:
    p = v.get("progress")
    if not p:
        return v.get("progress_note") or ""
    parts = [p.get("state") or "?"]
    if p.get("max_steps"):
        parts.append(f"step {p.get('step') or 0}/{p['max_steps']}" + (f" ({p['percent']}%)" if p.get("percent") is not None else ""))
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4g}")
    if p.get("tokens_per_second"):
        parts.append(f"{p['tokens_per_second']:,.0f} tok/s")
    if p.get("eta_seconds") is not None and p.get("state") == "training":
        parts.append(f"ETA {duration(p['eta_seconds'])}")
    if (p.get("attempt") or 1) > 1:
        parts.append(f"attempt {p['attempt']}" + (f", resumed from step {p['resumed_from']}" if p.get("resumed_from") else ""))
    return ", ".join(parts)


def state_text(v: dict) -> str:
    """The cluster side in a few words: queued where and why, pods, evictions, restarts."""
    j, k = v["job"], v.get("kueue")
    out = v["state"]
    if k:
        out += f" (Kueue queue {k['queue']}" + (", admitted" if k.get("admitted") else "") + \
            (f": {k['message']}" if k.get("message") else "") + ")"
    counts = [f"{j[n]} {n}" for n in ("active", "succeeded", "failed") if j.get(n)]
    counts += [f"{j[n]} {n}" for n in ("evictions", "restarts") if j.get(n)]
    return out + (f" [{', '.join(counts)}]" if counts else "")


def one_line(v: dict) -> str:
    prog = progress_text(v)
    return f"{v['name']}: {state_text(v)}" + (f" — {prog}" if prog else "")


def result_line(v: dict) -> str:
    code = v["exit_code"]
    if code == 0:
        return f"run {v['name']} succeeded (exit 0)" + (f"; output: {v['output']}" if v.get("output") else "")
    return f"run {v['name']} failed with exit {code} ({v.get('meaning')}): {v.get('reason')}"


def text(v: dict) -> str:
    j = v["job"]
    lines = [f"run        {v['name']} (namespace {v['namespace']}, age {duration(j.get('age_seconds'))})",
             f"job        {state_text(v)}"]
    if v["exit_code"] is not None:
        lines.append(f"result     exit {v['exit_code']} ({v['meaning']}): {v['reason']}")
    if (last := v.get("last_exit")) and (v["exit_code"] is None or last["exit_code"] != v["exit_code"]):
        lines.append(f"last exit  {last['name']} (rank {last['rank']}): exit {last['exit_code']}"
                     + (f", evicted ({last['evicted']})" if last.get("evicted") else "")
                     + (f": {last['message']}" if last.get("message") else ""))
    lines.append(f"progress   {progress_text(v) or '-'}")
    lines.append(f"output     {v.get('output') or '-'}")
    if (p := v.get("progress")) and p.get("error"):
        e = p["error"]
        lines.append(f"error      exit {e.get('exit_code')} ({e.get('kind')}): {e.get('message')}")
    for e in v.get("events", [])[-5:]:
        lines.append(f"event      {e['time'] or ''} {e['type']} {e['reason']} {e['object']}: {e['message']}")
    return "\n".join(lines)


def watch_view(v: dict) -> Group:
    """--watch: the status block and a progress bar (steps; a pulse while the total is unknown)."""
    p = v.get("progress") or {}
    total, step = p.get("max_steps") or 0, p.get("step") or 0
    done = v["exit_code"] == 0
    bar = ProgressBar(total=max(total, 1), completed=total if done and total else min(step, max(total, 1)),
                      width=50, pulse=not total and not done)
    pct = f"{p['percent']:5.1f}%" if p.get("percent") is not None else ""
    eta = f"ETA {duration(p.get('eta_seconds'))}" if p.get("eta_seconds") is not None and not done else ""
    line = Table.grid(padding=(0, 1))
    line.add_row(bar, Text(f"{pct} {step}/{total or '?'} steps {eta}".strip()))
    return Group(Text(text(v)), line)


def list_table(rows: list[dict]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "NAMESPACE", "STATE", "AGE", "PROGRESS", "EXIT"):
        t.add_column(col)
    for v in rows:
        t.add_row(v["name"], v["namespace"] or "", state_text(v), duration(v["job"].get("age_seconds")),
                  progress_text(v) or "-", "" if v["exit_code"] is None else str(v["exit_code"]))
    return t
