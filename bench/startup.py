"""Start-up cost of a run, as whole processes: `sftjob --help`, `sftjob validate`, and a 2-step tiny `sftjob run`
(offline: the tiny model of job/tiny.py, demo chat rows) against a plain TRL script doing the same 2 steps.

For each run: wall time, time from the command's start to its first optimizer step, the time of the steps
themselves (from the progress lines' clock), and the overhead (wall - steps). Prints a table (stderr) and
one JSON object (stdout) with the ratio of our overhead to the baseline's. Usage: python bench/startup.py [--repeat N]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = r"""
import json, sys, time
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model, data, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(data)][:64]
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print(json.dumps({"event": "progress", "step": state.global_step, "time": time.time()}), flush=True)
args = SFTConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
                 bf16=False, report_to="none", max_length=256, save_strategy="no", disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), callbacks=[Clock()])
trainer.train()
trainer.save_model(out)
"""


def timed(cmd: list[str], env: dict) -> dict:
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    steps = [json.loads(x) for x in p.stdout.splitlines() if x.startswith('{"event": "progress"')]
    out = {"wall": wall}
    if steps:
        first, last = steps[0]["time"], steps[-1]["time"]
        per_step = (last - first) / max(1, len(steps) - 1)
        out.update(first_step=first - t0, steps=per_step * len(steps))
        out["overhead"] = wall - out["steps"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="rounds (best of each is kept)")
    a = ap.parse_args()
    from job import demo_data, tiny

    work = Path(tempfile.mkdtemp(prefix="sftjob-bench-startup-"))
    model = tiny.write(work / "tiny-model")
    data = demo_data.write_jsonl(work / "chat.jsonl", n=200)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SFTJOB_CACHE_DIR": str(work / "cache"),
           "SFTJOB_PROGRESS": "0", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    py = sys.executable
    cases = {
        "sftjob --help": lambda i: [py, "-m", "job", "--help"],
        "sftjob validate": lambda i: [py, "-m", "job", "validate", "--model", str(model), "--data", str(data),
                                      "--output", str(work / f"v{i}")],
        "sftjob run (2 steps)": lambda i: [py, "-m", "job", "run", "--model", str(model), "--data", str(data),
                                           "--output", str(work / f"o{i}"), "--max-steps", "2", "--logging-steps", "1",
                                           "--max-length", "256", "--log-format", "json"],
        "TRL script (2 steps)": lambda i: [py, "-c", BASELINE, str(model), str(data), str(work / f"b{i}")],
    }
    best: dict[str, dict] = {}
    for i in range(a.repeat):  # interleaved rounds: a busy moment hits every case alike
        for name, cmd in cases.items():
            r = timed(cmd(i), env)
            best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in r.items()}
    say = lambda *x: print(*x, file=sys.stderr)  # noqa: E731 - the table for people; stdout has the JSON
    say(f"{'':24} {'wall s':>8} {'1st step s':>11} {'steps s':>8} {'overhead s':>11}")
    for name, r in best.items():
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("wall", "first_step", "steps", "overhead")]
        say(f"{name:24} {cells[0]:>8} {cells[1]:>11} {cells[2]:>8} {cells[3]:>11}")
    ours, base = best["sftjob run (2 steps)"], best["TRL script (2 steps)"]
    ratio = ours["overhead"] / base["overhead"]
    say(f"overhead ratio ours/TRL: {ratio:.2f}x (ours {ours['overhead']:.2f} s: fetch, prepare, launch, verify, "
        f"publish; best of {a.repeat})")
    print(json.dumps({"bench": "startup", "repeat": a.repeat, "cases": best, "overhead_ratio": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
