"""Benchmark: our data preparation vs TRL SFTTrainer's own, same rows, tokenizer and template, one run.

    python bench/prep.py                 # 20k generated multi-turn conversations, tiny tokenizer, ChatML
    python bench/prep.py --rows 200      # smoke mode (what the test suite runs)
    python bench/prep.py --tokenizer DIR # a real tokenizer (its own chat template)

Ours is timed end to end (jsonl file → masked, tokenized parquet + report + PNG, cache disabled) and
again for the encode stage alone (in-memory rows → ids + labels, the same scope as TRL's). TRL is
timed on ``SFTTrainer._prepare_dataset`` only, from an in-memory Dataset (its default settings, and
again with assistant masks via a {% generation %} ChatML, which is the same job as ours).
Prints one JSON object: tokens/s of each and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

CHATML_GEN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children (our forked workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def time_ours(data: Path, tok_dir: Path, cache: Path, num_proc: int) -> tuple[float, float, int]:
    from job import spec as specmod
    from job.data.prepare import prepare

    spec = specmod.build(overrides={"data.path": str(data), "model.path": str(tok_dir), "data.max_length": 4096,
                                    "data.num_proc": num_proc, "cache_dir": str(cache)})
    t, c = time.perf_counter(), _cpu()
    p = prepare(spec)
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert not p.cache_hit
    return dt, dc, p.report["tokens"]["total"]


def time_ours_encode(rows: list[dict], tok_dir: Path, num_proc: int) -> tuple[float, float, int]:
    """Our encode stage alone, same scope as TRL's _prepare_dataset: in-memory rows → token arrays."""
    from job import spec as specmod
    from job.data.masks import Encoder
    from job.data.prepare import encode_stream, worker_pool
    from job.data.templates import load_tokenizer, resolve_template

    spec = specmod.build(overrides={"model.path": str(tok_dir), "data.max_length": 4096})
    tok, _ = load_tokenizer(spec)
    enc = Encoder(tok, resolve_template(spec, tok), 4096, "truncate_right", "turn")
    recs = [(f"mem:{i}", r, "messages") for i, r in enumerate(rows)]
    t, c = time.perf_counter(), _cpu()
    with worker_pool(enc, spec.data, spec.model, num_proc or os.cpu_count() or 1) as pool:
        out, bad, _ = encode_stream(enc, recs, spec.data, spec.model, pool=pool)
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert not bad
    return dt, dc, int(sum(int(e.lengths.sum()) for e in out))


def time_trl(rows: list[dict], tok, num_proc: int | None, assistant_only: bool, work: Path) -> tuple[float, float, int]:
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig, SFTTrainer

    from job import tiny

    disable_progress_bars()
    tok = _copy(tok)
    if assistant_only:
        tok.chat_template = CHATML_GEN
    cfg = SFTConfig(output_dir=str(work / "trl"), max_length=4096, packing=False, dataset_num_proc=num_proc,
                    assistant_only_loss=assistant_only, report_to=[], use_cpu=True, bf16=False)
    small = Dataset.from_list(rows[:4])
    trainer = SFTTrainer(model=tiny.build_model(tok), args=cfg, train_dataset=small, processing_class=tok)
    ds = Dataset.from_list(rows)
    t, c = time.perf_counter(), _cpu()
    out = trainer._prepare_dataset(ds, tok, trainer.args, False, None, "train")
    dt, dc = time.perf_counter() - t, _cpu() - c
    return dt, dc, int(sum(len(x) for x in out["input_ids"]))


def _copy(tok):
    import copy

    return copy.deepcopy(tok)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the built-in tiny one, ChatML)")
    ap.add_argument("--num-proc", type=int, default=0, help="our worker processes (0 = all cores)")
    ap.add_argument("--skip-trl-masks", action="store_true", help="skip the TRL assistant_only_loss run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (interleaved); the best wall time of each is kept (shared, noisy machines)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from transformers import AutoTokenizer

    from job import tiny

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else tiny.write(work / "tiny")
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        rows = generate(args.rows)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        todo = {"ours": lambda k: time_ours(data, tok_dir, work / f"cache{k}", args.num_proc),
                "ours_encode_only": lambda k: time_ours_encode(rows, tok_dir, args.num_proc),
                "trl": lambda k: time_trl(rows, tok, None, False, work)}
        if not args.skip_trl_masks and not args.tokenizer:
            todo["trl_assistant_masks"] = lambda k: time_trl(rows, tok, None, True, work)
        runs: dict = {}
        for k in range(args.repeat):
            for name, fn in todo.items():
                r = fn(k)
                if name not in runs or r[0] < runs[name][0]:
                    runs[name] = r
        result: dict = {"rows": args.rows, "cpus": os.cpu_count(), "repeat": args.repeat,
                        "load_avg_1m": round(os.getloadavg()[0], 2)}
        for name, (sec, cpu, ntok) in runs.items():
            result[name] = {"seconds": round(sec, 3), "cpu_seconds": round(cpu, 3), "tokens": ntok,
                            "tokens_per_s": round(ntok / sec), "tokens_per_cpu_s": round(ntok / cpu)}
        for name in [k for k in runs if k.startswith("trl")]:
            result[f"ratio_vs_{name}"] = round(result["ours"]["tokens_per_s"] / result[name]["tokens_per_s"], 2)
        result["ratio_encode_only_vs_trl"] = round(result["ours_encode_only"]["tokens_per_s"] / result["trl"]["tokens_per_s"], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
