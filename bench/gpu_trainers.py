"""One whole-process trainer run for the GPU comparison (``bench/gpu.py --compare`` starts these).

Both sides train the same random-init Llama shape (bench/gpu.py: LLAMA3_8B, or TINY with --tiny), on
the same random examples (same seed, same lengths), at the same sequence length, with the same LoRA
(r16/alpha 32/dropout 0.05, all linear layers), AdamW at 2e-4, grad clipping 1.0, bf16 on CUDA and
non-reentrant activation checkpointing:

    --impl trl    plain TRL ``SFTTrainer``: the examples as a tokenized dataset, ``packing=True`` with its
                  defaults (best-fit-decreasing bins, padding-free), the model's default attention (sdpa)
    --impl ours   the job's trainer set-up (job/train/sft.py): ``SFTTrainer`` over rows already packed by
                  the job's layout (position_ids restart per example), the job's ``Collator``;
                  ``--fast`` adds the fast path: Liger kernels and varlen/flex document masking instead
                  of a dense block-diagonal mask (flash_attention_2 when flash_attn is importable, else
                  flex_attention), falling back with a note where a kernel is missing

Tokens/s counts the tokens of the timed steps' batches (after --warmup untimed steps), with the
device synchronised at both ends. Needs torch, transformers, peft, trl and datasets (no deepspeed,
no boto3). Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gpu as bench  # noqa: E402  bench/gpu.py: shapes, example lengths, MFU, packed layout


def log(msg: str) -> None:
    print(f"bench/gpu_trainers: {msg}", file=sys.stderr, flush=True)


def examples(n_rows: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """The examples bench.make_rows packs into n_rows full rows (same rng, same order)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_rows):
        out += [[rng.randrange(3, vocab) for _ in range(n)] for n in bench.example_lengths(rng, seq_len)]
    return out


def tokenizer(vocab: int):
    """A word-level tokenizer over the ids (TRL needs a processing_class for pad/eos; nothing is encoded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    return tok


def fast_attention(cuda: bool) -> tuple[str, list[str]]:
    """The job's fast-path rule for packed rows (job/train/fastpath.py): varlen, else flex, else dense sdpa."""
    if not cuda:
        return "sdpa", ["fast path needs CUDA (no flex backward, no Liger on CPU): sdpa with a dense mask"]
    from job.train.fastpath import choose_attention, kernels

    k = kernels()
    a = choose_attention("auto", cuda=True, packed=True, flash_attn=k["flash_attn"], flex=k["flex"])
    return a.implementation, [a.note] if a.note else []


def liger_available(cuda: bool) -> tuple[bool, list[str]]:
    if not cuda:
        return False, []
    if importlib.util.find_spec("liger_kernel") is None:
        return False, ["liger-kernel is not installed: no Liger kernels"]
    return True, []


def run(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tiny = args.tiny
    cuda = torch.cuda.is_available() and not tiny
    if not tiny and not cuda:
        raise SystemExit("bench/gpu_trainers.py: no CUDA device visible; use --tiny on CPU")
    if tiny:
        torch.set_num_threads(1)
    seq_len = args.seq_len or (256 if tiny else 4096)
    steps = args.steps if args.steps is not None else (4 if tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    micro_batch = args.micro_batch or (2 if tiny else 1)
    config = dict(bench.TINY if tiny else bench.LLAMA3_8B)
    config["max_position_embeddings"] = max(config["max_position_embeddings"], seq_len)
    vocab = config["vocab_size"]
    dtype = torch.bfloat16 if cuda else torch.float32
    notes: list[str] = []
    attn, liger = "sdpa", False
    if args.impl == "ours" and args.fast:
        attn, n1 = fast_attention(cuda)
        liger, n2 = liger_available(cuda)
        notes += n1 + n2
    torch.manual_seed(args.seed)
    n_rows = (warmup + steps) * micro_batch
    t = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):
        try:
            model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype, attn_implementation=attn)
        except (ImportError, ValueError) as e:
            notes.append(f"attn_implementation {attn} unavailable ({str(e).splitlines()[0][:160]}); sdpa instead")
            attn = "sdpa"
            model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False  # packed rows: no KV cache across examples (job/train/sft.py does the same)
    n_base = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - t

    batch_tokens: list[int] = []

    def counting(collate):
        def wrapped(rows):
            out = collate(rows)
            ids = out["input_ids"]
            batch_tokens.append(int(out["attention_mask"].sum()) if "attention_mask" in out else int(ids.numel()))
            return out
        return wrapped

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-gpu-"), max_steps=warmup + steps,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1, learning_rate=2e-4,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=min(5, warmup + steps), report_to="none", save_strategy="no", disable_tqdm=True, seed=args.seed,
        bf16=cuda, use_cpu=not cuda, max_length=seq_len, dataloader_num_workers=0,
    )
    ckpt = not args.no_gradient_checkpointing
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:  # transformers >= 5.2x name
        common.update(activation_checkpointing=ckpt, activation_checkpointing_kwargs={"use_reentrant": False} if ckpt else None)
    else:
        common.update(gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None)
    if liger:
        common["use_liger_kernel"] = True
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    tok = tokenizer(vocab)
    if args.impl == "trl":
        exs = examples(n_rows + micro_batch * 2, seq_len, vocab, args.seed)
        ds = Dataset.from_dict({"input_ids": exs})
        cfg = SFTConfig(packing=True, **common)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
        trainer.data_collator = counting(trainer.data_collator)
        layout = f"TRL packing ({cfg.packing_strategy}), padding_free={cfg.padding_free}"
    else:
        from job.train.collate import Collator

        rows = bench.make_rows(n_rows, seq_len, vocab, seed=args.seed)
        for r in rows:
            r.pop("_examples")
        ds = Dataset.from_list(rows)
        cfg = SFTConfig(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, **common)
        collator = Collator(pad_id=0, packed=True, flatten=attn == "flash_attention_2")
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                             data_collator=counting(collator), peft_config=lora)
        layout = "job packing (bfd, position_ids restart), job Collator" + (", flattened varlen" if collator.flatten else "")
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: dict[str, float] = {}
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup:
                sync()
                marks["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == warmup + steps:
                sync()
                marks["t1"] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    elapsed = marks["t1"] - marks["t0"]
    timed_tokens = sum(batch_tokens[warmup:warmup + steps])
    tps = timed_tokens / elapsed
    peak = args.peak_tflops if args.peak_tflops is not None else (bench.H100_BF16_PEAK_TFLOPS if cuda else None)
    import peft
    import transformers
    import trl

    return {
        "impl": args.impl, "fast": bool(args.fast), "mode": "tiny" if tiny else "full",
        "device": "cuda" if cuda else "cpu", "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "model_params": n_base, "attn_implementation": attn, "liger_kernel": liger, "layout": layout,
        "seq_len": seq_len, "micro_batch": micro_batch, "steps": steps, "warmup": warmup,
        "batches": len(batch_tokens), "timed_tokens": timed_tokens, "timed_seconds": round(elapsed, 4),
        "tokens_per_second_per_gpu": tps, "lora_mfu": bench.lora_mfu(n_base, tps, peak), "peak_tflops": peak,
        "init_seconds": round(init_s, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "train_loss": losses[-1] if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses) if losses else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["trl", "ours"], required=True)
    ap.add_argument("--fast", action="store_true", help="ours: Liger kernels + varlen/flex document masking")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.impl == "trl" and args.fast:
        raise SystemExit("--fast is for --impl ours (the baseline is plain TRL)")
    result = run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
