"""What one objective brings to the shared training rank (job/train/sft.py `train`), and the training
arguments every objective builds from the same settings: below sft.py and dpo.py, which both use them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Recipe:
    """What one objective brings to the shared rank (``train``): the rest — storage, seed, stop flag,
    tokenizer, prepared data, model and parent adapter, status, checkpoint mirror, trackers, heartbeat,
    resume on another world size, evaluation, the SIGTERM and save endings — is the same for SFT and DPO."""

    collator: Any
    trainer_class: type
    args: Callable[[], Any]  # built late: DPO's frozen reference needs the process group first
    before_trainer: Callable[[], None] | None = None
    drop_from_adapter: tuple[str, ...] = ()  # saved beside the adapter but not part of it (DPO's "ref" copy)


def warmup(t) -> float | int:
    """warmup_ratio as transformers takes it (a fraction < 1 of the steps); with max_steps known, the warm-up
    steps themselves, never all of them: warm-up starts at lr 0, so a 1-step run (a smoke test with
    --max-steps 1) left the adapter untrained and failed verification."""
    import math

    if t.max_steps <= 0 or t.warmup_ratio == 0:
        return t.warmup_ratio
    return min(math.ceil(t.max_steps * t.warmup_ratio), t.max_steps - 1)


def training_args(spec, plan: dict, config_cls=None, extra: dict | None = None):
    """SFTConfig; or config_cls (DPOConfig) from the same settings, keeping only the fields it has."""
    import dataclasses

    import torch
    from trl import SFTConfig

    from job.train import trackers

    t, d = spec.train, spec.distributed
    strategy = (plan.get("world") or {}).get("strategy", d.strategy)  # as the launcher resolved it
    cuda = torch.cuda.is_available()
    precision = plan["mixed_precision"]
    eval_on = bool(plan.get("eval_path"))
    kwargs = dict(
        output_dir=plan["checkpoint_dir"], max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=warmup(t), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps, report_to=trackers.for_transformers(t.report_to), seed=t.seed, data_seed=t.seed,
        save_strategy="steps" if spec.resilience.save_steps else "no",
        save_steps=spec.resilience.save_steps or 500, save_total_limit=None,
        eval_strategy=("steps" if spec.eval.eval_steps else "no") if eval_on else "no",
        eval_steps=spec.eval.eval_steps or None,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True, dataloader_num_workers=0, max_length=spec.data.max_length,
        ddp_find_unused_parameters=False if strategy == "ddp" else None,
        ddp_timeout=d.ddp_timeout,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        neftune_noise_alpha=t.neftune_noise_alpha,
    )
    if plan.get("deepspeed_config"):
        kwargs["deepspeed"] = plan["deepspeed_config"]
    if (plan.get("fast_path") or {}).get("use_liger_kernel") and cuda:  # decided (and logged) by the launcher
        kwargs["use_liger_kernel"] = True
    if config_cls is None:
        return SFTConfig(**kwargs)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    extra = extra or {}
    return config_cls(**{k: v for k, v in kwargs.items() if k in names and k not in extra}, **extra)
