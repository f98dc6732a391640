"""bench/gpu.py cannot rot: its --tiny mode (CPU, float32, sdpa) runs end to end here and its JSON
keeps the shape the GPU run reports; the packed layout it builds is the one job/data/packing.py writes."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"

KEYS = {
    "mode", "device", "model_params", "lora_trainable_params", "seq_len", "micro_batch", "steps", "warmup",
    "tokens_per_second_per_gpu", "lora_mfu", "peak_tflops", "anchor_tokens_per_second", "anchor_source",
    "anchor_measured_here", "ratio_vs_anchor", "peak_memory_gb", "attn_implementation",
    "gradient_checkpointing", "packing_isolated", "loss_finite", "timed_tokens", "timed_seconds",
}


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(BENCH), "--tiny", "--peak-tflops", "0.5"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must be exactly one JSON object, got: {p.stdout[-2000:]}"
    return json.loads(lines[0])


def test_tiny_json_shape_and_numbers(tiny_run):
    r = tiny_run
    assert KEYS <= r.keys(), KEYS - r.keys()
    assert (r["mode"], r["device"], r["seq_len"], r["micro_batch"]) == ("tiny", "cpu", 256, 2)
    assert r["attn_implementation"] == "sdpa" and r["gradient_checkpointing"] is True
    assert r["timed_tokens"] == r["steps"] * r["micro_batch"] * r["seq_len"]
    assert r["tokens_per_second_per_gpu"] > 0
    assert math.isclose(r["tokens_per_second_per_gpu"], r["timed_tokens"] / r["timed_seconds"], rel_tol=1e-3)
    # LoRA-MFU = 4 * N * tokens/s / peak, N = base params (not the adapter's)
    assert r["peak_tflops"] == 0.5
    expected = 4 * r["model_params"] * r["tokens_per_second_per_gpu"] / (r["peak_tflops"] * 1e12)
    assert math.isclose(r["lora_mfu"], expected, rel_tol=1e-9)
    assert 0 < r["lora_trainable_params"] < r["model_params"]
    # the anchor is NVIDIA's published figure, never a number measured by a tiny CPU run
    assert r["anchor_tokens_per_second"] == 12500 and r["anchor_measured_here"] is False
    assert "published" in r["anchor_source"]
    assert r["ratio_vs_anchor"] is None and r["peak_memory_gb"] is None
    assert r["packing_isolated"] is True and r["loss_finite"] is True


def test_mfu_is_null_without_a_peak():
    mod = _bench_module()
    assert mod.lora_mfu(8_030_261_248, 12_500, None) is None
    # the anchor's own numbers: 12.5k tok/s on Llama-3-8B is ~41 % of the H100's 989 TFLOP/s
    assert abs(mod.lora_mfu(8_030_261_248, 12_500, mod.H100_BF16_PEAK_TFLOPS) - 0.406) < 0.001


def test_packed_rows_match_the_job_layout():
    """The bench's rows are what job.data.packing.pack writes for the same examples in one bin."""
    import numpy as np

    from job.data.packing import pack

    mod = _bench_module()
    rng = random.Random(3)
    lengths = mod.example_lengths(rng, 256)
    assert sum(lengths) == 256 and len(lengths) >= 2
    exs = [[rng.randrange(3, 1024) for _ in range(n)] for n in lengths]
    row = mod.packed_row(exs)
    ids, labels, pos, eff = pack([np.array(e) for e in exs], [np.array(e) for e in exs], capacity=256)
    assert len(ids) == 1 and eff == 1.0

    def segments(i, lab, p):  # BFD reorders examples (longest first): compare as sorted segments
        starts = [k for k, x in enumerate(p) if x == 0] + [len(p)]
        return sorted((tuple(i[a:b]), tuple(lab[a:b]), tuple(p[a:b])) for a, b in pairwise(starts))
    assert segments(row["input_ids"], row["labels"], row["position_ids"]) == \
        segments(ids[0].tolist(), labels[0].tolist(), pos[0].tolist())


def test_compare_runs_the_trl_baseline_and_ours_as_whole_processes():
    """`--compare --tiny`: three processes (plain TRL SFTTrainer, ours, ours --fast) on the same examples;
    each trained and counted the same number of timed tokens' worth of steps, ratios are computed from
    the reported throughputs, and the fast path says why it is off on CPU (no Liger, no flex backward)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(BENCH), "--compare", "--tiny", "--steps", "3", "--warmup", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    runs = r["compare"]
    assert set(runs) == {"trl", "ours", "ours_fast"}
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"))
        assert run["steps"] == 3 and run["seq_len"] == 256 and run["loss_finite"] is True
        assert run["process_seconds"] > 0 and run["tokens_per_second_per_gpu"] > 0
        # the same packed-token budget per step on both sides (TRL's bins may be a little under full)
        assert 0.8 * 3 * 2 * 256 <= run["timed_tokens"] <= 3 * 2 * 256
    assert runs["trl"]["impl"] == "trl" and "TRL packing" in runs["trl"]["layout"]
    assert runs["ours"]["layout"].startswith("job packing")
    assert runs["ours_fast"]["attn_implementation"] == "sdpa" and runs["ours_fast"]["liger_kernel"] is False
    assert any("CUDA" in n for n in runs["ours_fast"]["notes"])
    ratio = runs["ours"]["tokens_per_second_per_gpu"] / runs["trl"]["tokens_per_second_per_gpu"]
    assert math.isclose(r["ratios"]["ours_vs_trl_tokens_per_second"], ratio, rel_tol=1e-2)
    assert r["ours_fast_vs_anchor"] is None  # a CPU run is never compared with NVIDIA's figure
