"""One training rank: load the prepared data (never tokenize here), the base model, PEFT, SFTTrainer.

Started by launch.py as ``python -m job.train.sft PLAN.json`` (single process) or under
``accelerate launch`` (every rank). The plan file carries the resolved spec and local paths.
Exit 0 when trained and saved; 75 when stopped by SIGTERM or the deadline after a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from job.errors import ExitCode

log = logging.getLogger("sftjob.train")
REWARD_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")  # DPO's, when logged


class Collator:
    """Pads examples; packed bins go padding-free: per-example position_ids and no attention_mask.

    Transformers builds a block-diagonal mask from restarting position_ids when no attention_mask is
    given, so attention never crosses examples. With flash-attention (varlen) a batch becomes one long
    row; with sdpa/eager rows stay separate (mask cost grows with the row, not the batch) and a short
    bin is padded with its own position-0 segment, which no real token attends to. Counts tokens.
    """

    def __init__(self, pad_id: int, packed: bool, flatten: bool = False):
        self.pad_id, self.packed, self.flatten = pad_id, packed, flatten
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        for r in rows:
            self.tokens += len(r["input_ids"])
            self.trained_tokens += sum(1 for x in r["labels"] if x != -100)
        if self.packed and self.flatten:
            cat = lambda k: torch.tensor([x for r in rows for x in r[k]], dtype=torch.long)[None]  # noqa: E731
            return {"input_ids": cat("input_ids"), "labels": cat("labels"), "position_ids": cat("position_ids")}
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
            mask[i, :n] = 1
        if self.packed:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class StopFlag:
    """SIGTERM / deadline flag, agreed across ranks each step so all stop at the same step."""

    def __init__(self, deadline: float | None):
        self.reason: str | None = None
        self.deadline = deadline
        self.signalled_at: float | None = None
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = "sigterm"
            self.signalled_at = time.time()
            print("sftjob: SIGTERM received — finishing the step, then checkpointing", file=sys.stderr, flush=True)

    def agreed(self, step_seconds: float) -> str | None:
        if self.reason is None and self.deadline and time.time() + 3 * step_seconds + 10 > self.deadline:
            self.reason = "deadline"
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            codes = {None: 0, "deadline": 1, "sigterm": 2}
            t = torch.tensor([codes[self.reason]], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self.reason = {0: None, 1: "deadline", 2: "sigterm"}[int(t.item())]
        return self.reason


def _callbacks(plan: dict, collator: Collator, stop: StopFlag, mirror, status):
    from transformers import TrainerCallback

    metrics_path = Path(plan["workdir"]) / "metrics.jsonl"
    world = int(os.environ.get("WORLD_SIZE", "1"))

    class Progress(TrainerCallback):
        t0 = time.time()
        last_step_t = time.time()
        last_save = time.time()
        step_seconds = 1.0
        last_eval: tuple[int, dict] | None = None  # (step, metrics) of the newest evaluation (rank 0)

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_step_t = self.last_save = time.time()
            self.step0 = state.global_step

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            self.step_seconds = 0.7 * self.step_seconds + 0.3 * (now - self.last_step_t)
            self.last_step_t = now
            reason = stop.agreed(self.step_seconds)
            if reason:
                control.should_save = True
                control.should_training_stop = True
            elif plan.get("save_minutes") and now - self.last_save > plan["save_minutes"] * 60:
                control.should_save = True
            if control.should_save:
                self.last_save = now
            if control.should_training_stop:  # the last step always logs, whatever logging_steps is
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            if "eval_loss" in logs and "loss" not in logs:
                self.last_eval = (state.global_step, dict(logs))
                rec = {"step": state.global_step, "eval_loss": logs["eval_loss"], "time": time.time()}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({"event": "eval", **rec}), flush=True)
                return
            if "loss" not in logs:
                return
            elapsed = max(time.time() - self.t0, 1e-6)
            done = max(state.global_step - self.step0, 1)
            remaining = max(state.max_steps - state.global_step, 0)
            rec = {
                "step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0, 4),
                "loss": logs.get("loss"), "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": round(collator.tokens * world / elapsed, 1),
                "trained_tokens_per_second": round(collator.trained_tokens * world / elapsed, 1),
                "eta_seconds": round(elapsed / done * remaining, 1), "time": time.time(),
            }
            rec.update({k: logs[k] for k in REWARD_KEYS if k in logs})  # DPO: reward accuracy and margin
            import torch

            if torch.cuda.is_available():
                rec["gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({"event": "progress", **rec}), flush=True)
            rewards = "".join(f"  {label} {rec[k]:.3f}" for k, label in zip(REWARD_KEYS, ("reward acc", "margin"), strict=False)
                              if rec.get(k) is not None)
            print(f"step {rec['step']}/{rec['max_steps']}  loss {rec['loss']:.4f}{rewards}  "
                  f"{rec['tokens_per_second']:.0f} tok/s  eta {rec['eta_seconds']:.0f}s", file=sys.stderr, flush=True)
            if status:
                status.update(step=rec["step"], max_steps=rec["max_steps"], epoch=rec["epoch"], loss=rec["loss"],
                              tokens_per_second=rec["tokens_per_second"], eta_seconds=rec["eta_seconds"],
                              **{k.replace("rewards/", "reward_"): rec[k] for k in REWARD_KEYS[:2] if k in rec})

        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's shard is on disk before the node uploads
            if mirror is not None:
                mirror.submit(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    return [Progress()]


def _training_args(spec, plan: dict, config_cls=None, extra: dict | None = None):
    """SFTConfig; or config_cls (DPOConfig) from the same settings, keeping only the fields it has."""
    import dataclasses

    import torch
    from trl import SFTConfig

    t, d = spec.train, spec.distributed
    cuda = torch.cuda.is_available()
    precision = plan["mixed_precision"]
    eval_on = bool(plan.get("eval_path"))
    kwargs = dict(
        output_dir=plan["checkpoint_dir"], max_steps=t.max_steps, num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps, report_to=t.report_to or "none", seed=t.seed, data_seed=t.seed,
        save_strategy="steps" if spec.resilience.save_steps else "no",
        save_steps=spec.resilience.save_steps or 500, save_total_limit=None,
        eval_strategy=("steps" if spec.eval.eval_steps else "no") if eval_on else "no",
        eval_steps=spec.eval.eval_steps or None,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True, dataloader_num_workers=0, max_length=spec.data.max_length,
        ddp_find_unused_parameters=False if d.strategy == "ddp" else None,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        neftune_noise_alpha=t.neftune_noise_alpha,
    )
    if plan.get("deepspeed_config"):
        kwargs["deepspeed"] = plan["deepspeed_config"]
    if config_cls is None:
        return SFTConfig(**kwargs)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    extra = extra or {}
    return config_cls(**{k: v for k, v in kwargs.items() if k in names and k not in extra}, **extra)


def _load_model(spec, plan: dict):
    import torch
    from transformers import AutoModelForCausalLM

    m = spec.model
    dtype = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[m.torch_dtype]
    if dtype is None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan["mixed_precision"], torch.float32)
    kwargs = dict(dtype=dtype, trust_remote_code=m.trust_remote_code, attn_implementation=plan["attn_implementation"])
    if spec.train.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(plan["model_dir"], **kwargs)
    model.config.use_cache = False
    return model


def train(plan: dict) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from job import checkpoints, storage
    from job.data.templates import add_tokens, apply_template
    from job.spec import RunSpec, StorageSpec
    from job.status import Status
    from job.train import lora

    spec = RunSpec.model_validate(plan["spec"])
    live = os.environ.get("SFTJOB_RANK_STORAGE")  # set by launch when plan.json had to mask the storage section
    storage.configure(StorageSpec.model_validate_json(live) if live else spec.storage)
    torch.manual_seed(spec.train.seed)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(plan.get("node_rank", 0))
    stop = StopFlag(plan.get("deadline"))

    tok = AutoTokenizer.from_pretrained(plan["model_dir"], trust_remote_code=spec.model.trust_remote_code)
    add_tokens(tok, spec.model.add_special_tokens)
    apply_template(tok, Path(plan["chat_template_path"]).read_text())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train_ds = Dataset.from_parquet(plan["train_path"])
    eval_ds = Dataset.from_parquet(plan["eval_path"]) if plan.get("eval_path") else None
    collator = Collator(tok.pad_token_id, packed=spec.data.packing,
                        flatten=plan["attn_implementation"] == "flash_attention_2")

    model = _load_model(spec, plan)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))  # new special tokens; consumers resize the base the same way
    peft_config = lora.peft_config(spec) if spec.train.method in ("lora", "qlora") else None
    mirror = None
    if local_rank == 0 and plan.get("output_uri"):
        mirror = checkpoints.Mirror(plan["output_uri"], node_rank=node_rank,
                                    num_nodes=int(plan.get("num_machines", 1)), is_main=rank == 0,
                                    keep=spec.resilience.save_total_limit)
    status = Status(Path(plan["workdir"]), plan.get("output_uri")) if rank == 0 else None
    args = _training_args(spec, plan)
    callbacks = _callbacks(plan, collator, stop, mirror, status)
    trainer = lora.trainer_class(spec, SFTTrainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
        data_collator=collator, peft_config=peft_config, callbacks=callbacks)
    lora_init = lora.save_initial(trainer.model, Path(plan["workdir"]), spec) if rank == 0 else None
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Progress callback prints the JSON + human lines
    trainer.train(resume_from_checkpoint=plan.get("resume_from"))
    if eval_ds is not None and not stop.reason:
        last = callbacks[0].last_eval  # an eval_steps evaluation at the final step is not run twice
        same = torch.tensor(int(bool(last and last[0] == trainer.state.global_step)), device=trainer.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(same, 0)  # rank 0 saw the logs; evaluate() is collective: all ranks agree
        metrics = (last[1] if last else {}) if same.item() else trainer.evaluate()
        if rank == 0:
            (Path(plan["workdir"]) / "eval_loss.json").write_text(json.dumps(metrics))

    stopped = Path(plan["workdir"]) / "stopped.json"
    if stop.reason == "sigterm":
        grace_left = plan["grace_seconds"] - 10 - (time.time() - stop.signalled_at)
        saved = mirror.wait(timeout=max(grace_left, 1)) if mirror else True
        if rank == 0:
            stopped.write_text(json.dumps({"reason": "sigterm", "step": trainer.state.global_step,
                                           "mirrored": bool(saved)}))
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        return int(ExitCode.INTERRUPTED)

    trainer.save_model(plan["adapter_dir"])  # gathers under ZeRO-3/FSDP; all ranks must call it
    if rank == 0:
        tok.save_pretrained(plan["adapter_dir"])
        if lora_init:  # PiSSA/OLoRA: publish an adapter that fits the original base
            lora.convert_residual(Path(plan["adapter_dir"]), lora_init)
    saved = mirror.wait(timeout=600) if mirror else True
    if rank == 0 and stop.reason == "deadline":
        stopped.write_text(json.dumps({"reason": "deadline", "step": trainer.state.global_step,
                                       "mirrored": bool(saved)}))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from job import logsetup

    logsetup.setup(os.environ.get("SFTJOB_DEBUG") == "1")
    plan = json.loads(Path(argv[0]).read_text())
    if plan["spec"].get("train", {}).get("objective") == "dpo":
        from job.train import dpo

        return dpo.train(plan)
    return train(plan)


if __name__ == "__main__":
    raise SystemExit(main())
