"""prepare(spec) → a cached directory of train/eval parquet the trainer loads without tokenizing.

Runs before any process group exists (the entrypoint, or local rank 0); ranks only ``Prepared.load``.
The cache key hashes everything that changes the output: file contents, template, tokenizer, the
spec fields that matter and the code version, so a second run with the same inputs is a cache hit.
Writes go to a temp directory renamed into place, so a killed or concurrent prepare never leaves a
half cache that looks complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from job.data import formats, progress, readers, report, stream
from job.data.formats import BadRow
from job.data.masks import Encoded, Encoder, check_encoder
from job.data.prepared import (
    PREP_VERSION,
    Prepared,
    bad_rows_message,
    cache_key,
    fingerprints,
    mkdir,
    repeat,
    split,
    where_key,
)
from job.data.templates import (
    describe,
    prepare_inputs,
    resolve_template,
)
from job.data.workers import Workers
from job.errors import DataError
from job.loader import load_tokenizer

log = logging.getLogger(__name__)
CHUNK_ROWS = 512


def prepare(spec, tokenizer_dir: Path | None = None, sharing=None) -> Prepared:
    """The prepared data for spec: the node's cache, else the store (data.cache_uri, or node 0 of this run
    via ``sharing``, see job/data/shared.py), else prepared here (and published where ``sharing`` says)."""
    from job.data import shared

    t0 = time.time()
    tdir, template_src = prepare_inputs(spec, tokenizer_dir)
    inputs = spec.cache_root() / "inputs"
    key = cache_key(spec, template_src, tdir, [(s, fingerprints(s.path, inputs)) for s in spec.data_sources()],
                    fingerprints(spec.data.eval_data, inputs) if spec.data.eval_data else [])
    root = spec.cache_root() / "prepared"
    dest = root / key
    sharing = sharing or shared.for_spec(spec)
    if (dest / "meta.json").exists():  # checked before loading transformers: a hit takes well under a second
        log.info("prepared data: cache hit %s", dest)
        shared.offer(sharing, dest, key)  # other nodes / runs want it too, even when this node already had it
        return Prepared.load(dest, cache_hit=True)
    if shared.from_cache(sharing, key, dest):
        return Prepared.load(dest, cache_hit=True)
    if sharing.waits:
        shared.wait_for_node0(sharing, key, dest)
        return Prepared.load(dest, cache_hit=True)
    prepared = _prepare(spec, tdir, template_src, inputs, key, root, dest, t0)
    shared.offer(sharing, dest, key)
    return prepared


def _prepare(spec, tdir: Path, template_src, inputs: Path, key: str, root: Path, dest: Path, t0: float) -> Prepared:
    sources = [(s, readers.expand(s.path, inputs)) for s in spec.data_sources()]
    eval_files = readers.expand(spec.data.eval_data, inputs) if spec.data.eval_data else []

    marks = {"inputs": time.time()}
    tok = load_tokenizer(tdir, add_special_tokens=spec.model.add_special_tokens,
                         trust_remote_code=spec.model.trust_remote_code)
    chat = describe(*template_src, tok) if template_src else resolve_template(spec, tok)
    encoder = Encoder(tok, chat, spec.data.max_length, spec.data.truncation, spec.data.train_on_eos)
    check_encoder(encoder)
    marks["tokenizer_and_template"] = time.time()
    nproc = spec.data.num_proc or os.cpu_count() or 1
    rng = np.random.default_rng(spec.train.seed)
    per_source, train_idx, eval_idx, read_total, bad_all, dropped, truncated = [], [], [], 0, [], {}, 0
    offset = over_length = 0
    every_file = [p for _, files in sources for _, p in files] + [p for _, p in eval_files]
    ticker = progress.Progress(lambda: progress.estimate_rows(every_file))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=mkdir(root)))
    spill = stream.Spill(tmp / ".spill")  # tokens on disk as they are encoded: memory stays bounded
    try:
        with worker_pool(encoder, spec.data, spec.model, nproc) as pool:
            report.preload_matplotlib()  # a thread, started only after the fork (never inherited mid-import)
            for src, files in sources + ([(None, eval_files)] if eval_files else []):
                tally: dict = {}
                chunks, bad = [], []
                for e in encode_iter(encoder, formats.iter_records(files, spec.data), spec.data, spec.model,
                                     pool=pool, progress=ticker, tally=tally):
                    bad += e.bad
                    truncated += e.truncated
                    over_length += e.over_length
                    _merge(dropped, [e])
                    chunks.append(spill.add(e))
                bad_all += sorted(bad, key=where_key)
                read_total += tally["read"]
                part = stream.Examples.concat(chunks)
                n = len(part)
                if src is None:  # the separate eval source
                    eval_idx.append(np.arange(n) + offset)
                else:
                    tr, ev = split(n, spec.data.eval_split, spec.data.shuffle, rng)
                    tr = repeat(tr, part.weights, src.weight, rng)
                    train_idx.append(tr + offset)
                    eval_idx.append(ev + offset)
                    per_source.append({"path": src.path, "files": len(files), "weight": src.weight,
                                       "rows_read": tally["read"], "examples": n, "train": len(tr), "eval": len(ev)})
                zero = int((part.weights == 0).sum())
                if zero:
                    dropped["weight_zero"] = dropped.get("weight_zero", 0) + zero
                offset += n
        if ticker.last != ticker.start:  # a long encode reported progress: close with the final figures
            ticker.report()
        marks["encode"] = time.time()
        every = spill.close()
        if bad_all:
            raise DataError(bad_rows_message(bad_all),
                            hint="fix or remove these rows (`sftjob validate --data ...` lists them all)")
        order = np.concatenate(train_idx)
        if not len(order):
            raise DataError(no_examples_message(read_total, dropped, over_length, spec.data),
                            hint=no_examples_hint(dropped, over_length))
        train_order = rng.permutation(order) if spec.data.shuffle else order
        eval_order = np.concatenate(eval_idx)
        train, evald = every.take(train_order), every.take(eval_order)
        rep = report.build(spec, chat, tok, per_source, read_total, dropped, truncated, train, evald, key)
        rep["truncation"]["longer_than_max_length"] = over_length
        marks["split_and_mix"] = time.time()
        with ThreadPoolExecutor(1, thread_name_prefix="plot") as plotter:  # the histogram draws while parquet writes
            plot = plotter.submit(report.plot_lengths, tmp / "token_lengths.png", train.lengths, spec.data.max_length)
            bins_eff, n_rows = stream.write(tmp / "train.parquet", spill, every, train_order, spec.data.packing,
                                            spec.data.max_length)
            if len(evald):
                stream.write(tmp / "eval.parquet", spill, every, eval_order, False, spec.data.max_length)
            rep["packing"].update(efficiency=bins_eff, bins=n_rows if spec.data.packing else None)
            if spec.data.packing:  # the windows' yardstick: best-fit-decreasing over the whole set at once
                one_window = int(train.lengths.sum()) <= stream.window_tokens(spec.data.max_length)
                rep["packing"]["efficiency_whole_set"] = round(  # one window is the whole set: no second packing
                    bins_eff if one_window else stream.whole_set_efficiency(train.lengths, spec.data.max_length), 4)
            # flat summary for the planner (job/train/plan.py): rows of train.parquet per epoch
            rep.update(rows_kept=len(train), tokens_total=rep["tokens"]["total"],
                       packed_bins=n_rows if spec.data.packing else None)
            marks["parquet"] = time.time()
            plot.result()
        spill.remove()
        marks["plot"] = time.time()
        rep["prep_seconds"] = round(time.time() - t0, 3)
        rep["tokens_per_second"] = round(rep["tokens"]["total"] / max(rep["prep_seconds"], 1e-9))
        prev, rep["timings"] = t0, {}
        for name, t in marks.items():
            rep["timings"][name] = round(t - prev, 3)
            prev = t
        report.write(tmp, rep)
        (tmp / "chat_template.jinja").write_text(chat.text)
        meta = {"key": key, "version": PREP_VERSION, "template_sha256": chat.sha256, "template_name": chat.name,
                "eos_tokens": chat.eos_tokens, "system": chat.system, "eval": bool(len(evald)),
                "packing": spec.data.packing, "max_length": spec.data.max_length}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if dest.exists() and not (dest / "meta.json").exists():  # not ours: renames are atomic, so incomplete
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another prepare finished first: same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:  # the plot thread is done (the with block waited for it): nothing writes into tmp
        spill.remove()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared data: %s", dest)
    return Prepared.load(dest, cache_hit=False)


# ---- encoding, in parallel -------------------------------------------------------------------

_WORKER: tuple | None = None  # (encoder, data spec, model spec), inherited by forked workers


def _init_worker(state: tuple) -> None:
    global _WORKER
    _WORKER = state
    # one core per worker (and a Rust thread pool inherited through fork would deadlock)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_chunks(chunks: list[list[tuple]]) -> list[Encoded]:
    enc, d, m = _WORKER
    return list(pipelined(enc, iter(chunks), d, m))


def pipelined(encoder: Encoder, chunks: Iterator[list[tuple]], data_spec, model_spec, progress=None) -> Iterator[Encoded]:
    """Overlap Python (parse, render, spans) of chunk k+1 with the Rust tokenization of chunk k.

    The fast tokenizer releases the GIL, so its batch runs while this thread renders the next chunk;
    per-token work never runs in Python.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        pending = None
        for c in chunks:
            staged = encoder.stage(c, data_spec, model_spec)
            nxt = pool.submit(encoder.tokenize, staged)
            if pending is not None:
                done = encoder.finish(pending.result())
                _tokens(progress, [done])
                yield done
            pending = nxt
        if pending is not None:
            done = encoder.finish(pending.result())
            _tokens(progress, [done])
            yield done


def _tokens(progress, encoded: list[Encoded]) -> None:
    if progress is not None:
        progress.tick(tokens=sum(int(e.lengths.sum()) for e in encoded))


@contextmanager
def worker_pool(encoder: Encoder, data_spec, model_spec, num_proc: int):
    """One forked worker per core, each with a one-thread tokenizer (it runs the threaded pipeline, so its
    Python overlaps its Rust); None for num_proc 1.

    Measured on 2 cores, 100k rows: 2 workers 13.1 s wall / 22.4 CPU-s against 16.3 s / 24.8 CPU-s for one
    process whose tokenizer thread runs on both cores: Python (parse, render, spans) is the longer half,
    and in one process it runs on one core only. A one-thread tokenizer per worker also keeps a 16-core
    node at 16 busy threads, not 16 x 16, and never uses a Rust thread pool inherited through the fork.
    """
    if num_proc <= 1:
        yield None
        return
    with Workers(num_proc, _encode_chunks, _init_worker, ((encoder, data_spec, model_spec),),
                 name="tokenizer") as pool:
        yield pool


def encode_stream(encoder: Encoder, records: Iterable[tuple], data_spec, model_spec, num_proc: int = 1,
                  keep_text: bool = False, pool=None, progress=None) -> tuple[list[Encoded], list[BadRow], int]:
    """Every chunk of encode_iter in a list, the bad rows sorted by file and line, and the rows read."""
    tally: dict = {}
    out = list(encode_iter(encoder, records, data_spec, model_spec, num_proc, keep_text, pool, progress, tally))
    bad = sorted((b for e in out for b in e.bad), key=where_key)
    return out, bad, tally["read"]


def encode_iter(encoder: Encoder, records: Iterable[tuple], data_spec, model_spec, num_proc: int = 1,
                keep_text: bool = False, pool=None, progress=None, tally: dict | None = None) -> Iterator[Encoded]:
    """Parse, normalise and encode raw records in chunks, in order (pipelined; forked workers if given a pool),
    reading only as far ahead as the workers need: a whole data set never sits in memory.

    ``progress`` (job/data/progress.py) counts rows as they are read and tokens as chunks come back;
    ``tally["read"]`` is the number of rows read once the iterator is exhausted."""
    tally = {} if tally is None else tally
    tally["read"] = 0

    def chunks():
        buf: list[tuple] = []
        for rec in records:
            tally["read"] += 1
            buf.append(rec)
            if len(buf) >= CHUNK_ROWS:
                if progress is not None:
                    progress.tick(rows=len(buf))
                yield buf
                buf = []
        if buf:
            if progress is not None:
                progress.tick(rows=len(buf))
            yield buf

    def counted(groups):
        for group in groups:
            _tokens(progress, group)
            yield from group

    if keep_text:
        for c in chunks():
            yield encoder.encode_records(c, data_spec, model_spec, keep_text=True)
    elif pool is not None:  # groups of chunks per worker task: each runs the pipeline
        yield from counted(pool.imap(_grouped(chunks(), 4)))
    elif num_proc > 1:
        with worker_pool(encoder, data_spec, model_spec, num_proc) as p:
            yield from counted(p.imap(_grouped(chunks(), 4)))
    else:
        yield from pipelined(encoder, chunks(), data_spec, model_spec, progress)


def _grouped(it, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def no_examples_message(read: int, dropped: dict, over_length: int, data_spec) -> str:
    """Why nothing is left to train on: the same words from validate and prepare."""
    why = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()) if v) or "none"
    msg = f"no training examples left: {read} row(s) read, dropped {why}"
    if over_length:
        msg += f"; {over_length} longer than max_length {data_spec.max_length} ({data_spec.truncation})"
    return msg


def no_examples_hint(dropped: dict, over_length: int) -> str:
    if over_length and (dropped.get("no_trained_tokens") or dropped.get("too_long")):
        return ("raise max_length: the cut left no assistant tokens to train on (or use truncation: truncate_left "
                "to keep the end of each conversation)")
    return "check the data (`sftjob validate`) and the train flags / weights of the rows"


def _merge(dropped: dict, ex: list[Encoded]) -> None:
    for e in ex:
        for k, v in e.dropped.items():
            dropped[k] = dropped.get(k, 0) + v


# ---- splits and mixtures, on example indices ---------------------------------------------
