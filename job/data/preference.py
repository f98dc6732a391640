"""Preference pairs (DPO): TRL's formats → prompt + chosen + rejected messages → tokens and labels.

Formats, detected per row: explicit prompt (``prompt`` / ``chosen`` / ``rejected`` as message lists or plain
strings — a string prompt is one user turn, a string completion one assistant turn) and implicit prompt
(``chosen`` and ``rejected`` as whole conversations sharing everything before their last turn). data.columns
renames them ({prompt: question, chosen: good, rejected: bad}). Each completion is rendered *with* its prompt
by the same Encoder as SFT, so input_ids equal apply_chat_template(prompt + completion) and only the
completion's assistant tokens (plus the end-of-turn) carry labels. A pair longer than max_length keeps the
prompt's end and the completion's start (truncation: drop drops it instead).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from job.data.formats import (
    PAIR_KEYS,
    BadRow,
    Row,
    RowIssue,
    apply_system_prompt,
    looks_like_pairs,
    message_list,
    parse_line,
    row_weight,
)
from job.data.masks import IGNORE, Encoder

log = logging.getLogger(__name__)
UNLIMITED = 1 << 30  # the Encoder never truncates a pair half; truncate() does it for both


@dataclass
class Pair:
    where: str
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    weight: float = 1.0


def normalize(where: str, obj: Any, columns: dict[str, str], roles: dict[str, str], model_spec) -> Pair | BadRow:
    """One raw row → Pair, or what is wrong with it as FILE:LINE: field: problem."""
    try:
        return _normalize(where, obj, columns, roles, model_spec)
    except RowIssue as e:
        return BadRow(where, e.field, e.problem)


def _normalize(where, obj, columns, roles, model_spec) -> Pair:
    if isinstance(obj, RowIssue):
        raise obj
    if isinstance(obj, bytes):
        obj = parse_line(obj)
    if not isinstance(obj, dict):
        raise RowIssue("(row)", f"expected a JSON object, got {type(obj).__name__}")
    col = {k: columns.get(k, k) for k in PAIR_KEYS}
    rk, ck = columns.get("role", "role"), columns.get("content", "content")
    for k in ("chosen", "rejected"):
        if col[k] in obj and obj[col[k]] is None:  # not "missing (row has: ..., rejected)": it is there, null
            raise RowIssue(col[k], "null: a preference pair needs a chosen and a rejected answer "
                                   "(a string or a list of messages)")
        if obj.get(col[k]) is None:
            raise RowIssue(col[k], f"missing (row has: {', '.join(map(str, list(obj)[:8])) or 'no fields'}); "
                                   "a preference pair needs chosen and rejected (set data.columns for other names)")
    if obj.get(col["prompt"]) is not None:
        prompt = _turns(obj, col["prompt"], rk, ck, roles, "user")
        chosen = _turns(obj, col["chosen"], rk, ck, roles, "assistant")
        rejected = _turns(obj, col["rejected"], rk, ck, roles, "assistant")
        for k, msgs in (("chosen", chosen), ("rejected", rejected)):
            bad = next((i for i, m in enumerate(msgs) if m["role"] != "assistant" and m["role"] != "tool"), None)
            if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant" or bad is not None:
                i = bad if bad is not None else (0 if msgs[0]["role"] != "assistant" else len(msgs) - 1)
                raise RowIssue(f"{col[k]}[{i}]", f"must be an assistant turn (got role '{msgs[i]['role']}'): "
                                                 "the completion is what the model answers to the prompt")
    else:
        chosen = _turns(obj, col["chosen"], rk, ck, roles, "assistant")
        rejected = _turns(obj, col["rejected"], rk, ck, roles, "assistant")
        for k, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[-1]["role"] != "assistant":
                raise RowIssue(f"{col[k]}[{len(msgs) - 1}]", f"must be an assistant turn (got role '{msgs[-1]['role']}'): "
                               "without a prompt column the last turn is the completion")
            if len(msgs) < 2:
                if col["prompt"] in obj:  # null: an implicit prompt where the answers are whole conversations
                    raise RowIssue(col["prompt"], "null, and chosen and rejected are not whole conversations to take "
                                   "the prompt from: give the prompt (a string or a list of messages)")
                raise RowIssue(col[k], "no prompt: without a prompt column chosen and rejected must be whole "
                               "conversations (the turns before the last one are the prompt)")
        if _plain(chosen[:-1]) != _plain(rejected[:-1]):
            i = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False))
                      if _plain([a]) != _plain([b])), min(len(chosen), len(rejected)) - 1)
            raise RowIssue(col["rejected"], f"its prompt differs from chosen's at message {i}: with an implicit prompt "
                           "both conversations must share every turn before the last")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not any(m["role"] == "user" for m in prompt):
        raise RowIssue(col["prompt"], "no user turn in the prompt")
    if _plain(chosen) == _plain(rejected):
        raise RowIssue(col["rejected"], "identical to chosen: the pair prefers nothing")
    prompt = [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt]
    chosen, rejected = ([{**m, "train": True} if m["role"] == "assistant" else m for m in c] for c in (chosen, rejected))
    prompt = apply_system_prompt(prompt, model_spec.system_prompt, model_spec.system_prompt_mode)
    return Pair(where, prompt, chosen, rejected, row_weight(obj, columns.get("weight", "weight")))


def _turns(obj: dict, key: str, rk: str, ck: str, roles: dict, string_role: str) -> list[dict]:
    v = obj[key]
    if isinstance(v, str):
        if not v.strip():
            raise RowIssue(key, "empty text")
        return [{"role": string_role, "content": v}]
    return message_list(obj, key, rk, ck, roles, need_assistant=False)


def _plain(msgs: list[dict]) -> list:
    return [(m["role"], m["content"], json.dumps(m.get("tool_calls"), sort_keys=True)) for m in msgs]


# ---- tokens -----------------------------------------------------------------------------------

@dataclass
class EncodedPairs:
    """Per pair: chosen/rejected ids and labels (labels = IGNORE outside the completion)."""

    wheres: list[str]
    weights: list[float]
    chosen: list[tuple[np.ndarray, np.ndarray]]
    rejected: list[tuple[np.ndarray, np.ndarray]]
    bad: list[BadRow]
    dropped: dict[str, int]
    truncated: int
    rendered: list[tuple] | None = None  # preview: (chosen text/offsets/messages, rejected ...)


def pair_encoder(tok, chat, train_on_eos: str) -> Encoder:
    return Encoder(tok, chat, UNLIMITED, "truncate_right", train_on_eos)


def encode_pairs(encoder: Encoder, pairs: list[Pair], max_length: int, truncation: str,
                 keep_text: bool = False) -> EncodedPairs:
    """Both completions rendered with their prompt by the SFT Encoder; over-long pairs truncated or dropped."""
    out = EncodedPairs([], [], [], [], [], {}, 0, [] if keep_text else None)
    halves = {}
    for name in ("chosen", "rejected"):
        rows = [Row(p.where, p.prompt + getattr(p, name), p.weight) for p in pairs]
        enc = encoder.encode(rows, keep_text=keep_text)
        for b in enc.bad:
            out.bad.append(BadRow(b.where, name, b.problem))
        starts = np.concatenate([[0], np.cumsum(enc.lengths)]).astype(np.int64)
        halves[name] = {w: (enc.ids[starts[k]:starts[k + 1]], enc.labels[starts[k]:starts[k + 1]],
                            enc.rendered[k] if keep_text else None) for k, w in enumerate(enc.wheres)}
    bad_where = {b.where for b in out.bad}
    for p in pairs:
        c, r = halves["chosen"].get(p.where), halves["rejected"].get(p.where)
        if p.where in bad_where:
            continue
        if c is None or r is None:
            out.dropped["no_trained_tokens"] = out.dropped.get("no_trained_tokens", 0) + 1
            continue
        halves_ok = []
        cut = False
        for ids, labels, _ in (c, r):
            if len(ids) > max_length:
                cut = True
                if truncation == "drop":
                    break
                ids, labels = truncate(ids, labels, max_length)
            halves_ok.append((ids, labels))
        if cut and truncation == "drop":
            out.dropped["too_long"] = out.dropped.get("too_long", 0) + 1
            continue
        out.truncated += cut
        out.wheres.append(p.where)
        out.weights.append(p.weight)
        out.chosen.append(halves_ok[0])
        out.rejected.append(halves_ok[1])
        if keep_text:
            out.rendered.append((c[2], r[2]))
    return out


def truncate(ids: np.ndarray, labels: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the prompt's end and the completion's start: the prompt gets at least half the window."""
    trained = np.flatnonzero(labels != IGNORE)
    first = int(trained[0]) if len(trained) else len(ids)
    keep_prompt = min(first, max(max_length // 2, max_length - (len(ids) - first)))
    lo = first - keep_prompt
    return ids[lo:lo + max_length], labels[lo:lo + max_length]


def read_pairs(records, data_spec, model_spec) -> tuple[list[Pair], list[BadRow], int]:
    """Raw records (formats.iter_records) → pairs and bad rows."""
    pairs, bad, n = [], [], 0
    for where, raw, _fmt in records:
        n += 1
        p = normalize(where, raw, data_spec.columns, data_spec.roles, model_spec)
        (bad if isinstance(p, BadRow) else pairs).append(p)
    return pairs, bad, n


def iter_pair_records(files, data_spec):
    """(FILE:LINE, raw row, "preference") for every row; a file without chosen/rejected columns fails at once."""
    from job.data import formats, readers
    from job.errors import DataError

    for display, path in files:
        head, it = [], readers.iter_file(display, path)
        for item in it:
            head.append(item)
            if len(head) >= formats.DETECT_ROWS:
                break
        objs = [readers.parsed(o) for _, o in head]
        if not looks_like_pairs(objs, data_spec.columns):
            formats.refuse_unreadable(head)
            keys = sorted({k for o in objs if isinstance(o, dict) for k in o})[:10]
            raise DataError(f"{display}: not preference data: no '{data_spec.columns.get('chosen', 'chosen')}' column "
                            f"in the first rows (fields: {', '.join(keys) or 'none'})",
                            hint="objective dpo needs prompt/chosen/rejected rows (or chosen/rejected conversations); "
                                 "map other names with data.columns, e.g. {chosen: good, rejected: bad}")
        for where, obj in formats.chain_rows(head, it):
            yield where, obj, "preference"


# ---- the prepared cache -----------------------------------------------------------------------

PREF_VERSION = "1"


def prepare(spec, tokenizer_dir=None, sharing=None):
    """DPO's preparation (job/objectives/dpo.py): the pairs of spec, cached by content like SFT's rows. Every
    node prepares its own (``sharing`` is SFT's node-0 publication, not used for pairs yet)."""
    from job.data.templates import prepare_inputs

    return prepare_pairs(spec, *prepare_inputs(spec, tokenizer_dir))


def prepare_pairs(spec, tdir, template_src):
    """Like prepare.prepare for SFT: a content-keyed cache dir of train/eval parquet (pairs), loaded by ranks."""
    import hashlib
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from job.data import readers
    from job.data.masks import check_encoder
    from job.data.prepared import Prepared, bad_rows_message, cache_key, fingerprints, mkdir, repeat, split
    from job.data.templates import describe, resolve_template
    from job.errors import DataError
    from job.loader import load_tokenizer

    t0 = time.time()
    inputs = spec.cache_root() / "inputs"
    base = cache_key(spec, template_src, tdir, [(s, fingerprints(s.path, inputs)) for s in spec.data_sources()],
                     fingerprints(spec.data.eval_data, inputs) if spec.data.eval_data else [])
    key = hashlib.sha256(f"dpo-{PREF_VERSION}-{base}".encode()).hexdigest()[:24]
    root = spec.cache_root() / "prepared"
    dest = root / key
    if (dest / "meta.json").exists():
        log.info("prepared pairs: cache hit %s", dest)
        return Prepared.load(dest, cache_hit=True)
    sources = [(s, readers.expand(s.path, inputs)) for s in spec.data_sources()]
    eval_files = readers.expand(spec.data.eval_data, inputs) if spec.data.eval_data else []
    tok = load_tokenizer(tdir, add_special_tokens=spec.model.add_special_tokens,
                         trust_remote_code=spec.model.trust_remote_code)
    chat = describe(*template_src, tok) if template_src else resolve_template(spec, tok)
    encoder = pair_encoder(tok, chat, spec.data.train_on_eos)
    check_encoder(encoder)
    rng = np.random.default_rng(spec.train.seed)
    train_parts, eval_parts, bad, read, dropped, truncated, per_source = [], [], [], 0, {}, 0, []
    for src, files in sources + ([(None, eval_files)] if eval_files else []):
        pairs, b, n = read_pairs(iter_pair_records(files, spec.data), spec.data, spec.model)
        read += n
        bad += b
        enc = encode_pairs(encoder, pairs, spec.data.max_length, spec.data.truncation)
        bad += enc.bad
        truncated += enc.truncated
        for k, v in enc.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        m = len(enc.wheres)
        if src is None:
            eval_parts.append((enc, np.arange(m)))
            continue
        tr, ev = split(m, spec.data.eval_split, spec.data.shuffle, rng)
        tr = repeat(tr, np.asarray(enc.weights, np.float64).reshape(-1) if m else np.zeros(0), src.weight, rng)
        train_parts.append((enc, rng.permutation(tr) if spec.data.shuffle else tr))
        eval_parts.append((enc, ev))
        per_source.append({"path": src.path, "files": len(files), "weight": src.weight, "rows_read": n,
                           "examples": m, "train": len(tr), "eval": len(ev)})
    if bad:
        from job.data.prepared import where_key

        raise DataError(bad_rows_message(sorted(bad, key=where_key)),
                        hint="fix or remove these rows (`sftjob validate --objective dpo --data ...` lists them all)")
    train = [(e.chosen[i], e.rejected[i]) for e, idx in train_parts for i in idx.tolist()]
    evald = [(e.chosen[i], e.rejected[i]) for e, idx in eval_parts for i in idx.tolist()]
    if not train:
        raise DataError("no training pairs left after preparation", hint=f"dropped: {dropped or 'none'}")
    rep = _report(spec, chat, tok, key, read, dropped, truncated, per_source, train, evald)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=mkdir(root)))
    try:
        write_pairs(tmp / "train.parquet", train)
        if evald:
            write_pairs(tmp / "eval.parquet", evald)
        rep["prep_seconds"] = round(time.time() - t0, 3)
        (tmp / "data_report.json").write_text(json.dumps(rep, indent=2))
        (tmp / "chat_template.jinja").write_text(chat.text)
        meta = {"key": key, "version": PREF_VERSION, "objective": "dpo", "template_sha256": chat.sha256,
                "template_name": chat.name, "eos_tokens": chat.eos_tokens, "system": chat.system,
                "eval": bool(evald), "packing": False, "max_length": spec.data.max_length}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if dest.exists() and not (dest / "meta.json").exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another prepare finished first: same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared pairs: %s", dest)
    return Prepared.load(dest, cache_hit=False)


def write_pairs(path, pairs: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {}
    for k, name in enumerate(("chosen", "rejected")):
        cols[f"{name}_input_ids"] = pa.array([p[k][0].astype(np.int32) for p in pairs], pa.list_(pa.int32()))
        cols[f"{name}_labels"] = pa.array([p[k][1].astype(np.int32) for p in pairs], pa.list_(pa.int32()))
    pq.write_table(pa.table(cols), path, compression="zstd")


def _report(spec, chat, tok, key, read, dropped, truncated, per_source, train, evald) -> dict:
    """data_report.json for pairs; the flat fields the planner and `prepare` print read are kept."""
    lengths = np.asarray([len(c[0]) + len(r[0]) for c, r in train], np.int64)
    trained = int(sum(int((c[1] != IGNORE).sum()) + int((r[1] != IGNORE).sum()) for c, r in train))
    total = int(lengths.sum())
    kept = sum(s["examples"] for s in per_source)
    return {
        "cache_key": key, "objective": "dpo",
        "rows": {"read": read, "kept": kept, "dropped": {k: v for k, v in sorted(dropped.items()) if v}},
        "sources": per_source,
        "examples": {"train": len(train), "eval": len(evald)},
        "tokens": {"total": total, "trained": trained, "trained_fraction": round(trained / total, 4) if total else 0.0,
                   "eval_total": int(sum(len(c[0]) + len(r[0]) for c, r in evald))},
        "truncation": {"mode": spec.data.truncation, "truncated": truncated,
                       "dropped_too_long": dropped.get("too_long", 0), "max_length": spec.data.max_length,
                       "keeps": "the prompt's end and the completion's start"},
        "lengths": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1), "max": int(lengths.max())},
        "packing": {"enabled": False, "efficiency": None},
        "chat_template": {"name": chat.name, "sha256": chat.sha256, "eos_tokens": chat.eos_tokens,
                          "system": chat.system, "notes": chat.notes},
        "train_on_eos": spec.data.train_on_eos,
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok)},
        # flat summary for the planner: a pair is two sequences (chosen, rejected) per row
        "rows_kept": len(train), "tokens_total": total, "packed_bins": None, "sequences_per_row": 2,
    }
