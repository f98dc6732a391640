"""The evaluation's numbers and report: scoring answers (exact, normalised, valid JSON, valid against a
JSON Schema), the summary status.json carries, and eval.md. Pure functions of text and dicts: no
models here (job/evaluate.py runs them)."""
from __future__ import annotations

import json
import re
import unicodedata

import jsonschema

from job import storage
from job.errors import ConfigError, NotFoundError

_INVALID = object()


def load_schema(uri: str) -> dict:
    try:
        schema = json.loads(storage.read_bytes(uri))
    except NotFoundError:
        raise NotFoundError(f"eval.json_schema not found: {uri}", hint="give a JSON Schema file (local or s3://)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"eval.json_schema {uri} is not valid JSON: {e}", hint="fix the schema file") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"eval.json_schema {uri} must be a JSON object", hint="see https://json-schema.org")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"eval.json_schema {uri} is not a valid JSON Schema: {str(e).splitlines()[0]}",
                          hint="fix the schema file") from None
    return schema


# ---- scoring -----------------------------------------------------------------------------------

def parse_json(text: str):
    """The answer as JSON, or _INVALID. A single surrounding ```json fence is tolerated; nothing else."""
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.S)
    if m:
        t = m.group(1)
    try:
        return json.loads(t)
    except (json.JSONDecodeError, ValueError):
        return _INVALID


def schema_errors(value, schema: dict) -> list[str]:
    """Why value does not satisfy schema ([] when it does), each as `path: message`."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
            for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(value)]


def normalise(text: str) -> str:
    """Compare meaning, not formatting: canonical JSON when it parses, else casefolded words."""
    j = parse_json(text)
    if j is not _INVALID:
        return "json:" + json.dumps(j, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    t = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", t).split())


def score(answers: list[str], references: list[str | None], schema: dict | None) -> dict:
    n = len(answers)
    out: dict = {"n": n}
    pairs = [(a, r) for a, r in zip(answers, references, strict=True) if r is not None]
    if pairs:
        out["exact_match"] = sum(a.strip() == r.strip() for a, r in pairs) / len(pairs)
        out["normalized_match"] = sum(normalise(a) == normalise(r) for a, r in pairs) / len(pairs)
    parsed = [parse_json(a) for a in answers]
    out["json_valid"] = sum(p is not _INVALID for p in parsed) / max(n, 1)
    if schema is not None:
        out["schema_valid"] = sum(p is not _INVALID and not schema_errors(p, schema) for p in parsed) / max(n, 1)
    out["mean_answer_chars"] = round(sum(len(a) for a in answers) / max(n, 1), 1)
    return out


# ---- the report ---------------------------------------------------------------------------------

def summary(report: dict) -> dict:
    """The few numbers status.json and the final log line carry."""
    out: dict = {}
    loss = report.get("loss") or {}
    if loss.get("eval_loss") is not None:
        out["eval_loss"] = round(loss["eval_loss"], 4)
        out["perplexity"] = round(loss["perplexity"], 3)
        if loss.get("base_eval_loss") is not None:
            out["base_eval_loss"] = round(loss["base_eval_loss"], 4)
    g = report.get("generation")
    if g:
        out["prompts"] = g["prompts"]
        for k in ("exact_match", "normalized_match", "json_valid", "schema_valid"):
            if k in g["after"]:
                out[k] = [round(g["before"][k], 4), round(g["after"][k], 4)]  # [before, after]
    if report.get("gate", {}).get("checked"):
        out["gate"] = "passed" if report["gate"]["passed"] else "failed"
    return out


_LABELS = {"exact_match": "exact match", "normalized_match": "normalised match", "json_valid": "valid JSON",
           "schema_valid": "valid against schema"}


def markdown(report: dict) -> str:
    lines = ["# Evaluation: base model → adapter", ""]
    g, loss = report.get("generation"), report.get("loss") or {}
    lines += ["| metric | base | adapter | change |", "|---|---|---|---|"]
    if g:
        for k, label in _LABELS.items():
            if k in g["after"]:
                b, a = g["before"][k], g["after"][k]
                lines.append(f"| {label} | {b:.1%} | {a:.1%} | {100 * (a - b):+.1f} pts |")
    if loss.get("eval_loss") is not None:
        b, bp = loss.get("base_eval_loss"), loss.get("base_perplexity")
        lines.append(f"| eval loss | {_num(b, 4)} | {loss['eval_loss']:.4f} | {_num(b and loss['eval_loss'] - b, 4, '+')} |")
        lines.append(f"| perplexity | {_num(bp, 3)} | {loss['perplexity']:.3f} | {_num(bp and loss['perplexity'] - bp, 3, '+')} |")
    lines.append("")
    if g:
        lines.append(f"{g['prompts']} prompts from {g['source']}, greedy, max_new_tokens {g['max_new_tokens']}.")
    gt = report.get("gate") or {}
    if gt.get("checked"):
        lines.append(f"Gate: **{'passed' if gt['passed'] else 'failed'}**" + ("" if gt["passed"] else ": " + "; ".join(gt["failures"])))
    for i, s in enumerate((g or {}).get("samples", []), 1):
        lines += ["", f"## Sample {i}", "", "Prompt:", _fence(s["prompt"]), "Reference:", _fence(s["reference"] or "(none)"),
                  "Base:", _fence(s["before"]), "Adapter:", _fence(s["after"])]
    return "\n".join(lines) + "\n"


def _num(x: float | None, digits: int, sign: str = "") -> str:
    return "—" if x is None else f"{x:{sign}.{digits}f}"


def _fence(text: str) -> str:
    return "````text\n" + text.replace("````", "` ` ` `") + "\n````"
