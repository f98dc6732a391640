"""Resume on another world size: a checkpoint saved by N processes continues with M ≠ N.

Kueue re-admits a preempted job on whatever capacity is free, and per-rank state cannot follow:
DeepSpeed's ZeRO shards (its loader refuses another world size) and FSDP's sharded parameters. So every
checkpoint also carries:

- ``sftjob_world.json``: the strategy, process count and micro-batch × accumulation it was saved with,
  the method, and the run's original global batch;
- ``portable/trainable.pt``: every trainable tensor and its Adam moments gathered to full tensors
  (``safe_get_full_*`` under ZeRO, ``DTensor.full_tensor()`` under FSDP2, the plain optimizer state
  otherwise) and the Adam step, in fp32. Independent of the world size and of the strategy.
  For LoRA it is small (the adapter ×3) and always written. For a full fine-tune it is the whole model
  ×3 (12 bytes a parameter: 1B parameters → 12 GB per checkpoint, held in rank 0's CPU memory while it
  is written, and uploaded with the checkpoint), so it is written only while it fits
  ``resilience.portable_max_gb`` (default 16 GB ≈ 1.3B parameters); a bigger model logs a warning once
  and its checkpoints resume only on their own strategy and process count.

On resume (`plan_resume`, in the launcher) the checkpoint's layout is compared with this run's:
the same layout resumes natively; a different one resumes from ``portable/`` — the trainer still reads
trainer_state.json (global step, data skip) and scheduler.pt, but weights and optimizer state come from
the portable file, set after the optimizer exists (`attach`): ZeRO through ``safe_set_full_*``, FSDP by
cutting this rank's shard of each DTensor locally. DDP and single-process checkpoints are already
world-size independent (full optimizer.pt), so they resume natively on any count.

The global batch is kept: micro-batch × accumulation × processes stays what the run started with
(`choose_batch`). The data order then stays the same too: the sampler is one seeded permutation for
every world size (accelerate's seedable sampler) and each optimizer step consumes the next
global-batch of it (rank r takes every M-th micro-batch), and the trainer's skip on resume
(global_step × accumulation micro-batches per rank) lands exactly after the last trained sample.
A checkpoint that cannot be used on another layout (per-rank state with no portable/: one from before
portable/ existed, or a full fine-tune over portable_max_gb) is a clear exit 70, never a crash.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from job.errors import VerificationError

log = logging.getLogger("sftjob.reshard")

WORLD_FILE = "sftjob_world.json"
PORTABLE_FILE = "portable/trainable.pt"


class CheckpointUnusableError(VerificationError):
    kind = "checkpoint"


def layout(strategy: str, processes: int, zero_stage: int | None) -> str:
    """What a checkpoint's optimizer/model state depends on. Single and DDP write one full optimizer.pt
    (any count can read it); DeepSpeed and FSDP write per-rank state."""
    if strategy in ("single", "ddp"):
        return "full"
    if strategy == "deepspeed":
        return f"zero{zero_stage}x{processes}"
    return f"{strategy}x{processes}"


def choose_batch(global_batch: int, micro: int, processes: int) -> tuple[int, int, bool]:
    """(micro-batch, accumulation, exact) for `processes` keeping `global_batch`: the micro-batch never
    grows past the configured one (memory); of the splits closest to the global batch, the largest
    micro-batch wins (fewest accumulation passes)."""
    options = []
    for b in range(1, micro + 1):
        lo = max(1, global_batch // (b * processes))
        for a in (lo, lo + 1):
            options.append((abs(b * a * processes - global_batch), -b, a))
    diff, neg_b, a = min(options)
    return -neg_b, a, diff == 0


@dataclass
class Resume:
    mode: str  # fresh | native | portable
    spec: object  # the RunSpec to train with (batch possibly recomputed)
    record: dict  # what this run writes as sftjob_world.json
    message: str | None = None  # the batch change, for the log and status.json events


def _record(spec, topo, global_batch: int) -> dict:
    t, d = spec.train, spec.distributed
    return {"strategy": topo.strategy, "num_processes": topo.num_processes, "num_machines": topo.num_machines,
            "zero_stage": d.zero_stage if topo.strategy == "deepspeed" else None,
            "layout": layout(topo.strategy, topo.num_processes, d.zero_stage),
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "global_batch": global_batch,
            "method": t.method}


def _saved_layout(ckpt: Path) -> tuple[dict | None, str]:
    """The checkpoint's record and layout; a checkpoint from before sftjob_world.json is read from its files."""
    f = ckpt / WORLD_FILE
    if f.is_file():
        try:
            rec = json.loads(f.read_text())
        except (ValueError, RecursionError):
            rec = None
        if not _well_formed(rec):  # it comes back from the store: a value of another type crashed the resume
            raise CheckpointUnusableError(f"{ckpt.name}/{WORLD_FILE} is unreadable",
                                          hint="remove that checkpoint from the output, or pass --resume false")
        return rec, rec["layout"]
    shards = list(ckpt.glob("global_step*/*optim_states.pt"))
    if shards:  # ZeRO-3 also writes one model-states file per rank; ZeRO-1/2 one in all
        stage = 3 if list(ckpt.glob("global_step*/zero_pp_rank_*_model_states.pt")) else 2
        return None, f"zero{stage}x{len(shards)}"
    if (ckpt / "optimizer.pt").is_file():
        return None, "full"
    return None, "unknown"


def _well_formed(rec) -> bool:
    """The fields plan_resume reads, with the types this job writes."""
    def count(k):
        return k not in rec or rec[k] is None or (type(rec[k]) is int and rec[k] > 0)

    return (isinstance(rec, dict) and isinstance(rec.get("layout"), str) and count("global_batch")
            and count("num_processes") and isinstance(rec.get("method", ""), (str, type(None))))


def _saved_processes(ckpt: Path) -> int | None:
    """How many processes wrote `ckpt`: the Trainer saves one rng_state_<rank>.pth each (rng_state.pth alone)."""
    ranks = list(ckpt.glob("rng_state_*.pth"))
    return len(ranks) if ranks else 1 if (ckpt / "rng_state.pth").is_file() else None


def plan_resume(ckpt: Path | None, spec, topo) -> Resume:
    """How this run resumes from `ckpt` (None: a fresh start), with the global batch kept."""
    t = spec.train
    mine = layout(topo.strategy, topo.num_processes, spec.distributed.zero_stage)
    if ckpt is None:
        g = t.per_device_train_batch_size * t.gradient_accumulation_steps * topo.num_processes
        return Resume("fresh", spec, _record(spec, topo, g))
    rec, saved = _saved_layout(ckpt)
    if rec is None and saved.startswith("zero"):  # from before sftjob_world.json: DeepSpeed's shards tell the count
        if saved.split("x")[-1] == mine.split("x")[-1] == str(topo.num_processes):
            saved = mine  # on the same count: resume as it always did
    elif rec is None and topo.strategy != "deepspeed":  # DeepSpeed reads only its own global_step* shards
        # Single and DDP read a full optimizer.pt on any count. FSDP writes an optimizer.pt too, but one that
        # only its own count can read: the Trainer's RNG file per rank tells that count.
        n = _saved_processes(ckpt)
        same = mine == "full" or n in (None, topo.num_processes)
        saved = mine if same else layout(topo.strategy, n, spec.distributed.zero_stage)
    mode = "native"
    if saved != mine:
        if (ckpt / PORTABLE_FILE).is_file():
            mode = "portable"
        elif saved == "full" and topo.strategy in ("single", "ddp"):
            mode = "native"
        else:
            why = ("it has no world-size-independent form: portable/ was not written (a full fine-tune larger "
                   "than resilience.portable_max_gb)" if rec and rec.get("method") == "full" else
                   "it has no world-size-independent form (a checkpoint from before portable/ existed)")
            raise CheckpointUnusableError(
                f"checkpoint {ckpt.name} was saved as {saved} and this run is {mine}: {why}",
                hint="rerun with the checkpoint's process count and strategy, or pass --resume false to start over"
                     + ("; raise --portable-max-gb for the next run" if rec and rec.get("method") == "full" else ""))
    g = int(rec["global_batch"]) if rec and rec.get("global_batch") else \
        t.per_device_train_batch_size * t.gradient_accumulation_steps * topo.num_processes
    message = None
    processes_then = rec.get("num_processes") if rec else None
    split_now = t.per_device_train_batch_size * t.gradient_accumulation_steps * topo.num_processes
    # another count, or another micro-batch / accumulation on the same count (e.g. a smaller micro-batch
    # after an OOM): the global batch is part of the run (job/identity.py leaves the split free to change)
    if (processes_then and processes_then != topo.num_processes) or split_now != g:
        micro, accum, exact = choose_batch(g, t.per_device_train_batch_size, topo.num_processes)
        got = micro * accum * topo.num_processes
        change = (f"world size {processes_then} → {topo.num_processes}" if processes_then != topo.num_processes
                  else f"micro-batch × accumulation {t.per_device_train_batch_size} × {t.gradient_accumulation_steps}")
        message = (f"{change} ({mode} resume from {ckpt.name}): "
                   f"micro-batch {micro} × accumulation {accum} × {topo.num_processes} processes = global batch {got}"
                   + (" (kept)" if exact else f" (the run's {g} cannot be kept exactly; closest chosen)"))
        spec = spec.model_copy(update={"train": t.model_copy(update={
            "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum})})
    return Resume(mode, spec, _record(spec, topo, g), message)


# --- inside a rank -------------------------------------------------------------------------------


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


REFUSED_FILE = "resume_refused.json"
DEFAULT_MAX_GB = 16.0  # resilience.portable_max_gb's default (job/spec.py)


def raise_if_refused(workdir: Path) -> None:
    """The launcher's side of a refusal inside the ranks (the launcher itself can only exit 1)."""
    f = Path(workdir) / REFUSED_FILE
    if f.is_file():
        doc = json.loads(f.read_text())
        raise CheckpointUnusableError(doc["message"], hint=doc.get("hint"))


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
