"""LoRA variants (DoRA, rsLoRA, inits, LoRA+, NEFTune): each lands in adapter_config.json / run.yaml and
publishes a verified adapter from a real tiny-model run; PiSSA/OLoRA adapters are converted so that they
apply to the original base (the trained model's logits are reproduced exactly)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from trainkit import chat_data, run, tiny_model

from job.errors import ConfigError
from job.specload import build
from job.train import lora


def spec(**kw):
    return build(overrides=kw, environ={})


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_residual_init_adapter_is_converted_for_the_original_base(tmp_path, init, rslora):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model()
    s = spec(**{"train.init_lora_weights": init, "train.use_rslora": rslora, "train.lora_r": 4,
                "train.lora_alpha": 8, "train.target_modules": ["q_proj", "v_proj", "down_proj"]})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora.peft_config(s))
    init_path = lora.save_initial(model, tmp_path, s)
    assert init_path and init_path.is_file()
    torch.manual_seed(0)
    with torch.no_grad():  # "training": move A and B away from their init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 400, (2, 24))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    cfg = lora.convert_residual(tmp_path / "adapter", init_path)
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))

    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = original(input_ids=ids).logits
        converted = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()(input_ids=ids).logits
    assert (converted - trained).abs().max() < 1e-4
    assert (plain - trained).abs().max() > 1e-2  # the check can fail: the adapter does change the model


def test_unconverted_residual_adapter_would_be_wrong(tmp_path):
    """Why the conversion exists: a server that applies the raw PiSSA adapter to the original base (vLLM,
    a merge tool: they never re-run PEFT's SVD init, which PEFT itself redoes at load) is not serving the
    trained model."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    s = spec(**{"train.init_lora_weights": "pissa", "train.lora_r": 4, "train.target_modules": ["q_proj", "v_proj"]})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32), lora.peft_config(s))
    ids = torch.randint(3, 400, (1, 16))
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / "raw")
    cfg = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "pissa"
    cfg["init_lora_weights"] = True  # apply B·A to W as it is, like every non-PEFT consumer
    (tmp_path / "raw" / "adapter_config.json").write_text(json.dumps(cfg))
    raw = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32), tmp_path / "raw")
    with torch.no_grad():
        assert (raw.eval()(input_ids=ids).logits - trained).abs().max() > 1e-3


@pytest.mark.parametrize(("kw", "needle"), [
    ({"train.init_lora_weights": "pissa", "train.use_dora": True}, "use_dora"),
    ({"train.init_lora_weights": "olora", "distributed.strategy": "deepspeed", "distributed.zero_stage": 3}, "ZeRO-3"),
    ({"train.init_lora_weights": "pissa", "train.method": "qlora"}, "qlora"),
    ({"train.init_lora_weights": "pissa", "train.modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_combinations_that_cannot_publish_a_correct_adapter_are_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        lora.check(spec(**kw))


def test_plan_refuses_them_with_exit_64(tmp_path):
    p = run("plan", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(tmp_path / "o"),
            "--init-lora-weights", "pissa", "--use-dora", "true", "--json", timeout=300)
    assert p.returncode == 64, p.stderr[-2000:]
    assert "use_dora" in p.stderr and "Traceback" not in p.stderr


def test_loraplus_gives_b_matrices_a_faster_learning_rate():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    s = spec(**{"train.loraplus_lr_ratio": 16.0})
    cls = lora.trainer_class(s, SFTTrainer)
    assert cls is not SFTTrainer and lora.trainer_class(spec(), SFTTrainer) is SFTTrainer

    class Args:  # what create_optimizer reads from TrainingArguments
        learning_rate, weight_decay = 1e-3, 0.0

    trainer = cls.__new__(cls)
    trainer.optimizer, trainer.args = None, Args()
    trainer.get_optimizer_cls_and_kwargs = lambda args, model: (torch.optim.AdamW, {"lr": 1e-3})
    trainer.model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model()), lora.peft_config(s))
    opt = trainer.create_optimizer()
    lrs = sorted({g["lr"] for g in opt.param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(16e-3)]


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "expect"), [
    (["--use-dora", "true"], {"use_dora": True, "r": 16}),
    (["--use-rslora", "true", "--loraplus-lr-ratio", "8", "--neftune-noise-alpha", "5"], {"use_rslora": True, "r": 16}),
    (["--init-lora-weights", "pissa"], {"r": 32, "init_lora_weights": True}),
])
def test_variant_runs_publish_a_verified_adapter_that_says_so(tmp_path, flags, expect):
    from job import publish
    from job.train.export import verify_adapter

    out = tmp_path / "out"
    p = run("run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(out),
            "--max-steps", "6", "--learning-rate", "2e-3", "--per-device-train-batch-size", "8",
            "--warmup-ratio", "0", "--max-length", "256", "--logging-steps", "3",
            "--cache-dir", str(tmp_path / "cache"), *flags, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    publish.verify_published(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in expect.items():
        assert cfg[k] == v, (k, cfg[k])
    verify_adapter(out, str(tiny_model()))
    train = yaml.safe_load((out / "run.yaml").read_text())["train"]
    for flag in flags[::2]:
        key = flag.lstrip("-").replace("-", "_")
        assert key in train, key
