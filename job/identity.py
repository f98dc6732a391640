"""What defines a run: recorded in every checkpoint's COMPLETE marker, compared before a resume.

A checkpoint continues one run. Resumed under a spec that trains another model, on other data or on
another schedule, it publishes an adapter that is neither run, under a run.yaml naming only the second
(seen: `--lora-r 8` over an r16 checkpoint crashed every retry with 71; another `--data` resumed
silently; `--max-steps 2` over step 4 published a 4-step adapter with rc 0). So the fields that change
the model or the data are recorded with each checkpoint, and a resume under other values is refused
(64, never retried) with each difference listed.

Left out, because they may change on resume: process count, strategy, ZeRO stage and the micro-batch /
accumulation split (the global batch is kept: job/train/reshard.py), kernels and precision switches,
timeouts, trackers, logging, checkpoint cadence and output options.

Two stages. The spec's own fields are compared before anything is fetched (`check_before_fetch`). What is
known only after fetching (the base model's files, the parent adapter's sha256, the prepared data's
content key: data files, tokenizer files, template and preparation) is compared at the checkpoint the
launcher really resumes from (`check`, called by job/train/launch.py), before any rank starts.

The one deliberate exception: the run's length (train.max_steps, train.num_train_epochs) may change while
the learning rate does not depend on it (lr_scheduler_type constant, or constant_with_warmup with
warmup_ratio 0): the resumed run is then step for step the uninterrupted run of the new length. Never
below the checkpoint's step. A checkpoint from before this record exists resumes unchecked (a warning).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from job import redact
from job.errors import ConfigError

log = logging.getLogger("sftjob.identity")

#: spec fields that define the run (dotted paths of RunSpec); data.sources stands for data.path too
SPEC_FIELDS = (
    "model.path", "model.tokenizer", "model.adapter", "model.chat_template", "model.system_prompt",
    "model.system_prompt_mode", "model.add_special_tokens", "model.torch_dtype",
    "data.sources", "data.format", "data.columns", "data.roles", "data.eval_split", "data.eval_data",
    "data.max_length", "data.truncation", "data.train_on_eos", "data.packing", "data.shuffle",
    "train.objective", "train.method", "train.lora_r", "train.lora_alpha", "train.lora_dropout",
    "train.target_modules", "train.modules_to_save", "train.use_dora", "train.use_rslora",
    "train.init_lora_weights", "train.seed", "train.learning_rate", "train.lr_scheduler_type",
    "train.warmup_ratio", "train.weight_decay", "train.max_grad_norm", "train.optim", "train.loraplus_lr_ratio",
    "train.neftune_noise_alpha", "train.max_steps", "train.num_train_epochs",
    "train.beta", "train.loss_type", "train.label_smoothing", "train.precompute_ref_log_probs",
)
#: known after fetch and prepare: what the names above point at
CONTENT_FIELDS = {
    "model.files": "the base model's files changed under the same name",
    "model.adapter_sha256": "the parent adapter's files changed under the same name",
    "data.prepared": "the data files, the tokenizer files or the preparation changed under the same names",
    "chat_template.sha256": "the rendered chat template changed",
}
LENGTH = ("train.max_steps", "train.num_train_epochs")
_FLAT_LR = {"constant"}


def of_spec(spec) -> dict:
    """The spec's defining fields, as JSON values."""
    doc = spec.public_dict()
    out = {}
    for path in SPEC_FIELDS:
        if path == "data.sources":
            out[path] = [s.model_dump(mode="json") for s in spec.data_sources()]
            continue
        section, _, key = path.partition(".")
        out[path] = doc[section][key]
    return out


def of_run(spec, *, model_dir: str, prepared, adapter_sha256: str | None = None) -> dict:
    """Everything recorded with a checkpoint: the spec's fields and what they pointed at this time."""
    return {**of_spec(spec), "model.files": model_fingerprint(model_dir), "model.adapter_sha256": adapter_sha256,
            "data.prepared": Path(prepared.dir).name, "chat_template.sha256": prepared.template_sha256}


def model_fingerprint(model_dir: str, sample: int = 1 << 20) -> str:
    """A model directory's files: names and sizes, small files whole, large ones by their first and last MiB
    (a different checkpoint of the same shapes differs there; hashing 16 GB on every attempt would not do).
    A hub id as given, when the model is not a directory."""
    root = Path(model_dir)
    if not root.is_dir():
        return f"id:{model_dir}"
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # the cache's own bookkeeping (.sftjob-*), editors' and git's files
        size = p.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= 4 * sample:
                h.update(f.read())
            else:
                h.update(f.read(sample))
                f.seek(size - sample)
                h.update(f.read(sample))
    return h.hexdigest()[:24]


def differences(saved: dict, now: dict, step: int) -> list[str]:
    """One line per field that differs (old → new); fields only one side knows are not compared (a job
    version that records more fields must still resume an older checkpoint)."""
    from job.spec import FLAGS_BY_PATH

    flat = (now.get("train.lr_scheduler_type") in _FLAT_LR or (
        now.get("train.lr_scheduler_type") == "constant_with_warmup" and now.get("train.warmup_ratio") == 0))
    schedule_same = all(saved.get(k) == now.get(k) for k in ("train.lr_scheduler_type", "train.warmup_ratio")
                        if k in saved)
    lines = []
    for key in [*SPEC_FIELDS, *CONTENT_FIELDS]:
        if key not in saved or key not in now or _same(saved[key], now[key]):
            continue
        if key in LENGTH and flat and schedule_same:
            continue  # the exception: the LR does not depend on the length (see the module docstring)
        flag = " (--data, data.sources)" if key == "data.sources" else \
            f" (--{FLAGS_BY_PATH[key]})" if key in FLAGS_BY_PATH else ""
        why = f": {CONTENT_FIELDS[key]}" if key in CONTENT_FIELDS else ""
        lines.append(f"{key}{flag}: {_show(saved[key])} → {_show(now[key])}{why}")
    steps = now.get("train.max_steps")
    if isinstance(steps, int) and 0 < steps < step:
        lines.append(f"train.max_steps (--max-steps): {steps} is below the checkpoint's step {step}")
    return lines


def check(saved: dict | None, now: dict, step: int, where: str) -> list[str]:
    """The differences between the checkpoint at `where` (step `step`) and this run, as a ConfigError's
    lines; [] when it may be resumed. `saved` None: a checkpoint from before the record (resumed unchecked)."""
    if saved is None:
        log.warning("%s has no record of the spec it was made with (an older sftjob wrote it): resuming it "
                    "without checking that this run's spec matches", where)
        return []
    return differences(saved, now, step)


def refusal(lines: list[str], step: int, where: str) -> ConfigError:
    return ConfigError(
        f"{where} (step {step}) was made by a run with a different spec; resuming it would mix two runs "
        f"(an adapter trained on both, a run.yaml naming one):\n  " + "\n  ".join(lines),
        hint=f"restore those settings to continue from step {step}; or start over: --overwrite (the "
             f"checkpoints under checkpoints/ are removed) or a new --output")


def check_before_fetch(spec, output: str, *, node_rank: int) -> bool:
    """Before any fetch: the newest complete checkpoint's spec fields against this spec. A difference is a
    ConfigError (64) unless output.overwrite, which starts over (node 0 removes the checkpoints).
    True when the run must start fresh."""
    from job import checkpoints

    if not spec.resilience.resume:
        return False
    newest = checkpoints.newest_marker(output)
    if newest is None:
        return False
    step, marker = newest
    where = f"checkpoint {checkpoints.remote_prefix(output, step)}"
    saved = marker.get("identity")
    lines = check({k: v for k, v in saved.items() if k in SPEC_FIELDS} if saved else None, of_spec(spec), step, where)
    if not lines:
        return False
    return start_over(spec, output, lines, step, where, node_rank=node_rank)


def start_over(spec, output: str, lines: list[str], step: int, where: str, *, node_rank: int) -> bool:
    """output.overwrite: a checkpoint of another spec is removed, not resumed; else the refusal."""
    if not spec.output.overwrite:
        raise refusal(lines, step, where)
    log.warning("output.overwrite: %s was made with a different spec (%s); starting over%s", where,
                "; ".join(lines), " and removing the output's checkpoints" if node_rank == 0 else "")
    if node_rank == 0:
        from job import checkpoints

        checkpoints.discard_all(output)
    return True


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _show(v) -> str:
    if isinstance(v, list) and v and all(isinstance(x, dict) and x.get("weight") == 1.0 for x in v):
        v = ", ".join(str(x.get("path")) for x in v)  # data sources of weight 1: their paths
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    text = redact.text(text)
    return text if len(text) <= 120 else text[:117] + "..."
