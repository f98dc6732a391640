"""One training rank: load the prepared data (never tokenize here), the base model, PEFT, SFTTrainer.

Started by launch.py as ``python -m job.train.sft PLAN.json`` (single process) or under
``accelerate launch`` (every rank). The plan file carries the resolved spec and local paths.
Exit 0 when trained and saved; 75 when stopped by SIGTERM or the deadline after a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job import logsetup
from job.errors import ExitCode
from job.train import watchdog
from job.train.collate import Collator
from job.train.recipe import Recipe, training_args

log = logging.getLogger("sftjob.train")
REWARD_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")  # DPO's, when logged


class StopFlag:
    """SIGTERM / deadline flag, agreed across ranks each step so all stop at the same step.

    What this rank was asked (``requested``: the signal handler, the deadline) is kept apart from what the
    ranks agreed (``reason``). A SIGTERM whose handler runs while an agreement is in flight (after the
    all-reduce has read the flags, before its verdict is stored) used to be overwritten by that verdict
    and lost: the run trained to the end and was killed at the grace period. Now it joins the next step's
    agreement."""

    CODES = {None: 0, "deadline": 1, "sigterm": 2}
    NAMES = {v: k for k, v in CODES.items()}

    def __init__(self, deadline: float | None):
        self.requested: str | None = None
        self.reason: str | None = None
        self.deadline = deadline
        self.signalled_at: float | None = None
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signalled_at is None:
            self.requested = "sigterm"
            self.signalled_at = time.time()
            logsetup.event("sigterm", "sftjob: SIGTERM received — finishing the step, then checkpointing",
                           message="SIGTERM received: finishing the step, then checkpointing")

    def agreed(self, step_seconds: float) -> str | None:
        """At a step's end: the reason every rank stops for (or None), the same on all of them."""
        if self.requested is None and self.deadline and time.time() + 3 * step_seconds + 10 > self.deadline:
            self.requested = "deadline"
        return self._agree()

    def settle(self) -> str | None:
        """After training: one last agreement, so a SIGTERM that came after the last step's sends every rank
        down the same ending (saving under ZeRO-3/FSDP is collective)."""
        return self._agree()

    def _agree(self) -> str | None:
        code = max(self.CODES[self.reason], self.CODES[self.requested])  # read once: the handler may run below
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            t = torch.tensor([code], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        self.reason = self.NAMES[code]
        return self.reason


def _callbacks(plan: dict, collator: Collator, stop: StopFlag, mirror, status, trackers=()):
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
                logsetup.event("eval", f"eval step {rec['step']}  eval_loss {rec['eval_loss']:.4f}", **rec)
                for t in trackers:
                    t.eval(state.global_step, logs)
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
            rewards = "".join(f"  {label} {rec[k]:.3f}" for k, label in zip(REWARD_KEYS, ("reward acc", "margin"), strict=False)
                              if rec.get(k) is not None)
            logsetup.event("progress", f"step {rec['step']}/{rec['max_steps']}  loss {rec['loss']:.4f}{rewards}  "
                           f"{rec['tokens_per_second']:.0f} tok/s  eta {rec['eta_seconds']:.0f}s", **rec)
            for t in trackers:
                t.progress(rec)
            if status:
                status.update(step=rec["step"], max_steps=rec["max_steps"], epoch=rec["epoch"], loss=rec["loss"],
                              tokens_per_second=rec["tokens_per_second"], eta_seconds=rec["eta_seconds"],
                              **{k.replace("rewards/", "reward_"): rec[k] for k in REWARD_KEYS[:2] if k in rec})

        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            from job import history
            from job.train import trackers

            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero:  # the one writer of metrics.jsonl (node 0, whose mirror seals)
                history.carry_history(metrics_path, ckpt)
                history.carry_tensorboard(Path(trackers.tensorboard_dir(plan["workdir"])), ckpt)
            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank's shard is on disk before the node uploads
            if mirror is not None:
                mirror.submit(ckpt, state.global_step)

    return [Progress()]


def _load_tokenizer(spec, plan: dict):
    from job.data.templates import apply_template, locate_tokenizer
    from job.loader import load_tokenizer

    # model.tokenizer when set, as prepare tokenized with it (a cache hit on this node: no download)
    tok = load_tokenizer(locate_tokenizer(spec, plan["model_dir"]), add_special_tokens=spec.model.add_special_tokens,
                         trust_remote_code=spec.model.trust_remote_code)
    apply_template(tok, Path(plan["chat_template_path"]).read_text())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_model(spec, plan: dict, vocab: int):
    """Through job.loader (as eval, export and merge): new special tokens grow the embeddings to `vocab`."""
    from job.loader import load_model

    return load_model(plan["model_dir"], spec, precision=plan["mixed_precision"], attn=plan["attn_implementation"],
                      vocab=vocab, training=True)


def sft_recipe(spec, plan: dict, tok) -> Recipe:
    from trl import SFTTrainer

    fast = plan.get("fast_path") or {}
    collator = Collator(tok.pad_token_id, packed=spec.data.packing,
                        flatten=fast.get("attention", {}).get("flatten", plan["attn_implementation"] == "flash_attention_2"))
    return Recipe(collator, SFTTrainer, lambda: training_args(spec, plan))


def train(plan: dict, recipe_for: Callable[[Any, dict, Any], Recipe] = sft_recipe) -> int:
    import torch
    from datasets import Dataset

    from job import checkpoints, storage
    from job.spec import RunSpec, StorageSpec
    from job.status import Status
    from job.train import lora, portable, trackers

    spec = RunSpec.model_validate(plan["spec"])
    live = os.environ.get("SFTJOB_RANK_STORAGE")  # set by launch when plan.json had to mask the storage section
    storage.configure(StorageSpec.model_validate_json(live) if live else spec.storage)
    torch.manual_seed(spec.train.seed)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(plan.get("node_rank", 0))
    stop = StopFlag(plan.get("deadline"))

    tok = _load_tokenizer(spec, plan)
    train_ds = Dataset.from_parquet(plan["train_path"])
    eval_ds = Dataset.from_parquet(plan["eval_path"]) if plan.get("eval_path") else None
    recipe = recipe_for(spec, plan, tok)

    model = _load_model(spec, plan, len(tok))
    peft_config = lora.peft_config(spec) if spec.train.method in ("lora", "qlora") else None
    if plan.get("adapter_path"):  # continue a (verified, shape-checked) parent adapter: its config wins
        from peft import PeftModel  # (DPO: TRL keeps a frozen copy of it as the reference: no second base)

        model = PeftModel.from_pretrained(model, plan["adapter_path"], is_trainable=True)
        peft_config = None
    status = Status(Path(plan["workdir"]), plan.get("output_uri")) if rank == 0 else None
    mirror = None
    if local_rank == 0 and plan.get("output_uri"):
        mirror = checkpoints.Mirror(plan["output_uri"], node_rank=node_rank,
                                    num_nodes=int(plan.get("num_machines", 1)), is_main=rank == 0,
                                    keep=spec.resilience.save_total_limit, identity=plan.get("identity"),
                                    **_mirror_reports(plan, status))
    if "tensorboard" in spec.train.report_to:  # TensorBoardCallback's dir; published as <output>/tensorboard/
        os.environ["TENSORBOARD_LOGGING_DIR"] = trackers.tensorboard_dir(plan["workdir"])
    tracks = trackers.trackers(spec.train.report_to, plan, status, rank)
    callbacks = _callbacks(plan, recipe.collator, stop, mirror, status, tracks) + [watchdog.heartbeat_callback()]
    if recipe.before_trainer:
        recipe.before_trainer()
    trainer = lora.trainer_class(spec, recipe.trainer_class)(
        model=model, args=recipe.args(), train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
        data_collator=recipe.collator, peft_config=peft_config, callbacks=callbacks)
    lora_init = lora.save_initial(trainer.model, Path(plan["workdir"]), spec) if rank == 0 else None
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Progress callback prints the JSON + human lines
    portable.attach(trainer, plan)  # world-size-independent checkpoints; resume from one when planned
    try:
        trainer.train(resume_from_checkpoint=plan.get("resume_from"))
    except BaseException:
        for t in tracks:
            t.end(interrupted=True)
        raise
    stop.settle()
    if eval_ds is not None and not stop.reason:
        last = callbacks[0].last_eval  # an eval_steps evaluation at the final step is not run twice
        same = torch.tensor(int(bool(last and last[0] == trainer.state.global_step)), device=trainer.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(same, 0)  # rank 0 saw the logs; evaluate() is collective: all ranks agree
        metrics = (last[1] if last else {}) if same.item() else trainer.evaluate()
        if rank == 0:
            (Path(plan["workdir"]) / "eval_loss.json").write_text(json.dumps(metrics))
    for t in tracks:
        t.end(interrupted=stop.reason == "sigterm")

    stopped = Path(plan["workdir"]) / "stopped.json"
    if stop.reason == "sigterm":
        # the ranks' share of the grace period; the rest is for teardown and the entrypoint's last status
        grace_left = plan["grace_seconds"] - SIGTERM_RESERVE_SECONDS - (time.time() - (stop.signalled_at or time.time()))
        watchdog.beat("uploading")
        saved = mirror.wait(timeout=max(grace_left, 1)) if mirror else True
        if rank == 0:
            stopped.write_text(json.dumps(_stopped("sigterm", trainer.state.global_step, saved, mirror)))
        if status:
            status.flush(2)
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        return int(ExitCode.INTERRUPTED)

    trainer.save_model(plan["adapter_dir"])  # gathers under ZeRO-3/FSDP; all ranks must call it
    if rank == 0:
        tok.save_pretrained(plan["adapter_dir"])
        for name in recipe.drop_from_adapter:
            shutil.rmtree(Path(plan["adapter_dir"]) / name, ignore_errors=True)
        if lora_init:  # PiSSA/OLoRA: publish an adapter that fits the original base
            lora.convert_residual(Path(plan["adapter_dir"]), lora_init)
    watchdog.beat("uploading")
    # the adapter is safe locally; the final checkpoint only matters if publishing fails, so wait for it
    # no longer than the run waits for the store at its end
    saved = mirror.wait(timeout=spec.resilience.store_wait_seconds) if mirror else True
    if rank == 0 and stop.reason == "deadline":
        stopped.write_text(json.dumps(_stopped("deadline", trainer.state.global_step, saved, mirror)))
    if status:
        status.flush(2)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


#: seconds of the grace period left after the ranks stop waiting for the store: rank teardown, the
#: entrypoint's last status.json (FINAL_FLUSH_SECONDS) and interpreter exit (seconds of GC on a busy node)
SIGTERM_RESERVE_SECONDS = 25


def _mirror_reports(plan: dict, status) -> dict:
    """Mirror callbacks: the newest stored checkpoint and every failed mirror go into status.json (rank 0)."""
    resumed = plan.get("resume_from")
    out: dict = {"resumed_step": int(Path(resumed).name.rsplit("-", 1)[-1]) if resumed else None}
    if status:
        out["on_complete"] = lambda step: status.update(checkpoint=step)
        out["on_error"] = lambda step, e: status.update(
            event=("checkpoint_failed", f"checkpoint step-{step} could not be stored in the output: {e}"))
    return out


def _stopped(reason: str, step: int, saved: bool, mirror) -> dict:
    """stopped.json: what the entrypoint says about the stop, and which checkpoint the next attempt uses."""
    doc = {"reason": reason, "step": step, "mirrored": bool(saved)}
    if mirror is not None:
        doc["resume_step"] = step if saved else mirror.last_complete
        if not saved:
            doc["mirror_error"] = str(mirror.error or "not stored")[:500]
    return doc


def unneeded_libraries(plan: dict) -> list[str]:
    """Libraries this rank never uses, hidden from it: accelerate and TRL import DeepSpeed wherever it is
    installed (accelerate's extract_model_from_parallel), and DeepSpeed's autotuner imports MLflow, 1.1 s per
    rank start measured with -X importtime. DeepSpeed is used only with a DeepSpeed config (ZeRO), MLflow only
    when a tracker asks for it (job/train/trackers.py)."""
    names = []
    if not plan.get("deepspeed_config"):
        names.append("deepspeed")
    if "mlflow" not in ((plan.get("spec") or {}).get("train") or {}).get("report_to", []):
        names.append("mlflow")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from job import checkpoints

    logsetup.setup(os.environ.get("SFTJOB_DEBUG") == "1")
    plan = json.loads(Path(argv[0]).read_text())
    for name in unneeded_libraries(plan):
        sys.modules.setdefault(name, None)  # import raises ImportError, find_spec says "not installed"
    beacon = watchdog.rank_start(plan["workdir"], int(plan.get("node_rank", 0)))  # dies with its launcher
    from job import objectives

    try:
        code = train(plan, objectives.get(plan["spec"].get("train", {}).get("objective", "sft")).recipe)
    except SystemExit as e:
        beacon.exit(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        beacon.exit(1, f"{type(e).__name__}: {first}")
        raise
    beacon.exit(code)
    if checkpoints.uploads_in_flight():
        # an upload hung on a frozen store sits in a transfer pool that interpreter exit would join;
        # the outcome is on disk (stopped.json, the adapter): leave now, within the grace period
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
