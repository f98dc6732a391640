"""`sftjob prepare | validate | preview`: thin wrappers that print what the data stage found.

validate checks every row structurally, then (with a tokenizer) renders and tokenizes it exactly as
training would; with only --chat-template it still renders (so templates that reject a role order
are caught) but skips the token checks and says so. Bad rows are listed as FILE:LINE: field: problem.
"""
from __future__ import annotations

import json
import os
import sys

from job.data import formats
from job.data.formats import BadRow, Row
from job.data.masks import IGNORE, Encoder, check_encoder
from job.data.prepare import (
    encode_stream,
    no_examples_hint,
    no_examples_message,
)
from job.data.prepared import MAX_LISTED, bad_rows_message, where_key
from job.data.preview import input_files, segments
from job.data.templates import (
    describe,
    load_tokenizer,
    plain_tokenizer,
    read_template_source,
    resolve_template,
)
from job.errors import ConfigError, ExitCode


def prepare_command(spec) -> int:
    """`sftjob prepare`, for every objective: its preparation, then the same summary from its data report."""
    from job import objectives

    p = objectives.get(spec).prepare(spec)
    r = p.report
    state = "cache hit (inputs unchanged, nothing re-tokenized)" if p.cache_hit else "prepared"
    print(f"{state}: {p.dir}")
    print(f"  train: {p.train_path} ({r['examples']['train']} examples, {r['tokens']['total']} tokens, "
          f"{r['tokens']['trained']} trained)")
    if p.eval_path:
        print(f"  eval:  {p.eval_path} ({r['examples']['eval']} examples)")
    t = r["truncation"]
    over = t.get("longer_than_max_length", t["truncated"] + t["dropped_too_long"])
    print("  " + rows_line(r["rows"]["read"], r["rows"]["kept"], r["rows"]["dropped"], t["truncated"], over,
                           t["max_length"], t["mode"]))
    warn_truncation(r["rows"]["read"], over, t["max_length"], t["mode"])
    if r["packing"]["enabled"]:
        print(f"  packing efficiency {r['packing']['efficiency']:.1%}")
    print(f"  template {r['chat_template']['name']} sha256 {p.template_sha256[:12]}…; report {p.dir / 'data_report.json'}")
    return 0


def rows_line(read: int, kept: int, dropped: dict, truncated: int, over: int, max_length: int, mode: str) -> str:
    """The row counts, in the same words from validate and prepare."""
    dropped = {k: v for k, v in sorted(dropped.items()) if v}
    return (f"rows read {read}, kept {kept}, dropped {sum(dropped.values())}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in dropped.items())})" if dropped else "")
            + f", truncated {truncated}; {over} longer than max_length {max_length} ({mode})")


def warn_truncation(read: int, over: int, max_length: int, mode: str) -> None:
    """More than 10 % of the rows do not fit: the run would learn from cut (or missing) conversations."""
    if read and over / read > 0.10:
        done = "dropped" if mode == "drop" else f"cut ({mode})"
        print(f"sftjob: WARNING: {over} of {read} rows ({over / read:.0%}) are longer than max_length {max_length} "
              f"and are {done}; raise --max-length if the model allows it", file=sys.stderr)


def validate_command(spec) -> int:
    files = input_files(spec)
    tok, _ = load_tokenizer(spec)
    notes = []
    if tok is not None:
        chat = resolve_template(spec, tok)
    elif spec.model.chat_template:
        name, text = read_template_source(spec.model.chat_template)
        chat = describe(name, text, None)
        notes.append("no tokenizer given: rendering checked, token checks (lengths, masks) skipped")
    else:
        chat = None
        notes.append("no tokenizer or chat template given: structural checks only")
    bad: list[BadRow] = []
    n_read = n_tokens = n_trained = n_truncated = n_over = n_kept = n_weighted = 0
    dropped: dict[str, int] = {}
    if chat is not None and tok is not None:
        enc = Encoder(tok, chat, spec.data.max_length, spec.data.truncation, spec.data.train_on_eos)
        check_encoder(enc)
        ex, bad, n_read = encode_stream(enc, formats.iter_records(files, spec.data), spec.data, spec.model,
                                        spec.data.num_proc or os.cpu_count() or 1)
        for e in ex:  # counted as prepare counts them (prepare.py), so both give one verdict
            n_tokens += int(e.lengths.sum())
            n_trained += int((e.labels != IGNORE).sum())
            bad += e.too_long
            n_truncated += e.truncated
            n_over += e.over_length
            n_kept += len(e.lengths)
            n_weighted += int((e.weights > 0).sum())
            for k, v in e.dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        if n_kept - n_weighted:
            dropped["weight_zero"] = n_kept - n_weighted
    else:
        enc = Encoder(plain_tokenizer(), chat, spec.data.max_length, spec.data.truncation, spec.data.train_on_eos) if chat else None
        if enc is not None:
            check_encoder(enc)
        chunk: list[Row] = []
        for it in formats.read_rows(files, spec.data, spec.model):
            n_read += 1
            if isinstance(it, BadRow):
                bad.append(it)
            elif enc is not None:
                chunk.append(it)
                if len(chunk) >= 512:
                    enc._render_each(chunk, [enc.messages_for(r) for r in chunk], bad)
                    chunk = []
        if enc is not None and chunk:
            enc._render_each(chunk, [enc.messages_for(r) for r in chunk], bad)
    for n in notes + (chat.notes if chat else []):
        print(f"note: {n}")
    bad.sort(key=where_key)
    d = spec.data
    if tok is not None:
        warn_truncation(n_read, n_over, d.max_length, d.truncation)
    if bad:
        print(bad_rows_message(bad).split("\n", 1)[1])
        print(f"validate: {len(bad)} of {n_read} rows are bad ({len(files)} file(s))")
        return int(ExitCode.DATA)
    if tok is not None and not n_weighted:  # prepare would stop here: "no training examples left"
        print(f"validate: {no_examples_message(n_read, dropped, n_over, d)} ({len(files)} file(s))")
        print(f"  fix: {no_examples_hint(dropped, n_over)}")
        return int(ExitCode.DATA)
    summary = f"validate: OK, {n_read} rows in {len(files)} file(s)"
    if chat is not None:
        summary += f"; template {chat.name} ({chat.sha256[:12]}…, system {chat.system})"
    if tok is not None:
        summary += (f"; {n_tokens} tokens, {n_trained} trained\n  "
                    + rows_line(n_read, n_kept, dropped, n_truncated, n_over, d.max_length, d.truncation))
    print(summary)
    return 0


def preview_command(spec, limit: int, as_json: bool) -> int:
    files = input_files(spec)
    tok, _ = load_tokenizer(spec)
    if tok is None:
        raise ConfigError("preview needs a tokenizer", hint="pass --tokenizer DIR (or --model DIR)")
    chat = resolve_template(spec, tok)
    enc = Encoder(tok, chat, spec.data.max_length, spec.data.truncation, spec.data.train_on_eos)
    check_encoder(enc)
    recs = formats.iter_records(files, spec.data, limit=limit)
    ex, bad, _ = encode_stream(enc, recs, spec.data, spec.model, 1, keep_text=True)
    for b in bad[:MAX_LISTED]:
        print(f"skipped bad row: {b}", file=sys.stderr)
    color = sys.stdout.isatty() and not as_json
    console = None
    if color:
        from rich.console import Console

        console = Console(highlight=False)
    try:
        _show(ex, console, as_json)
    except BrokenPipeError:  # `sftjob preview --json | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _show(ex, console, as_json: bool) -> None:
    for e in ex:
        starts = 0
        for k, where in enumerate(e.wheres):
            n = int(e.lengths[k])
            ids, labels = e.ids[starts:starts + n], e.labels[starts:starts + n]
            starts += n
            if as_json:
                print(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist(), "source": where,
                                  "trained_tokens": int((labels != IGNORE).sum())}))
                continue
            text, offsets, _ = e.rendered[k]
            header = f"── {where}: {n} tokens, {int((labels != IGNORE).sum())} trained ──"
            segs = segments(text, offsets, labels != IGNORE)
            if console is not None:
                from rich.text import Text

                t = Text()
                for s, trained in segs:
                    t.append(s, style="bold green on grey15" if trained else "dim")
                console.print(header, style="cyan", markup=False)
                console.print(t)
            else:
                print(header)
                print("".join(f"[[{s}]]" if trained else s for s, trained in segs))
