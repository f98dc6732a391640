"""Evaluation: did the adapter get better than the base model it was trained from, on the same prompts?

Two measures, because loss alone does not tell a user whether the answers are usable:
- eval loss / perplexity on the eval split, measured by the trainer (eval_steps and at the end), and
  the base model's, recomputed here the way the trainer does it (``eval.base_loss``);
- generation eval: the same held-out prompts, rendered with the run's chat template and the
  generation prompt, answered greedily by the base model and then by the adapter loaded on it.
  Scored by exact match, normalised match and — for structured output — valid JSON and valid
  against ``eval.json_schema``.

It runs in the entrypoint after training (the ranks are gone), writes ``eval.json`` and ``eval.md``
into the run's work dir and reports gate failures; the pipeline decides what a failure means. Scoring
and the report itself (eval.md, the status summary) live in job/evalreport.py.
Prompts taken from the eval split are cut from its token ids (everything before the last trained
span is exactly the template's rendering up to the generation prompt), so no raw rows are re-read.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from job import storage
from job.data import formats, readers
from job.errors import ConfigError, DataError, NotFoundError
from job.evalkit import FORMAT, Evaluation, free_cuda, load_base, tokenizer, with_adapter, written
from job.evalreport import load_schema, markdown, score, summary

log = logging.getLogger("sftjob.eval")
BATCH = 16
SAMPLES = 5



@dataclass
class Prompt:
    ids: list[int]
    text: str  # the rendered prompt, for samples
    reference: str | None


# ---- configuration, checked before any training ---------------------------------------------

def has_eval_split(spec) -> bool:
    return spec.data.eval_split > 0 or bool(spec.data.eval_data)


def wanted(spec, prepared=None) -> bool:
    e = spec.eval
    return bool(e.prompts or e.num_prompts or e.json_schema or e.min_json_valid is not None
                or e.max_loss is not None or e.min_reward_accuracy is not None
                or (prepared is not None and prepared.eval_path))


def check(spec) -> None:
    """Fail before training on an eval section that could never be satisfied."""
    e = spec.eval
    gen = bool(e.prompts or e.num_prompts)
    if e.num_prompts and not e.prompts and not has_eval_split(spec):
        raise ConfigError("eval.num_prompts takes prompts from the eval split, but there is none",
                          hint="set data.eval_split (e.g. 0.05) or data.eval_data, or give eval.prompts FILE")
    if e.max_loss is not None and not has_eval_split(spec):
        raise ConfigError("eval.max_loss gates on eval loss, but there is no eval split",
                          hint="set data.eval_split or data.eval_data")
    if e.min_json_valid is not None and not gen:
        raise ConfigError("eval.min_json_valid needs generated answers, but no prompts are configured",
                          hint="set eval.prompts FILE or eval.num_prompts N")
    if e.json_schema:
        if not gen:
            raise ConfigError("eval.json_schema checks generated answers, but no prompts are configured",
                              hint="set eval.prompts FILE or eval.num_prompts N")
        load_schema(e.json_schema)
    if e.prompts and not storage.is_remote(e.prompts) and not Path(e.prompts).exists():
        raise NotFoundError(f"eval.prompts not found: {e.prompts}", hint="give a jsonl/json/parquet file or an s3:// URI")


# ---- prompts -----------------------------------------------------------------------------------

def prompts_from_eval_split(path: Path, tok, n: int) -> list[Prompt]:
    """The first n eval examples, cut before their last trained span (the reference answer)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids", "labels"]).slice(0, n).to_pydict()
    out = []
    for ids, labels in zip(table["input_ids"], table["labels"], strict=True):
        trained = [i for i, x in enumerate(labels) if x != -100]
        if not trained:
            continue
        end = trained[-1] + 1
        start = end - 1
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        out.append(Prompt(ids[:start], tok.decode(ids[:start]), tok.decode(ids[start:end], skip_special_tokens=True).strip()))
    return out


def prompts_from_file(spec, tok) -> list[Prompt]:
    """Rows with `messages` (a trailing assistant turn is the reference) or `prompt` [+ `completion`]."""
    files = readers.expand(spec.eval.prompts, spec.cache_root() / "inputs")
    roles = {**formats.DEFAULT_ROLES, **spec.data.roles}
    out = []
    for display, path in files:
        for where, raw in readers.iter_file(display, path):
            obj = readers.parse_line(raw) if isinstance(raw, bytes) else raw
            msgs, ref = _prompt_row(obj, roles, where)
            msgs = formats.apply_system_prompt(msgs, spec.model.system_prompt, spec.model.system_prompt_mode)
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.append(Prompt(tok(text, add_special_tokens=False)["input_ids"], text, ref))
            if spec.eval.num_prompts and len(out) >= spec.eval.num_prompts:
                return out
    return out


def _prompt_row(obj, roles: dict, where: str) -> tuple[list[dict], str | None]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with messages or prompt", hint="see examples/README.md")
    ref = obj.get("completion", obj.get("reference"))
    if isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
    elif isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = []
        for m in obj["messages"]:
            role = roles.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
            if role not in formats.ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages: each needs a role (system/user/assistant) and string content",
                                hint="fix the prompts file")
            msgs.append({"role": role, "content": m["content"]})
        if msgs[-1]["role"] == "assistant":
            ref = msgs.pop()["content"]
    else:
        raise DataError(f"{where}: a prompt row needs `prompt` (string) or `messages` (list)", hint="fix the prompts file")
    return msgs, ref if isinstance(ref, str) else None


# ---- generation ----------------------------------------------------------------------------------

def generate(model, tok, prompts: list[Prompt], max_new_tokens: int, stop_ids: list[int]) -> list[str]:
    """Greedy, batched (left padded, similar lengths together), decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    answers: list[str] = [""] * len(prompts)
    for s in range(0, len(order), BATCH):
        idx = order[s:s + BATCH]
        width = max(len(prompts[i].ids) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i].ids
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
        for r, i in enumerate(idx):
            answers[i] = tok.decode(gen[r, width:], skip_special_tokens=True).strip()
    return answers


# ---- the entry point -----------------------------------------------------------------------------

def evaluate(spec, prepared, model_dir: str, adapter_dir: str, workdir: Path) -> Evaluation:
    """Loss from the trainer, generation eval of base vs adapter, eval.json + eval.md, gate failures."""
    t0 = time.time()
    workdir = Path(workdir)
    e = spec.eval
    report: dict = {"format": FORMAT, "loss": _loss(workdir, prepared)}
    schema = load_schema(e.json_schema) if e.json_schema else None
    base_loss = bool(e.base_loss and report["loss"])
    if e.prompts or e.num_prompts or base_loss:
        tok = tokenizer(spec, prepared, model_dir, adapter_dir)
        model = load_base(spec, model_dir, len(tok))
        if base_loss:
            t = time.time()
            loss = eval_loss(model, prepared.eval_path, spec)
            report["loss"].update(base_eval_loss=loss, base_perplexity=_perplexity(loss),
                                  base_seconds=round(time.time() - t, 1))
        if e.prompts or e.num_prompts:
            report["generation"], model = _generation(spec, prepared, tok, model, adapter_dir, schema)
        del model
        free_cuda()
    return written(workdir, report, gate(spec, report), t0, markdown, summary,
                   min_json_valid=e.min_json_valid, max_loss=e.max_loss)


def _loss(workdir: Path, prepared) -> dict | None:
    f = workdir / "eval_loss.json"
    if prepared.eval_path is None or not f.exists():
        return None
    final = json.loads(f.read_text())
    loss = final.get("eval_loss")
    history = []
    if (workdir / "metrics.jsonl").exists():
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.startswith("{") else {}
            if rec.get("eval_loss") is not None:
                history.append({"step": rec.get("step"), "eval_loss": rec["eval_loss"]})
    return {"eval_loss": loss, "perplexity": _perplexity(loss), "history": history, "trainer_metrics": final}


def _perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50)) if loss is not None else None


def eval_loss(model, eval_path: Path, spec) -> float | None:
    """The trainer's eval_loss, recomputed for another model: the same collator and batch size, the
    mean token loss of each batch weighted by its rows (as Trainer.evaluation_loop does), so the base
    model and the adapter compare like for like."""
    import torch
    from datasets import Dataset

    from job.loader import USE_CACHE_IN_TRAINING  # as the trainer computes it: no KV cache across packed rows
    from job.train.collate import Collator

    ds = Dataset.from_parquet(str(eval_path))
    collate, bs = Collator(0, packed=spec.data.packing), spec.train.per_device_train_batch_size
    device = next(model.parameters()).device
    total, rows = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ds), bs):
            batch = collate([ds[i] for i in range(start, min(start + bs, len(ds)))])
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=USE_CACHE_IN_TRAINING).loss.float().item()
            n = len(batch["input_ids"])
            if math.isfinite(loss):  # as the trainer's logging_nan_inf_filter
                total, rows = total + loss * n, rows + n
    return total / rows if rows else None


def _generation(spec, prepared, tok, model, adapter_dir: str, schema: dict | None) -> tuple[dict, object]:
    """Base answers, then the adapter loaded onto the same model; returns the report and the model."""
    e = spec.eval
    if e.prompts:
        prompts, source = prompts_from_file(spec, tok), e.prompts
    else:
        if prepared.eval_path is None:
            raise DataError("eval.num_prompts: the eval split is empty", hint="raise data.eval_split or give eval.prompts")
        prompts, source = prompts_from_eval_split(prepared.eval_path, tok, e.num_prompts), f"eval split (first {e.num_prompts})"
    if not prompts:
        raise DataError(f"no generation prompts found in {source}", hint="check eval.prompts / eval.num_prompts")
    stop = [tok.convert_tokens_to_ids(t) for t in prepared.eos_tokens if t in tok.get_vocab()]
    stop = list(dict.fromkeys(stop + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))
    t0 = time.time()
    before = generate(model, tok, prompts, e.max_new_tokens, stop)
    t1 = time.time()
    model = with_adapter(spec, model, adapter_dir)
    after = generate(model, tok, prompts, e.max_new_tokens, stop)
    t2 = time.time()
    refs = [p.reference for p in prompts]
    return {
        "source": source, "prompts": len(prompts), "max_new_tokens": e.max_new_tokens,
        "json_schema": e.json_schema, "seconds": {"base": round(t1 - t0, 1), "adapter": round(t2 - t1, 1)},
        "before": score(before, refs, schema), "after": score(after, refs, schema),
        "samples": [{"prompt": p.text, "reference": p.reference, "before": b, "after": a}
                    for p, b, a in list(zip(prompts, before, after, strict=True))[:SAMPLES]],
    }, model


def gate(spec, report: dict) -> list[str]:
    """Why the adapter misses eval.min_json_valid / eval.max_loss ([] when it passes or no gate is set)."""
    e, out = spec.eval, []
    if e.min_json_valid is not None:
        after = (report.get("generation") or {}).get("after", {})
        key = "schema_valid" if "schema_valid" in after else "json_valid"
        got = after.get(key, 0.0)
        if got < e.min_json_valid:
            out.append(f"{key} {got:.1%} < eval.min_json_valid {e.min_json_valid:.1%}")
    if e.max_loss is not None:
        loss = (report.get("loss") or {}).get("eval_loss")
        if loss is None:
            out.append("eval.max_loss is set but no eval loss was measured")
        elif loss > e.max_loss:
            out.append(f"eval_loss {loss:.4f} > eval.max_loss {e.max_loss}")
    return out
