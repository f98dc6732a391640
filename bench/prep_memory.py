"""Benchmark: peak memory of `sftjob prepare` (whole processes) as the data grows.

    python bench/prep_memory.py                      # 40,000 and 160,000 rows, packing, max_length 1024
    python bench/prep_memory.py --rows 5000 20000    # smaller
    python bench/prep_memory.py --tokenizer DIR      # a real tokenizer (its own chat template)

Each size is prepared by a fresh `python -m job prepare` (cold cache) and its peak RSS read from the
kernel (wait4's ru_maxrss: the process's own high-water mark, start-up and imports included). Prints
one JSON object: per size rows, tokens, seconds, peak RSS, packing efficiency (windowed and whole-set),
and the ratio of the largest size's peak to the smallest's (issue 17 asks for ≤ 1.5 at 4× the rows).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from prep import generate

    with open(path, "w") as f:
        for r in generate(n, seed=seed):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# A child's ru_maxrss starts from its parent's RSS at fork (and keeps it through exec), so the process
# measured is started by this small wrapper, never by the benchmark itself (which holds torch, rows...).
_WRAP = ("import os, subprocess, sys\n"
         "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=open(os.environ['LOG'], 'wb'))\n"
         "_, status, usage = os.wait4(p.pid, 0)\n"
         "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def peak_rss_mb(data: Path, tok: Path, cache: Path, max_length: int, packing: bool) -> dict:
    """One whole `sftjob prepare` process: wall time and its own peak RSS from the kernel (wait4)."""
    cmd = [sys.executable, "-m", "job", "prepare", "--model", str(tok), "--data", str(data),
           "--max-length", str(max_length), *(["--packing"] if packing else [])]
    log = cache.parent / f"{cache.name}.log"
    env = {**os.environ, "SFTJOB_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "LOG": str(log)}
    t = time.perf_counter()
    rc, maxrss = subprocess.run([sys.executable, "-c", _WRAP, *cmd], env=env, cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
    dt = time.perf_counter() - t
    if rc != "0":
        raise SystemExit(f"prepare failed ({rc}):\n{log.read_text()[-3000:]}")
    report = json.loads(next(cache.glob("prepared/*/data_report.json")).read_text())
    return {"seconds": round(dt, 2), "peak_rss_mb": round(int(maxrss) / 1024), "tokens": report["tokens"]["total"],
            "examples": report["examples"]["train"], "packing_efficiency": report["packing"].get("efficiency"),
            "packing_efficiency_whole_set": report["packing"].get("efficiency_whole_set")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[40000, 160000])
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the built-in tiny one, ChatML)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--no-packing", action="store_true")
    args = ap.parse_args(argv)
    result: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tokenizer:
            tok = Path(args.tokenizer)
        else:
            from job import tiny

            tok = tiny.write(work / "tiny")
        for n in args.rows:
            data = work / f"rows-{n}.jsonl"
            write_rows(data, n)
            result["sizes"][n] = {"jsonl_mb": round(data.stat().st_size / 2**20, 1),
                                  **peak_rss_mb(data, tok, work / f"cache-{n}", args.max_length, not args.no_packing)}
            data.unlink()
    peaks = [result["sizes"][n]["peak_rss_mb"] for n in args.rows]
    result["peak_ratio_largest_vs_smallest"] = round(peaks[-1] / peaks[0], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
