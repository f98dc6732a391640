"""GPU benchmark: LoRA SFT tokens/s/GPU and LoRA-MFU of our training step vs NVIDIA's published anchor.

A random-init Llama-3-8B-shaped model (no download: ``from_config`` under a ``torch.device`` context,
bf16, on the GPU), PEFT LoRA r16/alpha 32 on all linear layers, gradient checkpointing (non-reentrant,
as the job sets it), attention by the job's rule for packed rows (job/train/fastpath.py: flash_attention_2
when ``flash_attn`` is importable, else FlexAttention document masking on CUDA, else sdpa),
AdamW on the adapter, bf16 autocast (what Trainer's ``bf16=True`` does), grad clipping at 1.0.
Batches are padding-free packed rows of --seq-len random token ids, several examples per row with
position_ids restarting per example and the first label of each example masked (the layout
job/data/packing.py writes), collated by the job's own ``job.train.collate.Collator``.

    python bench/gpu.py                      # CUDA: Llama-3-8B shape, seq 4096, 5 warm-up + 20 timed steps
    python bench/gpu.py --micro-batch 2      # 2 packed rows per step (one 8192-token row, as the Collator does)
    python bench/gpu.py --tiny               # CPU smoke mode (what the test suite runs): hidden 128, 2 layers
    python bench/gpu.py --compare            # whole processes: plain TRL SFTTrainer vs ours, fast path off/on,
                                             # ratios printed (bench/gpu_trainers.py runs each side)

LoRA-MFU = 4 * N * tokens/s / peak, N = base-model parameters (embeddings included): forward 2N +
activation-gradient backward 2N per token; no weight gradients for the frozen base, and neither the
recompute of gradient checkpointing nor attention is counted (NVIDIA's convention for the anchor).
Needs only torch, transformers and peft (no trl/datasets/deepspeed: the GPU machine lacks them).
Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor-core peak (H200: same compute)
ANCHOR = {
    "tokens_per_second_per_gpu": 12500,
    "lora_mfu": 0.41,
    "setting": "Llama-3-8B LoRA, seq 4096, packed, bf16, H100",
    "source": "NVIDIA's published figure (as cited in issue 7); not measured in this run",
}
TARGET_TOKENS_PER_SECOND = 14000
IGNORE = -100  # job.data.masks.IGNORE (not imported: job.data pulls in storage/boto3)

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
    hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
)
TINY = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    hidden_act="silu", bos_token_id=1, eos_token_id=2,
)


def log(msg: str) -> None:
    print(f"bench/gpu: {msg}", file=sys.stderr, flush=True)


def lora_mfu(model_params: int, tokens_per_second: float, peak_tflops: float | None) -> float | None:
    """4 * N * tokens/s / peak (None without a stated peak)."""
    if not peak_tflops:
        return None
    return 4.0 * model_params * tokens_per_second / (peak_tflops * 1e12)


def example_lengths(rng: random.Random, seq_len: int) -> list[int]:
    """Lengths of the examples packed into one full row: uniform in [seq_len/16, seq_len/2], the last
    one taking what is left (as best-fit-decreasing tops bins up with short examples)."""
    lo, hi = max(2, seq_len // 16), max(2, seq_len // 2)
    out, left = [], seq_len
    while left > 0:
        n = min(left, rng.randint(lo, hi))
        out.append(n)
        left -= n
    return out


def packed_row(examples: list[list[int]]) -> dict:
    """One padding-free packed row, as job.data.packing.pack writes it: ids concatenated, position_ids
    restarting at 0 per example, labels = ids with each example's first label masked."""
    ids, labels, pos = [], [], []
    for ex in examples:
        ids += ex
        labels += [IGNORE] + ex[1:]
        pos += list(range(len(ex)))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def make_rows(n_rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        exs = [[rng.randrange(3, vocab) for _ in range(n)] for n in example_lengths(rng, seq_len)]
        rows.append(packed_row(exs))
        rows[-1]["_examples"] = len(exs)
    return rows


def pick_attention(requested: str, cuda: bool) -> str:
    """The job's rule for packed rows (job.loader → job/train/fastpath.py)."""
    from job.loader import attn_implementation

    return attn_implementation(requested, cuda, packed=True)


def build_model(config_kwargs: dict, dtype, device, attn: str, grad_ckpt: bool, lora: dict):
    """Random init directly on the device (no download, no CPU copy), then PEFT LoRA as the job does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from job.loader import for_training

    cfg = LlamaConfig(**config_kwargs)
    notes = []
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except (ImportError, ValueError) as e:
            if attn == "sdpa":
                raise
            notes.append(f"attn_implementation {attn} unavailable ({str(e).splitlines()[0][:160]}); fell back to sdpa")
            attn = "sdpa"
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    for_training(model)  # use_cache off, as the job's ranks: packed rows stay isolated per example
    n_base = sum(p.numel() for p in model.parameters())
    if grad_ckpt:  # what Trainer does for gradient_checkpointing=True with the job's kwargs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x (old name deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # e.g. the GPU machine's transformers 5.17
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    model.train()
    return model, n_base, attn, notes


def packing_isolation(model, vocab: int, device, autocast, lengths=(24, 40)) -> tuple[float, float]:
    """(isolated, leaking): max |logits(packed row) - logits(each example alone)| / max |logits|, with
    the row's position_ids restarting per example (what the Collator relies on: ~0, kernel noise only)
    and, for scale, with one position_ids run over the whole row (attention crosses examples: O(1))."""
    import torch

    rng = random.Random(1)
    exs = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    row = packed_row(exs)
    was_training = model.training
    model.eval()  # no LoRA dropout
    try:
        with torch.no_grad(), autocast:
            t = lambda x: torch.tensor([x], device=device)  # noqa: E731
            logits = lambda ids, pos: model(input_ids=t(ids), position_ids=t(pos)).logits[0].float()  # noqa: E731
            alone = torch.cat([logits(ex, list(range(len(ex)))) for ex in exs])
            packed = logits(row["input_ids"], row["position_ids"])
            leaking = logits(row["input_ids"], list(range(len(row["input_ids"]))))
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-12)
    return float((packed - alone).abs().max() / scale), float((leaking - alone).abs().max() / scale)


def run(args) -> dict:
    import torch

    from job.train.collate import Collator

    tiny = args.tiny
    cuda = torch.cuda.is_available() and not tiny
    if not tiny and not cuda:
        raise SystemExit("bench/gpu.py: no CUDA device visible; use --tiny for the CPU smoke mode")
    device = torch.device("cuda" if cuda else "cpu")
    if tiny:  # tiny ops on a shared CPU: one thread beats OpenMP workers fighting over the cores
        torch.set_num_threads(1)
    from job.loader import dtype_name, mixed_precision

    precision = mixed_precision("auto", cuda, cuda and torch.cuda.is_bf16_supported())
    dtype = getattr(torch, dtype_name("auto", precision))  # as the job loads weights: bf16 on H100/H200, fp32 on CPU
    seq_len = args.seq_len or (256 if tiny else 4096)
    steps = args.steps if args.steps is not None else (4 if tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    micro_batch = args.micro_batch or (2 if tiny else 1)
    if steps < 1 or warmup < 0 or micro_batch < 1 or seq_len < 4:
        raise SystemExit("bench/gpu.py: need --steps >= 1, --warmup >= 0, --micro-batch >= 1, --seq-len >= 4")
    config = dict(TINY if tiny else LLAMA3_8B)
    config["max_position_embeddings"] = max(config["max_position_embeddings"], seq_len)
    lora = {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": "all-linear"}
    torch.manual_seed(args.seed)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    attn = pick_attention(args.attn, cuda)
    t = time.perf_counter()
    model, n_base, attn, notes = build_model(config, dtype, device, attn, not args.no_gradient_checkpointing, lora)
    if cuda:
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    log(f"{'tiny' if tiny else 'Llama-3-8B-shaped'} model: {n_base / 1e9:.3f}B base params, "
        f"{n_lora / 1e6:.2f}M LoRA params, {attn}, init {init_s:.1f}s")

    # The job: Trainer(optim="adamw_torch", learning_rate=2e-4, weight_decay=0, max_grad_norm=1.0)
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    collator = Collator(pad_id=0, packed=True, flatten=attn == "flash_attention_2")  # as the job does
    rows = make_rows((warmup + steps) * micro_batch, seq_len, config["vocab_size"], seed=args.seed)
    examples_per_row = sum(r.pop("_examples") for r in rows) / len(rows)
    batches = [rows[i * micro_batch:(i + 1) * micro_batch] for i in range(warmup + steps)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(raw_rows):
        batch = {k: v.to(device, non_blocking=True) for k, v in collator(raw_rows).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    isolation, leak = packing_isolation(model, config["vocab_size"], device, autocast)
    isolation_tol = 0.1 if cuda else 1e-4  # bf16 kernel noise (packed rows take another sdpa/flash path) vs fp32
    isolated = isolation <= isolation_tol and isolation * 10 < leak
    if not isolated:
        notes.append(f"packed rows are NOT isolated per example (rel. logit diff {isolation:.3g}; "
                     f"a row with attention across examples differs by {leak:.3g}): the Collator's layout "
                     "is broken on this stack")
    log(f"packed-row isolation: rel. logit diff {isolation:.2e} (tolerance {isolation_tol:g}; leaking row: {leak:.2e})")

    losses = []
    for i in range(warmup):
        losses.append(step(batches[i]))
    if cuda:
        torch.cuda.synchronize()
    log(f"{warmup} warm-up steps done; timing {steps} steps of {micro_batch} x {seq_len} tokens")
    tokens0 = collator.tokens
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(batches[i]))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    timed_tokens = collator.tokens - tokens0
    losses = [float(x) for x in losses]

    tps = timed_tokens / elapsed
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_BF16_PEAK_TFLOPS if cuda else None)
    peak_source = ("--peak-tflops" if args.peak_tflops is not None
                   else "H100 SXM bf16 dense peak (default)" if cuda else None)
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    if cuda and args.peak_tflops is None and not any(k in gpu_name for k in ("H100", "H200", "GH200")):
        notes.append(f"default peak is the H100's; this GPU is {gpu_name}: pass --peak-tflops")
    if tiny:
        notes.append("tiny CPU smoke run: throughput is not comparable with the anchor (ratio and target are null)")
    mfu = lora_mfu(n_base, tps, peak)
    import peft
    import transformers

    return {
        "mode": "tiny" if tiny else "full",
        "device": device.type,
        "gpu_name": gpu_name,
        "cpu_threads": None if cuda else torch.get_num_threads(),
        "model": "tiny-llama (hidden 128, 2 layers)" if tiny else "Llama-3-8B shape, random init",
        "model_params": n_base,
        "lora_trainable_params": n_lora,
        "lora": {**lora, "param_dtype": str(trainable[0].dtype).replace("torch.", "")},
        "dtype": str(dtype).replace("torch.", ""),
        "autocast_bf16": cuda,
        "attn_implementation": attn,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "packed": True,
        "packing_isolation_rel_diff": isolation,
        "packing_leak_rel_diff": leak,
        "packing_isolated": isolated,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "tokens_per_step": micro_batch * seq_len,
        "examples_per_row": round(examples_per_row, 2),
        "steps": steps,
        "warmup": warmup,
        "timed_tokens": timed_tokens,
        "timed_seconds": round(elapsed, 4),
        "step_seconds": round(elapsed / steps, 4),
        "init_seconds": round(init_s, 2),
        "tokens_per_second_per_gpu": tps,
        "lora_mfu": mfu,
        "mfu_formula": "4 * model_params * tokens_per_second_per_gpu / (peak_tflops * 1e12)",
        "peak_tflops": peak,
        "peak_source": peak_source,
        "anchor_tokens_per_second": ANCHOR["tokens_per_second_per_gpu"],
        "anchor_lora_mfu": ANCHOR["lora_mfu"],
        "anchor_setting": ANCHOR["setting"],
        "anchor_source": ANCHOR["source"],
        "anchor_measured_here": False,
        "ratio_vs_anchor": None if tiny else tps / ANCHOR["tokens_per_second_per_gpu"],
        "target_tokens_per_second": TARGET_TOKENS_PER_SECOND,
        "meets_target": None if tiny else tps >= TARGET_TOKENS_PER_SECOND,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_memory_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_finite": all(math.isfinite(x) for x in losses),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "notes": notes,
    }


def compare(args) -> dict:
    """Baseline and ours as whole processes (start-up included), one after the other on the same device:
    plain TRL SFTTrainer, then the job's trainer set-up with the fast path off and on. Ratios = ours / TRL."""
    import subprocess

    script = Path(__file__).resolve().parent / "gpu_trainers.py"
    shared = ["--seed", str(args.seed)]
    for flag, value in (("--tiny", args.tiny), ("--steps", args.steps), ("--warmup", args.warmup),
                        ("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch),
                        ("--peak-tflops", args.peak_tflops), ("--no-gradient-checkpointing", args.no_gradient_checkpointing)):
        if value is True:
            shared.append(flag)
        elif value not in (None, False):
            shared += [flag, str(value)]
    runs = {}
    for name, extra in (("trl", ["--impl", "trl"]), ("ours", ["--impl", "ours"]), ("ours_fast", ["--impl", "ours", "--fast"])):
        log(f"compare: {name} ...")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, str(script), *extra, *shared], capture_output=True, text=True)
        wall = time.perf_counter() - t
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            runs[name] = {"error": f"exit {p.returncode}: {p.stderr[-1500:]}", "process_seconds": round(wall, 1)}
            log(f"compare: {name} failed (exit {p.returncode})")
            continue
        runs[name] = {**json.loads(lines[-1]), "process_seconds": round(wall, 1)}
        log(f"compare: {name} {runs[name]['tokens_per_second_per_gpu']:.0f} tok/s, process {wall:.1f}s")
    base = runs.get("trl", {}).get("tokens_per_second_per_gpu")
    ratios = {}
    for name in ("ours", "ours_fast"):
        tps = runs.get(name, {}).get("tokens_per_second_per_gpu")
        if base and tps:
            ratios[f"{name}_vs_trl_tokens_per_second"] = round(tps / base, 3)
            ratios[f"{name}_vs_trl_process_seconds"] = round(runs["trl"]["process_seconds"] / runs[name]["process_seconds"], 3)
    fast = runs.get("ours_fast", {}).get("tokens_per_second_per_gpu")
    return {"compare": runs, "ratios": ratios,
            "anchor_tokens_per_second": ANCHOR["tokens_per_second_per_gpu"], "anchor_source": ANCHOR["source"],
            "ours_fast_vs_anchor": None if args.tiny or not fast else round(fast / ANCHOR["tokens_per_second_per_gpu"], 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on CPU, float32, sdpa, a few steps (the test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5; tiny 1)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 4096; tiny 256)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="packed rows per step; the Collator concatenates them into one row (default 1; tiny 2)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak for LoRA-MFU (default {H100_BF16_PEAK_TFLOPS:g} on CUDA = H100 bf16; none on CPU -> null)")
    ap.add_argument("--attn", choices=["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"],
                    default="auto", help="auto: flash_attention_2 if flash_attn is importable on CUDA, else sdpa "
                    "(the job's rule; tiny: sdpa). flex_attention is here to measure, the job cannot select it")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="the job's default 0.05")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true",
                    help="whole processes: plain TRL SFTTrainer vs ours (fast path off and on); prints the ratios")
    args = ap.parse_args(argv)
    if args.compare:
        result = compare(args)
        print(json.dumps(result), flush=True)
        return result
    if args.tiny and args.attn == "auto":
        args.attn = "sdpa"
    result = run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
