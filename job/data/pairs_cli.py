"""`sftjob validate | preview --objective dpo`: the SFT commands' counterparts for preference pairs."""
from __future__ import annotations

import json
import sys

from job.data.masks import IGNORE, check_encoder
from job.data.preference import encode_pairs, iter_pair_records, pair_encoder, read_pairs
from job.data.prepared import bad_rows_message, where_key
from job.data.preview import input_files, segments
from job.data.templates import load_tokenizer, resolve_template
from job.errors import ConfigError, ExitCode

CHUNK = 512


def validate_pairs(spec) -> int:
    """Structure of every pair; with a tokenizer also render, mask and measure both completions."""
    files = input_files(spec)
    pairs, bad, n_read = read_pairs(iter_pair_records(files, spec.data), spec.data, spec.model)
    tok, _ = load_tokenizer(spec)
    n_tokens = n_trunc = 0
    if tok is not None:
        enc = pair_encoder(tok, resolve_template(spec, tok), spec.data.train_on_eos)
        check_encoder(enc)
        for i in range(0, len(pairs), CHUNK):
            e = encode_pairs(enc, pairs[i:i + CHUNK], spec.data.max_length, spec.data.truncation)
            bad += e.bad
            n_trunc += e.truncated
            n_tokens += sum(len(c[0]) + len(r[0]) for c, r in zip(e.chosen, e.rejected, strict=True))
    else:
        print("note: no tokenizer given: structural checks only")
    if bad:
        bad.sort(key=where_key)
        print(bad_rows_message(bad).split("\n", 1)[1])
        print(f"validate: {len(bad)} of {n_read} rows are bad ({len(files)} file(s))")
        return int(ExitCode.DATA)
    summary = f"validate: OK, {n_read} preference pairs in {len(files)} file(s)"
    if tok is not None:
        summary += f"; {n_tokens} tokens (chosen + rejected); {n_trunc} pairs longer than max_length {spec.data.max_length}"
    print(summary)
    return 0


def preview_pairs(spec, limit: int, as_json: bool) -> int:
    """The prompt once, then each completion with its trained tokens marked [[like this]]."""
    files = input_files(spec)
    tok, _ = load_tokenizer(spec)
    if tok is None:
        raise ConfigError("preview needs a tokenizer", hint="pass --tokenizer DIR (or --model DIR)")
    enc = pair_encoder(tok, resolve_template(spec, tok), spec.data.train_on_eos)
    check_encoder(enc)
    recs = []
    for r in iter_pair_records(files, spec.data):
        recs.append(r)
        if len(recs) >= max(limit, 0):
            break
    pairs, bad, _ = read_pairs(recs, spec.data, spec.model)
    e = encode_pairs(enc, pairs, spec.data.max_length, spec.data.truncation, keep_text=True)
    for b in bad + e.bad:
        print(f"skipped bad row: {b}", file=sys.stderr)
    for k, where in enumerate(e.wheres):
        halves = {"chosen": e.chosen[k], "rejected": e.rejected[k]}
        if as_json:
            print(json.dumps({"source": where, **{f"{n}_{f}": v[i].tolist() for n, v in halves.items()
                                                  for i, f in enumerate(("input_ids", "labels"))}}))
            continue
        print(f"── {where} ──")
        shown_prompt = False
        for name, (_ids, labels) in halves.items():
            text, offsets, _ = e.rendered[k][0 if name == "chosen" else 1]
            segs = segments(text, offsets, labels != IGNORE)
            cut = next((i for i, (_, t) in enumerate(segs) if t), len(segs))
            if not shown_prompt:
                print("prompt: " + "".join(s for s, _ in segs[:cut]))
                shown_prompt = True
            print(f"{name} ({int((labels != IGNORE).sum())} trained tokens): "
                  + "".join(f"[[{s}]]" if t else s for s, t in segs[cut:]))
    return 0
