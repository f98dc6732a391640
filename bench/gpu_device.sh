#!/usr/bin/env bash
# What a session runs on a lent GPU machine (one prepared script; see docs/benchmarks.md):
#   1. the 8B-shape comparison: plain TRL SFTTrainer vs ours, fast path off and on (bench/gpu.py --compare)
#   2. a real `sftjob run` on CUDA (tiny model, packed, bf16, local output) that publishes and verifies
#   3. with DPO=1: a real DPO run on CUDA (tiny model, generated pairs); SKIP_COMPARE=1 skips step 1
# Wheels the machine lacks travel in .whl/ (carry it); results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch,transformers,trl,peft,datasets;print("torch",torch.__version__,"cuda",torch.version.cuda,"transformers",transformers.__version__,"trl",trl.__version__,"peft",peft.__version__,"datasets",datasets.__version__)'
  python3 -c 'import liger_kernel;print("liger ok")'; python3 -c 'import flash_attn' 2>&1 | tail -1; } 2>&1 | tee "$OUT/env.txt"
if [ -z "${SKIP_COMPARE:-}" ]; then
echo "== compare (8B shape, seq ${SEQ:-4096})"
timeout "${COMPARE_TIMEOUT:-330}" python3 bench/gpu.py --compare --seq-len "${SEQ:-4096}" --steps "${STEPS:-20}" \
  --warmup "${WARMUP:-5}" > "$OUT/compare.json" 2> "$OUT/compare.err"; echo "compare exit $?"
tail -n 8 "$OUT/compare.err"
python3 - "$OUT/compare.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no compare result: {e}")
for k, v in r["compare"].items():
    print(k, {x: v.get(x) for x in ("tokens_per_second_per_gpu", "lora_mfu", "attn_implementation", "liger_kernel",
                                    "peak_memory_gb", "process_seconds", "train_loss", "notes", "error")})
print("ratios", r["ratios"], "fast vs anchor", r.get("ours_fast_vs_anchor"))
PY
fi
echo "== real sftjob run on CUDA (tiny model)"
T=/tmp/gpurun; rm -rf $T; mkdir -p $T
timeout 150 bash -c "python3 -m job tiny-model $T/tiny && python3 -c 'from job import demo_data; demo_data.write_jsonl(\"$T/train.jsonl\", n=200)' && \
  python3 -m job run --model $T/tiny --data $T/train.jsonl --output $T/out --max-steps 40 --learning-rate 2e-3 \
  --per-device-train-batch-size 8 --logging-steps 10 --warmup-ratio 0 --max-length 256 --packing true \
  --save-steps 20 --cache-dir $T/cache" > "$OUT/run.log" 2>&1; echo "run exit $?"
grep -E '"event": "(progress|done)"|ERROR|Error|error' "$OUT/run.log" | tail -n 8
ls $T/out 2>/dev/null | head -30
python3 - "$T" <<'PY'
import json, sys
t = sys.argv[1]
try:
    st = json.load(open(f"{t}/out/status.json"))
    plan = json.load(open(f"{t}/out/launch/plan.json"))
except Exception as e:
    sys.exit(f"no run outputs: {e}")
print("state", st.get("state"), "step", st.get("step"), "loss", st.get("loss"), "tok/s", st.get("tokens_per_second"))
print("fast_path", json.dumps(plan.get("fast_path")))
print("status fast_path", json.dumps(st.get("fast_path")))
PY
if [ -n "${DPO:-}" ]; then
echo "== real DPO run on CUDA (tiny model, generated preference pairs)"
timeout 150 bash -c "python3 -c 'from job import demo_pairs; demo_pairs.write_jsonl(\"$T/pairs.jsonl\", n=64)' && \
  python3 -m job run --objective dpo --model $T/tiny --data $T/pairs.jsonl --output $T/dpo --max-steps 20 \
  --per-device-train-batch-size 4 --logging-steps 5 --max-length 256 --save-steps 10 --cache-dir $T/cache" \
  > "$OUT/dpo.log" 2>&1; echo "dpo exit $?"
grep -E '"event": "(progress|done)"|ERROR|Error|error' "$OUT/dpo.log" | tail -n 6
python3 -c "import json; s=json.load(open('$T/dpo/status.json')); print('dpo state', s.get('state'), 'step', s.get('step'), 'loss', s.get('loss'), 'reward acc', s.get('reward_accuracies'), 'margin', s.get('reward_margins'))"
ls $T/dpo 2>/dev/null | tr '\n' ' '; echo
fi
