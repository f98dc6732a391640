"""Benchmark: `sftjob prepare` vs TRL SFTTrainer's own data preparation, as whole processes, same run.

    python bench/prep.py                 # 20k generated multi-turn conversations, 8k-vocab BPE, ChatML
    python bench/prep.py --rows 200      # smoke mode (what the test suite runs)
    python bench/prep.py --tokenizer DIR # a real tokenizer (its own chat template; TRL without masks)

Every figure is one fresh process from `python …` to its exit (interpreter start, imports, tokenizer
load, reading the jsonl, writing the result), given the same cores:

- ``ours``: `python -m job prepare --data rows.jsonl --model TOK --max-length 4096` with a cold cache
  (jsonl → assistant-masked, tokenized parquet + data report + histogram);
- ``ours_cached``: the same command again (a cache hit), and ``startup``: `python -m job --help`;
- ``trl``: a process that loads the same jsonl with `datasets` and builds TRL's `SFTTrainer` on it
  (its constructor tokenizes: `_prepare_dataset`) with ``assistant_only_loss`` and the same ChatML
  marked with {% generation %}, i.e. the same job as ours (masked tokens out), and
  ``dataset_num_proc`` = the cores; ``trl_default`` is the same without assistant masks.

Rounds are interleaved (`--repeat`) and the best wall time of each is kept (shared, noisy machines).
Prints one JSON object: seconds and tokens/s of each, the ratios, and our own stage timings (the
data report's ``timings``: imports + tokenizer, encode, split, parquet, plot).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHATML_GEN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_LENGTH = 4096


def generate(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn conversations (1-6 exchanges, 70% with a system message) from the demo generator."""
    from job.demo_data import conversations

    rng = random.Random(seed)
    base = conversations(n * 2, seed=seed)
    rows = []
    for i in range(n):
        a, b = base[2 * i]["messages"], base[2 * i + 1]["messages"]
        turns = [m for m in a + b if m["role"] != "system"][: 2 * rng.randint(1, 6)]
        sys_msg = [m for m in a if m["role"] == "system"][:1]
        rows.append({"messages": sys_msg + turns})
    return rows


def write_tokenizer(dest: Path, vocab: int) -> Path:
    from job import tiny

    tok = tiny.build_tokenizer(vocab)
    tok.save_pretrained(dest)
    return dest


def trl_child(data: str, tok_dir: str, masks: bool, out: str) -> None:
    """The TRL side, run as its own process: load the jsonl, build SFTTrainer (which prepares the data)."""
    import warnings

    warnings.filterwarnings("ignore")
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from job import tiny

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if masks:
        tok.chat_template = CHATML_GEN
    ds = load_dataset("json", data_files=data, split="train")
    cfg = SFTConfig(output_dir=str(Path(out) / "trl"), max_length=MAX_LENGTH, packing=False,
                    dataset_num_proc=os.cpu_count(), assistant_only_loss=masks, report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=tiny.build_model(tok), args=cfg, train_dataset=ds, processing_class=tok)
    n = sum(len(x) for x in trainer.train_dataset["input_ids"])
    print(json.dumps({"tokens": n}))


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}… failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, p.stdout


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: an 8k-vocab BPE built here, ChatML)")
    ap.add_argument("--vocab", type=int, default=8000, help="vocabulary of the tokenizer built here")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the best wall time of each is kept")
    ap.add_argument("--skip-trl-default", action="store_true", help="skip TRL without assistant masks")
    ap.add_argument("--trl-child", nargs=4, metavar=("DATA", "TOK", "MASKS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_child:
        data, tok, masks, out = args.trl_child
        trl_child(data, tok, masks == "1", out)
        return {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else write_tokenizer(work / "tok", args.vocab)
        data = work / "train.jsonl"
        with open(data, "w") as f:
            for r in generate(args.rows):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        ours = [sys.executable, "-m", "job", "prepare", "--data", str(data), "--model", str(tok_dir),
                "--max-length", str(MAX_LENGTH)]
        def trl(k: int, masks: str):  # a fresh datasets cache each time: cold, as ours
            cold = {**env, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{k}-{masks}")}
            return _timed([sys.executable, __file__, "--trl-child", str(data), str(tok_dir), masks, str(work)], cold)

        best: dict[str, float] = {}
        out: dict[str, str] = {}
        todo = {"startup": lambda k: _timed([sys.executable, "-m", "job", "--help"], env),
                "ours": lambda k: _timed(ours, {**env, "SFTJOB_CACHE_DIR": str(work / f"cache{k}")}),
                "ours_cached": lambda k: _timed(ours, {**env, "SFTJOB_CACHE_DIR": str(work / f"cache{k}")}),
                "trl": lambda k: trl(k, "0" if args.tokenizer else "1")}
        # (a real tokenizer's own template has no {% generation %}: TRL cannot mask it)
        if not args.tokenizer and not args.skip_trl_default:
            todo["trl_default"] = lambda k: trl(k, "0")
        for k in range(args.repeat):
            for name, fn in todo.items():
                dt, stdout = fn(k)
                if name not in best or dt < best[name]:
                    best[name], out[name] = dt, stdout
        report = json.loads(next((work / "cache0" / "prepared").glob("*/data_report.json")).read_text())
        tokens = report["tokens"]["total"]
        result: dict = {"rows": args.rows, "tokens": tokens, "cpus": os.cpu_count(), "repeat": args.repeat,
                        "tokenizer": str(args.tokenizer or f"bpe-{args.vocab}"), "load_avg_1m": round(os.getloadavg()[0], 2)}
        for name, sec in best.items():
            result[name] = {"seconds": round(sec, 3)}
            if name.startswith(("ours", "trl")) and name != "ours_cached":
                result[name]["tokens_per_s"] = round(tokens / sec)
        for name in [n for n in best if n.startswith("trl")]:
            result[name]["tokens"] = json.loads(out[name].strip().splitlines()[-1])["tokens"]
            result[f"ratio_vs_{name}"] = round(best[name] / best["ours"], 2)
        result["cached_minus_startup_s"] = round(best["ours_cached"] - best["startup"], 3)
        result["ours_stages_s"] = report.get("timings")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
