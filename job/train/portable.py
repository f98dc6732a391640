"""Inside a rank: the world-size-independent form of a checkpoint (job/train/reshard.py plans its use).

At every save each rank joins in gathering the trainable tensors and their Adam moments to full tensors
(ZeRO's safe_get_full_*, FSDP2's DTensor.full_tensor(), the plain optimizer state otherwise) and rank 0
writes them as ``portable/trainable.pt`` with ``sftjob_world.json``; on a resume the launcher planned as
portable, each rank sets its own part back after the optimizer exists (`attach`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from job.train.reshard import PORTABLE_FILE, REFUSED_FILE, WORLD_FILE, CheckpointUnusableError

log = logging.getLogger("sftjob.reshard")
DEFAULT_MAX_GB = 16.0  # resilience.portable_max_gb's default (job/spec.py)


def _base_optimizer(opt):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (it holds the Adam state)."""
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _zero_optimizer(opt):
    while opt is not None and not hasattr(opt, "_lazy_init_hp_params_optimizer_state") and \
            not type(opt).__name__.startswith("DeepSpeedZeroOptimizer"):
        opt = getattr(opt, "optimizer", None)
    return opt


def _trainable(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _is_zero(p) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _is_dtensor(t) -> bool:
    """FSDP2 shards each parameter (and Adam's moments, created like it) as a DTensor over the ranks."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _full(t):
    """The whole tensor on every rank: an all-gather for a DTensor (collective: every rank calls it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _set_full(dst, full) -> None:
    """Copy a whole tensor into `dst`: into this rank's shard of a DTensor (cut locally, no communication)."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(shard.to_local())
    else:
        dst.data.copy_(full.to(dst.device, dst.dtype).reshape(dst.shape))


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 params are empty outside a gather


def portable_bytes(params: dict) -> int:
    """Size of the portable form: fp32 weights + Adam's two moments."""
    return 12 * sum(_numel(p) for p in params.values())


def _step(base) -> int:
    steps = [float(st["step"]) for st in base.state.values() if isinstance(st, dict) and "step" in st]
    return int(max(steps)) if steps else 0


def save_portable(trainer, ckpt: Path, record: dict, portable: bool) -> None:
    """Every rank calls this (the ZeRO gathers are collective); rank 0 writes."""
    import torch

    rank0 = trainer.accelerator.is_main_process
    if portable:
        params = _trainable(trainer)
        if any(_is_zero(p) for p in params.values()):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        base = _base_optimizer(trainer.optimizer)
        zero = _zero_optimizer(trainer.optimizer)
        if zero is not None and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each param to its Adam state once, right after the first group's first step:
            # a second param group (a full fine-tune's no-decay norms) has no state yet and stays unlinked
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        blob = {"format": 1, "step": _step(base), "params": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for name, p in params.items():
            if _is_zero(p):
                w = safe_get_full_fp32_param(p)
                m, v = (safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq"))
            else:  # plain tensors, or FSDP's DTensors gathered
                st = base.state.get(p, {})
                w, m, v = (_full(t) if t is not None else None
                           for t in (p.detach(), st.get("exp_avg"), st.get("exp_avg_sq")))
            if rank0:
                blob["params"][name] = w.detach().float().cpu().clone()
                for key, val in (("exp_avg", m), ("exp_avg_sq", v)):
                    blob[key][name] = (val.detach().float().cpu().clone() if val is not None
                                       else torch.zeros_like(blob["params"][name]))
        if rank0:
            dest = ckpt / PORTABLE_FILE
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.save(blob, str(dest) + ".tmp")
            os.replace(str(dest) + ".tmp", dest)
    if rank0:
        (ckpt / WORLD_FILE).write_text(json.dumps(record, indent=1))


def load_portable(trainer, checkpoint: str) -> None:
    """Weights, Adam moments and step from portable/, then the scheduler: replaces the trainer's
    _load_optimizer_and_scheduler, which runs after the optimizer (and any DeepSpeed engine) exists."""
    import torch

    blob = torch.load(Path(checkpoint) / PORTABLE_FILE, map_location="cpu", weights_only=True)
    params = _trainable(trainer)
    shapes = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in params.items()}  # DTensor: global
    saved = {n: tuple(t.shape) for n, t in blob["params"].items()}
    if shapes != saved:
        diff = sorted(n for n in set(shapes) | set(saved) if shapes.get(n) != saved.get(n))
        raise CheckpointUnusableError(
            f"checkpoint {Path(checkpoint).name}: its trainable tensors do not match this run's "
            f"{'LoRA' if any('lora_' in n for n in shapes) else 'model'} "
            f"({len(diff)} differ, e.g. {diff[0]}: saved {saved.get(diff[0])}, now {shapes.get(diff[0])})",
            hint="keep the run's model, method and LoRA settings (lora_r, target_modules, modules_to_save), "
                 "or pass --resume false")
    zeroed = any(_is_zero(p) for p in params.values())
    if zeroed:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    base = _base_optimizer(trainer.optimizer)
    zero = _zero_optimizer(trainer.optimizer)
    flats = [p for g in base.param_groups for p in g["params"]]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-2, ZeRO-3
        flats += list(getattr(zero, attr, None) or [])
    for p in flats:  # Adam's state is created lazily at the first step: create it now
        if not base.state.get(p):
            base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
    if zero is not None and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False  # ZeRO-1/2: link each param's fragment to that state
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        w, m, v = blob["params"][name], blob["exp_avg"][name], blob["exp_avg_sq"][name]
        if hasattr(p, "ds_id"):  # ZeRO-3: the model's partition too (it is what the next forward uses)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(w.to(p.device, p.dtype).reshape(p.data.shape))
        else:  # ZeRO-1/2 keep the full low-precision param on every rank; FSDP this rank's shard
            with torch.no_grad():
                _set_full(p, w)
        if _is_zero(p):
            dev = p.device
            safe_set_full_fp32_param(p, w.to(dev))
            safe_set_full_optimizer_state(p, m.to(dev), "exp_avg")
            safe_set_full_optimizer_state(p, v.to(dev), "exp_avg_sq")
        else:
            with torch.no_grad():
                _set_full(base.state[p]["exp_avg"], m)
                _set_full(base.state[p]["exp_avg_sq"], v)
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], blob["step"]) if torch.is_tensor(st["step"]) else blob["step"]
    sched = Path(checkpoint) / "scheduler.pt"
    if sched.is_file():
        load_schedule(trainer.lr_scheduler, torch.load(sched, weights_only=True))
    log.info("resumed weights and optimizer state (Adam step %d, %d tensors) from %s", blob["step"], len(params),
             PORTABLE_FILE)


def load_schedule(scheduler, state: dict) -> None:
    """The saved schedule's position on this run's parameter groups, and each group's lr set now.

    Another strategy may group the parameters differently: DeepSpeed drops the empty no-decay group of a
    LoRA run (1 group) where single, DDP and FSDP keep it (2). The saved per-group lists then do not fit
    (torch's load_state_dict fails on them), so only the position (``last_epoch``) is taken and each group's
    lr is computed from it by this run's schedule, which the same spec makes the same schedule. The lr is
    written into the optimizer now because the schedule writes it only at its next step(), and the resumed
    step needs it (a native resume gets it from the optimizer's saved param_groups)."""
    groups = scheduler.optimizer.param_groups
    if len(state.get("base_lrs", groups)) == len(groups):
        scheduler.load_state_dict(state)
    else:
        import warnings

        scheduler.last_epoch = int(state["last_epoch"])
        scheduler._step_count = int(state.get("_step_count", scheduler.last_epoch + 1))
        with warnings.catch_warnings():  # get_lr() outside step() warns; here it is the point
            warnings.simplefilter("ignore")
            scheduler._last_lr = [float(lr) for lr in scheduler.get_lr()]
        log.info("the checkpoint's schedule had %d parameter group(s) and this run has %d: resumed at its step %d",
                 len(state["base_lrs"]), len(groups), scheduler.last_epoch)
    for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def attach(trainer, plan: dict) -> None:
    """Hook into one rank's trainer: write the portable form at every save; load it when planned."""
    from transformers import TrainerCallback

    record = plan.get("world") or {}
    limit_gb = float(((plan.get("spec") or {}).get("resilience") or {}).get("portable_max_gb", DEFAULT_MAX_GB))
    decided: list[bool] = []

    def portable() -> bool:
        """LoRA: always (small). A full fine-tune: while its portable form fits resilience.portable_max_gb.
        Every rank decides the same (global sizes), so the collective gathers stay matched."""
        if not decided:
            size = portable_bytes(_trainable(trainer))
            ok = record.get("method") in ("lora", "qlora") or size <= limit_gb * 1e9
            if not ok and trainer.accelerator.is_main_process:
                log.warning("checkpoints carry no portable/ copy (%.1f GB > resilience.portable_max_gb %g): they "
                            "resume only with this strategy and process count", size / 1e9, limit_gb)
            decided.append(ok)
        return decided[0]

    class SavePortable(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            save_portable(trainer, Path(args.output_dir) / f"checkpoint-{state.global_step}", record, portable())

    # first: the mirror (submitted by a later on_save) must see these files
    trainer.callback_handler.callbacks.insert(0, SavePortable())
    if plan.get("resume_mode") == "portable":
        import transformers.trainer as hf_trainer

        hf_trainer.deepspeed_load_checkpoint = lambda *a, **k: None  # its per-rank shards are for another world
        trainer._load_from_checkpoint = lambda *a, **k: None

        def load(ckpt):
            if not ckpt:
                return
            try:
                load_portable(trainer, ckpt)
            except CheckpointUnusableError as e:
                if trainer.accelerator.is_main_process:
                    (Path(plan["workdir"]) / REFUSED_FILE).write_text(json.dumps({"message": e.message,
                                                                                   "hint": e.hint}))
                raise

        trainer._load_optimizer_and_scheduler = load
