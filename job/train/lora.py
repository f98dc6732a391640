"""The LoRA variants a run can ask for: DoRA, rsLoRA, PiSSA/OLoRA/Gaussian/orthogonal init, LoRA+.

One place builds the PEFT config from the spec, so the trainer, the refusals before any GPU work and the
published ``adapter_config.json`` agree. PiSSA and OLoRA start from the base's principal directions and
subtract them from the base weights: an adapter trained that way only fits the *modified* base. So the rank
saves its initial A0/B0 before the first step and the exported adapter is converted (PEFT's own recipe) to a
plain LoRA of rank 2r that applies to the original base: ΔW = BA − B0A0 = [B, −B0]·[A; A0].
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from job.errors import ConfigError

RESIDUAL_INITS = ("pissa", "olora")  # inits that change the base weights
INIT_FILE = "lora_init.safetensors"


def check(spec) -> None:
    """Combinations that cannot publish a correct adapter: refused before fetch/prepare (exit 64)."""
    t = spec.train
    if t.method == "full":
        return
    if t.init_lora_weights in RESIDUAL_INITS:
        if t.use_dora:
            raise ConfigError(f"init_lora_weights: {t.init_lora_weights} with use_dora: DoRA's magnitude is tied "
                              "to the modified base, so the adapter cannot be converted for the original base",
                              hint="use one of them: init_lora_weights: default with use_dora, or drop use_dora")
        if t.method == "qlora":
            raise ConfigError(f"init_lora_weights: {t.init_lora_weights} with method: qlora: the 4-bit base "
                              "cannot hold the residual weights", hint="use method: lora, or init_lora_weights: default")
        from job.train.launch import zero3

        if zero3(spec):
            raise ConfigError(f"init_lora_weights: {t.init_lora_weights} under ZeRO-3: the SVD/QR init needs "
                              "whole weight matrices, which ZeRO-3 partitions at load",
                              hint="use zero_stage: 2, ddp or fsdp, or init_lora_weights: default")
        if t.modules_to_save:
            raise ConfigError(f"init_lora_weights: {t.init_lora_weights} with modules_to_save is not supported",
                              hint="drop modules_to_save or use init_lora_weights: default")


def peft_config(spec):
    from peft import LoraConfig

    t = spec.train
    init = {"default": True}.get(t.init_lora_weights, t.init_lora_weights)
    return LoraConfig(
        r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
        target_modules=t.target_modules, modules_to_save=t.modules_to_save or None,
        use_dora=t.use_dora, use_rslora=t.use_rslora, init_lora_weights=init, task_type="CAUSAL_LM")


def trainer_class(spec, base):
    """SFTTrainer, or a subclass whose optimizer gives LoRA's B matrices loraplus_lr_ratio × the learning rate."""
    ratio = spec.train.loraplus_lr_ratio
    if not ratio or spec.train.method == "full":
        return base

    class LoraPlusTrainer(base):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                from peft.optimizers import create_loraplus_optimizer

                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
                kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
                self.optimizer = create_loraplus_optimizer(model or self.model, cls, lr=self.args.learning_rate,
                                                           loraplus_lr_ratio=ratio,
                                                           loraplus_weight_decay=self.args.weight_decay, **kwargs)
            return self.optimizer

    return LoraPlusTrainer


def save_initial(model, workdir: Path, spec) -> Path | None:
    """PiSSA/OLoRA: this attempt's A0/B0, saved before the first step (the base it trains on was made from
    them, so a resumed attempt saves its own)."""
    if spec.train.init_lora_weights not in RESIDUAL_INITS or spec.train.method == "full":
        return None
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}
    path = Path(workdir) / INIT_FILE
    save_file(state, str(path))
    return path


def convert_residual(adapter_dir: Path, init_path: Path) -> dict:
    """Rewrite a PiSSA/OLoRA adapter as a plain LoRA of rank 2r for the original base; returns the new config."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter_dir = Path(adapter_dir)
    weights_path = adapter_dir / "adapter_model.safetensors"
    trained, init = load_file(str(weights_path)), load_file(str(init_path))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = {}
    for key, tensor in trained.items():
        if ".lora_A." in key:
            out[key] = torch.cat([tensor, init[key].to(tensor.dtype)], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([tensor, -init[key].to(tensor.dtype)], dim=1)
        else:
            out[key] = tensor
    missing = [k for k in trained if (".lora_A." in k or ".lora_B." in k) and k not in init]
    if missing:
        raise ValueError(f"initial adapter lacks {len(missing)} tensors (e.g. {missing[0]})")
    r = int(cfg["r"])
    # keep the scaling: alpha/r (or alpha/sqrt(r) with rsLoRA) must not change when r doubles
    cfg["lora_alpha"] = cfg["lora_alpha"] * (math.sqrt(2) if cfg.get("use_rslora") else 2)
    cfg.update(r=2 * r, init_lora_weights=True, rank_pattern={}, alpha_pattern={})
    save_file(out, str(weights_path), metadata={"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return cfg
