"""One DPO training rank: the prepared pairs (never tokenized here), the base model, PEFT, TRL's DPOTrainer.

Started like SFT (job.train.sft dispatches here on train.objective: dpo) and shares its callbacks, stop flag,
checkpoint mirror, status and save path, so preemption, resume and publish behave the same. With LoRA the
reference is the base with the adapter disabled (TRL does that when ref_model is None and the model is a PEFT
model); for full fine-tunes TRL loads a frozen copy (prepared for DeepSpeed/FSDP like the policy).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from job.errors import ConfigError, ExitCode
from job.train.sft import (
    SIGTERM_RESERVE_SECONDS,
    StopFlag,
    _callbacks,
    _load_model,
    _load_tokenizer,
    _mirror_reports,
    _stopped,
    _training_args,
)

SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the TRL 1.16 losses that read label_smoothing


def check(spec) -> None:
    """DPO settings that could never train: refused before fetch/prepare (exit 64), not as a rank's traceback."""
    if spec.train.objective != "dpo":
        return
    t = spec.train
    if spec.data.packing:
        raise ConfigError("data.packing with objective dpo: a pair is two separate sequences, never packed",
                          hint="drop data.packing for DPO runs")
    if t.loss_type == "exo_pair" and t.label_smoothing == 0:
        raise ConfigError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)",
                          hint="set train.label_smoothing: 0.001")
    if t.label_smoothing and t.loss_type not in SMOOTHED:
        raise ConfigError(f"label_smoothing has no effect with loss_type {t.loss_type} (TRL 1.16 reads it only for "
                          f"{', '.join(SMOOTHED)})", hint="use loss_type robust for noisy labels, or drop label_smoothing")


class PairCollator:
    """Pads prepared pairs into TRL's DPO batch: chosen rows then rejected rows, completion_mask = trained labels.

    The labels come from job.data.preference (the SFT masking of the completion plus end-of-turn), so the
    template's scaffolding after the turn is context, not completion. Counts tokens for the progress lines.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows] + \
               [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        comp = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (x, lab) in enumerate(seqs):
            n = len(x)
            ids[i, :n] = torch.as_tensor(x, dtype=torch.long)
            attn[i, :n] = 1
            comp[i, :n] = torch.as_tensor(lab, dtype=torch.long) != -100
            self.tokens += n
            self.trained_tokens += int(comp[i].sum())
        out = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
        for k in ("ref_chosen_logps", "ref_rejected_logps"):  # precompute_ref_log_probs
            if k in rows[0]:
                out[k] = torch.tensor([r[k] for r in rows])
        return out


def trainer_base():
    from trl import DPOTrainer

    class PreparedDPOTrainer(DPOTrainer):
        """DPOTrainer on data job.data.preference already tokenized and masked: TRL's own preparation is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreparedDPOTrainer


def dpo_args(spec, plan: dict):
    from trl import DPOConfig

    t = spec.train
    return _training_args(spec, plan, DPOConfig, extra=dict(
        beta=t.beta, loss_type=[t.loss_type], label_smoothing=t.label_smoothing,
        precompute_ref_log_probs=t.precompute_ref_log_probs, max_length=None))


def train(plan: dict) -> int:
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from job import checkpoints, storage
    from job.spec import RunSpec, StorageSpec
    from job.status import Status
    from job.train import lora

    spec = RunSpec.model_validate(plan["spec"])
    live = os.environ.get("SFTJOB_RANK_STORAGE")
    storage.configure(StorageSpec.model_validate_json(live) if live else spec.storage)
    torch.manual_seed(spec.train.seed)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(plan.get("node_rank", 0))
    stop = StopFlag(plan.get("deadline"))

    tok = _load_tokenizer(spec, plan)  # job.loader, as SFT: added tokens, the run's template, a pad token
    train_ds = Dataset.from_parquet(plan["train_path"])
    eval_ds = Dataset.from_parquet(plan["eval_path"]) if plan.get("eval_path") else None
    collator = PairCollator(tok.pad_token_id)

    model = _load_model(spec, plan, len(tok))
    peft_config = lora.peft_config(spec) if spec.train.method in ("lora", "qlora") else None
    if plan.get("adapter_path"):  # SFT → DPO: the policy starts from the published adapter, and TRL keeps a
        from peft import PeftModel  # frozen copy of it ("ref" adapter) as the reference: no second base

        model = PeftModel.from_pretrained(model, plan["adapter_path"], is_trainable=True)
        peft_config = None
    status = Status(Path(plan["workdir"]), plan.get("output_uri")) if rank == 0 else None
    mirror = None
    if local_rank == 0 and plan.get("output_uri"):
        mirror = checkpoints.Mirror(plan["output_uri"], node_rank=node_rank,
                                    num_nodes=int(plan.get("num_machines", 1)), is_main=rank == 0,
                                    keep=spec.resilience.save_total_limit, **_mirror_reports(plan, status))
    from job.train import watchdog

    callbacks = _callbacks(plan, collator, stop, mirror, status) + [watchdog.heartbeat_callback()]
    if plan.get("deepspeed_config"):  # the frozen reference is a DeepSpeed engine built before the policy's:
        import deepspeed  # without this it sees a world of 1 and refuses the batch sizes

        deepspeed.init_distributed()
    trainer = lora.trainer_class(spec, trainer_base())(
        model=model, args=dpo_args(spec, plan), train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
        data_collator=collator, peft_config=peft_config, callbacks=callbacks)
    lora_init = lora.save_initial(trainer.model, Path(plan["workdir"]), spec) if rank == 0 else None
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=plan.get("resume_from"))
    if eval_ds is not None and not stop.reason:
        metrics = trainer.evaluate()  # collective; reward accuracy and margin of the adapter on the eval pairs
        if rank == 0:
            (Path(plan["workdir"]) / "eval_loss.json").write_text(json.dumps(metrics))

    stopped = Path(plan["workdir"]) / "stopped.json"
    if stop.reason == "sigterm":
        grace_left = plan["grace_seconds"] - SIGTERM_RESERVE_SECONDS - (time.time() - stop.signalled_at)
        watchdog.beat("uploading")
        saved = mirror.wait(timeout=max(grace_left, 1)) if mirror else True
        if rank == 0:
            stopped.write_text(json.dumps(_stopped("sigterm", trainer.state.global_step, saved, mirror)))
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        return int(ExitCode.INTERRUPTED)

    trainer.save_model(plan["adapter_dir"])  # gathers under ZeRO-3/FSDP; all ranks must call it
    if rank == 0:
        tok.save_pretrained(plan["adapter_dir"])
        import shutil

        shutil.rmtree(Path(plan["adapter_dir"]) / "ref", ignore_errors=True)  # the frozen reference copy
        if lora_init:
            lora.convert_residual(Path(plan["adapter_dir"]), lora_init)
    watchdog.beat("uploading")
    saved = mirror.wait(timeout=spec.resilience.store_wait_seconds) if mirror else True
    if rank == 0 and stop.reason == "deadline":
        stopped.write_text(json.dumps(_stopped("deadline", trainer.state.global_step, saved, mirror)))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0
