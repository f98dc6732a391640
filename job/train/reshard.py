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


REFUSED_FILE = "resume_refused.json"


def raise_if_refused(workdir: Path) -> None:
    """The launcher's side of a refusal inside the ranks (the launcher itself can only exit 1)."""
    f = Path(workdir) / REFUSED_FILE
    if f.is_file():
        doc = json.loads(f.read_text())
        raise CheckpointUnusableError(doc["message"], hint=doc.get("hint"))
