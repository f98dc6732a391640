"""Really distributed on CPU: two processes each (gloo), DeepSpeed ZeRO-2/3 and DDP, published and verified."""
import json
import shutil

import pytest
import torch
import trainkit
from safetensors.torch import load_file, save_file

from job.errors import VerificationError
from job.train.export import verify_adapter, verify_full

pytestmark = pytest.mark.slow


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(out), "--max-steps", "4", "--logging-steps", "1", "--seed", "7",
                     "--learning-rate", "1e-3", "--max-length", "256", *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, r


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single", "--per-device-train-batch-size", "2")


@pytest.mark.parametrize("mode", [["deepspeed", "--zero-stage", "3"], ["deepspeed", "--zero-stage", "2"], ["ddp"],
                                  ["fsdp"]], ids=["zero3", "zero2", "ddp", "fsdp"])
def test_two_processes_train_and_publish_a_verified_adapter(tmp_path, single, mode):
    out, r = _train(tmp_path, mode[0], "--distributed", *mode, "--num-processes", "2",
                    "--per-device-train-batch-size", "1")
    assert (out / "_SUCCESS").exists()
    log = r.stdout + r.stderr  # no --debug: the launcher's DeepSpeed notice and the ranks' torch deprecations stay out
    assert "Setting accelerator to CPU" not in log and "all_gather_into_tensor" not in log, log[-3000:]
    topo = json.loads((out / "launch" / "topology.json").read_text())
    assert topo["num_processes"] == 2 and topo["strategy"] == mode[0]
    if mode[0] == "deepspeed":
        ds = json.loads((out / "launch" / "deepspeed.json").read_text())
        assert ds["zero_optimization"]["stage"] == int(mode[2])
    # both ranks really ran and trained to the end: each rank's heartbeat file says step 4, exit 0
    import hashlib
    import os
    from pathlib import Path

    workdir = Path(os.environ["SFTJOB_CACHE_DIR"]) / "runs" / hashlib.sha256(str(out).encode()).hexdigest()[:16]
    beats = [json.loads((workdir / "ranks" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    assert [(b["step"], b["exit"]) for b in beats] == [(4, 0), (4, 0)], beats
    assert beats[0]["pid"] != beats[1]["pid"]
    ours = load_file(str(out / "adapter_model.safetensors"))
    ref = load_file(str(single[0] / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.numel() > 0 for v in ours.values())
    # 2 processes x batch 1 is the same first step as 1 process x batch 2
    first = trainkit.losses((out / "metrics.jsonl").read_text().splitlines())[1]
    first_ref = trainkit.losses((single[0] / "metrics.jsonl").read_text().splitlines())[1]
    assert first == pytest.approx(first_ref, abs=2e-3)
    print(f"{mode}: first-step loss 2x(bs=1) {first:.5f} vs 1x(bs=2) {first_ref:.5f}; "
          f"final {trainkit.losses((out / 'metrics.jsonl').read_text().splitlines())[4]:.5f}")


def test_adapter_with_zeroed_lora_b_is_refused(tmp_path, single):
    adapter = tmp_path / "adapter"
    shutil.copytree(single[0], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(VerificationError, match="all zero"):
        verify_adapter(adapter, str(trainkit.tiny_model()))


def test_adapter_with_empty_tensors_is_refused(tmp_path, single):
    """The ZeRO-3 trap (TRL #4416 / peft #2892): every tensor saved with zero elements."""
    adapter = tmp_path / "adapter"
    shutil.copytree(single[0], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: torch.empty(0) for k in tensors}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(VerificationError, match="empty tensor"):
        verify_adapter(adapter, str(trainkit.tiny_model()))


def test_verified_adapter_passes(single):
    info = verify_adapter(single[0], str(trainkit.tiny_model()))
    assert info["lora_tensors"] == 28 and info["forward_checked"]


@pytest.mark.parametrize("flags,needs", [(["--method", "qlora"], "method: qlora"),
                                         (["--optim", "paged_adamw_8bit"], "optim: paged_adamw_8bit")])
def test_bitsandbytes_features_on_cpu_are_a_clear_config_error_before_any_work(tmp_path, flags, needs):
    cache = tmp_path / "cache"
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(tmp_path / "q"), *flags, "--max-steps", "2", env={"SFTJOB_CACHE_DIR": str(cache)})
    assert r.returncode == 64 and f"{needs} needs a CUDA GPU (bitsandbytes)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (cache / "prepared").exists()  # refused before the data was prepared


@pytest.mark.parametrize("change,problem", [
    (None, None),
    ("nothing", r"weights equal the base model's \(untrained\)"),
    ("nan", "non-finite values"),
])
def test_full_fine_tunes_are_verified_against_the_base(tmp_path, change, problem):
    from transformers import AutoModelForCausalLM

    base = trainkit.tiny_model()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        if change is None:
            w.add_(0.01)  # what a training step does
        elif change == "nan":
            w[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "full")
    if problem is None:
        info = verify_full(tmp_path / "full", str(base))
        assert info["changed"] == 1 and info["compared_with_base"] == info["tensors"] and info["forward_checked"]
    else:
        with pytest.raises(VerificationError, match=problem):
            verify_full(tmp_path / "full", str(base))
