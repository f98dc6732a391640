"""`sftjob plan`: what a run will cost, before any GPU is touched.

Shapes come from the model's config.json (meta device: no weights are read); token counts from the
prepared data's report when the data is reachable. Memory figures are estimates, stated as such:
weights + LoRA/trainable state + activations (per-layer ~34·h bytes/token in bf16, only one layer's
worth with gradient checkpointing) + fp32 logits.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from job import objectives, storage
from job.errors import ConfigError, NotFoundError, PermissionDeniedError, SftjobError, UnavailableError

log = logging.getLogger("sftjob.plan")
GiB = 2**30


def _config(spec, model_config: str | None) -> dict:
    src = model_config or spec.model.path
    if not src:
        raise ConfigError("missing required setting 'model.path'", hint="pass --model or --model-config FILE")
    if storage.is_remote(src):
        uri = src if src.endswith(".json") else storage.join(src, "config.json")
        return _parsed_config(storage.read_bytes(uri), uri)
    p = Path(src)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return _parsed_config(p.read_bytes(), str(p))
    try:
        from job.loader import model_config

        return model_config(src).to_dict()
    except Exception:  # noqa: BLE001
        raise NotFoundError(f"no config.json for {src}", hint="pass --model-config path/to/config.json") from None


def _parsed_config(body: bytes, where: str) -> dict:
    try:
        cfg = json.loads(body)
    except (ValueError, RecursionError) as e:  # a traceback (exit 1) before
        raise ConfigError(f"{where} is not valid JSON ({e})", hint="use the model's own config.json") from None
    return cfg if isinstance(cfg, dict) else {}


def _count(cfg: dict, spec, vocab: int = 0) -> tuple[int, int, dict]:
    """(base params, trainable params, shapes) from a meta-device model built as job.loader builds it
    (embeddings grown to `vocab` rows for added tokens)."""
    import torch

    from job.loader import empty_model

    if "model_type" not in cfg:
        raise ConfigError("config.json has no model_type", hint="use the model's own config.json")
    model = empty_model(cfg, vocab=vocab)
    conf = model.config
    n = sum(p.numel() for p in model.parameters())
    quantizable = sum(m.weight.numel() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    if spec.train.method == "full":
        return n, n, {"quantizable_params": quantizable, "vocab_size": conf.vocab_size}
    targets = spec.train.target_modules
    trainable = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets:
            continue
        trainable += spec.train.lora_r * (mod.in_features + mod.out_features)
    for name, p in model.named_parameters():
        if any(m in name for m in spec.train.modules_to_save):
            trainable += p.numel()
    return n, trainable, {"hidden_size": conf.hidden_size, "layers": conf.num_hidden_layers,
                          "vocab_size": conf.vocab_size, "quantizable_params": quantizable}


def _vocab(spec) -> int:
    """Tokens of the run's tokenizer with model.add_special_tokens (0 when none are added or it is not here)."""
    if not spec.model.add_special_tokens or storage.is_remote(spec.model.tokenizer or spec.model.path or ""):
        return 0  # a dry run downloads no model to count two tokens
    from job.data.templates import load_tokenizer

    try:
        tok, _ = load_tokenizer(spec)
    except SftjobError as e:
        log.warning("tokenizer not loaded for the plan (%s); added tokens are not counted", str(e).splitlines()[0])
        return 0
    return len(tok) if tok is not None else 0


def make_plan(spec, *, model_config: str | None = None, tokens_per_second: float | None = None,
              data_report: dict | None = None) -> dict:
    from job.train.launch import topology

    cfg = _config(spec, model_config)
    n, trainable, shape = _count(cfg, spec, _vocab(spec))
    # a plan is made off-cluster: stand in for the rank-0 address the chart provides as MASTER_ADDR
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR") or "rank-0.planned"}
    topo = topology(spec, environ=env, cuda_devices=spec.distributed.gpus_per_node or 0, bf16_ok=True)
    gpus = topo.num_processes
    t, d = spec.train, spec.distributed
    seq = spec.data.max_length
    objective = objectives.get(spec)  # DPO: each row is two sequences (chosen, rejected), plus a reference
    micro_tokens = t.per_device_train_batch_size * seq * objective.sequences_per_row
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * gpus

    shard = gpus if topo.strategy in ("deepspeed", "fsdp") and (d.zero_stage == 3 or topo.strategy == "fsdp") else 1
    if t.method == "qlora":  # NF4 (+ double-quant constants) for the linear layers; embeddings, lm_head, norms stay bf16
        q = shape.get("quantizable_params", n)
        weights = (q * 0.55 + (n - q) * 2.0) / shard
    else:
        weights = n * 2.0 / shard
    opt_shard = gpus if topo.strategy in ("deepspeed", "fsdp") else 1
    state = trainable * (4 + 4 + 8) / opt_shard  # fp32 master/trainable + grads + Adam moments
    if d.offload_optimizer and topo.strategy == "deepspeed":  # a DeepSpeed setting: the others ignore it
        state = trainable * 4 / opt_shard
    h, layers, vocab = shape.get("hidden_size", cfg.get("hidden_size", 0)), cfg.get("num_hidden_layers", 0), shape.get("vocab_size", cfg.get("vocab_size", 0))
    per_layer = 34 * h * micro_tokens
    acts = (2 * h * micro_tokens * layers + per_layer) if t.gradient_checkpointing else per_layer * layers
    logits = micro_tokens * vocab * 4
    part = objective.plan(spec, weights)
    total = weights + state + acts + logits + sum(part.memory.values())

    rows = examples = tokens_epoch = None
    if data_report:
        rows = data_report.get("rows_kept") or data_report.get("examples")
        tokens_epoch = data_report.get("tokens_total")
        examples = data_report.get("packed_bins") or rows
    if t.max_steps > 0:
        steps = t.max_steps
    elif examples:
        steps = math.ceil(examples * t.num_train_epochs / global_batch)
    else:
        steps = None
    trained_tokens = None
    if steps is not None:
        per_step = global_batch * seq if spec.data.packing or not tokens_epoch else tokens_epoch / max(examples or 1, 1) * global_batch
        trained_tokens = int(steps * per_step)
    frac = ((data_report or {}).get("tokens") or {}).get("trained_fraction")
    loss_tokens = int(trained_tokens * frac) if trained_tokens is not None and frac is not None else None
    plan = {
        "model": spec.model.path or model_config, "method": t.method, "strategy": topo.strategy,
        "zero_stage": d.zero_stage if topo.strategy == "deepspeed" else None,
        "nodes": topo.num_machines, "gpus_per_node": topo.per_node, "processes": gpus,
        "global_batch": global_batch, "max_length": seq, "steps": steps, "data_rows": rows,
        "tokens": trained_tokens, "trained_tokens": loss_tokens, "base_params": n, "trainable_params": trainable,
        "memory_gb_per_gpu": {"weights": round(weights / GiB, 2), "trainable_state": round(state / GiB, 2),
                              "activations": round(acts / GiB, 2), "logits": round(logits / GiB, 2),
                              "total": round(total / GiB, 2)},
    }
    import torch

    from job.train import fastpath

    # a GPU run planned off-cluster runs in the image: its kernels, not this machine's
    off_cluster = topo.cuda and not torch.cuda.is_available()
    fast = fastpath.resolve(spec, topo.cuda, fastpath.IMAGE_KERNELS if off_cluster else None)
    plan["attention"], plan["use_liger_kernel"] = fast["attention_summary"], fast["use_liger_kernel"]
    plan["objective"] = objective.name
    plan["sequences_per_row"] = objective.sequences_per_row
    plan["row_name"] = objective.row_name
    plan.update(part.notes)
    plan["memory_gb_per_gpu"].update({k: round(v / GiB, 2) for k, v in part.memory.items()})
    plan["extra_memory"] = list(part.memory)
    if tokens_per_second and trained_tokens:
        plan["tokens_per_second_per_gpu"] = tokens_per_second
        plan["hours"] = round(trained_tokens * part.step_cost / (tokens_per_second * gpus) / 3600, 2)
    return plan


def _count_str(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def plan_command(spec, *, tokens_per_second: float | None = None, as_json: bool = False,
                 model_config: str | None = None) -> int:
    from job.train import lora

    lora.check(spec)  # a LoRA variant that cannot publish a correct adapter: 64, as `run` would
    from job.train import parent

    parent.check(spec)
    report = None
    if spec.data_sources() and not (spec.model.tokenizer or spec.model.path):
        log.warning("no tokenizer (--tokenizer or --model): data not prepared for the plan; steps come from max_steps only")
    elif spec.data_sources():
        # bad data or a missing tokenizer fail here as `validate` would (65/66): a dry run that says OK must be
        # one the run can follow; the tokenizer alone is fetched (no weights), into the cache the run reuses.
        # Only an explicitly offline plan (--model-config: shapes without the model) may go on without inputs.
        storage.configure(spec.storage)
        try:
            report = objectives.get(spec).prepare(spec).report
        except (NotFoundError, UnavailableError, PermissionDeniedError) as e:
            if not model_config:
                raise
            log.warning("offline plan (--model-config): inputs not reachable (%s); steps come from max_steps only",
                        str(e).splitlines()[0])
    plan = make_plan(spec, model_config=model_config, tokens_per_second=tokens_per_second, data_report=report)
    if as_json:
        print(json.dumps(plan, indent=1))
        return 0
    mem = plan["memory_gb_per_gpu"]
    lines = [
        f"model            {plan['model']}  ({_count_str(plan['base_params'])} params, {plan['method']}, "
        f"{plan['trainable_params'] / 1e6:.2f}M trainable)",
        f"processes        {plan['nodes']} node(s) x {plan['gpus_per_node']} = {plan['processes']}  ({plan['strategy']}"
        + (f", ZeRO-{plan['zero_stage']})" if plan["zero_stage"] else ")"),
        f"global batch     {plan['global_batch']} sequences x {plan['max_length']} tokens",
        f"steps            {plan['steps'] if plan['steps'] is not None else 'unknown (set max_steps or make the data reachable)'}",
        f"tokens           {plan['tokens'] if plan['tokens'] is not None else 'unknown'} processed"
        + (f", {plan['trained_tokens']} trained (assistant tokens with a loss)" if plan["trained_tokens"] is not None else ""),
        f"memory per GPU   ~{mem['total']} GiB (weights {mem['weights']}, trainable state {mem['trainable_state']}, "
        f"activations {mem['activations']}, logits {mem['logits']}) — estimate",
    ]
    lines.append(f"attention        {plan['attention']}; Liger kernels {'on' if plan['use_liger_kernel'] else 'off'}")
    if plan["sequences_per_row"] > 1:  # DPO: "8 pairs (16 sequences)"
        lines[2] = (f"global batch     {plan['global_batch']} {plan['row_name']} "
                    f"({plan['sequences_per_row'] * plan['global_batch']} sequences) x {plan['max_length']} tokens")
    for name in plan["extra_memory"]:  # DPO: the reference model
        lines.append(f"{name:<16} {plan.get(name, '')} (+{mem[name]} GiB)")
    if "hours" in plan:
        lines.append(f"time             ~{plan['hours']} h at {plan['tokens_per_second_per_gpu']:.0f} tokens/s per GPU")
    print("\n".join(lines))
    return 0
