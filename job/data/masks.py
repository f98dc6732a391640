"""Render, tokenize and mask: input_ids exactly as apply_chat_template(tokenize=True), labels on assistant turns.

How assistant spans are found for ANY template, without {% generation %} markers:
1. The template is rendered once per *role sequence* with placeholder contents (cached), which splits
   its output into literal scaffolding and numbered content slots, whatever the template does with
   the order (system folded into the last user turn, roles renamed, BOS in front, ...).
2. Each real rendering is walked against that skeleton; a slot matches the content as is or trimmed
   (templates that ``| trim``). That gives exact character spans of every message. When the walk
   fails (content-dependent templates) the contents are searched in order instead; when even that
   fails (templates that rewrite contents) and for tool-use rows (calls rendered from structured
   fields), each assistant turn is what changes when that turn alone becomes a placeholder.
3. The full text is tokenized in one batched fast-tokenizer call (add_special_tokens=False, as
   transformers does inside apply_chat_template) and character spans become token labels through the
   tokenizer's offsets, so SentencePiece merges across a boundary never shift anything.
With generation markers the template's own spans are used and both ways are checked to agree.
The end-of-turn token(s) right after assistant content are trained too (train_on_eos).
Over 400 lines for one reason: it is one class, the Encoder, whose steps share its caches (a skeleton per
role sequence, the tokenizer, the template's probes); the stateless span helpers live in job/data/spans.py.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from job.data.formats import BadRow, Row, to_row
from job.data.spans import (
    EMPTY_THINK,
    Unmaskable,
    first_line,
    ranges_mask,
    reasoning_start,
    search,
    token_range,
    walk,
)
from job.data.templates import ChatTemplate, sentinel, syntax_error_at
from job.errors import ConfigError

_SLOT = re.compile("\ue000(\\d+)\ue001")
_GEN = re.compile(r"\{%-?\s*generation\s*-?%\}")
IGNORE = -100


@dataclass
class Encoded:
    """A batch of examples as flat arrays (cheap to pickle across processes, no per-token lists)."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray
    turns: np.ndarray
    wheres: list[str]
    bad: list[BadRow] = field(default_factory=list)  # rows the template rejects or that cannot be masked
    dropped: dict[str, int] = field(default_factory=dict)  # reason → rows (too_long, no_trained_tokens)
    too_long: list[BadRow] = field(default_factory=list)
    truncated: int = 0  # rows cut to max_length and kept
    over_length: int = 0  # rows longer than max_length, whatever became of them (cut, dropped)
    rendered: list[tuple[str, list[tuple[int, int]], list[dict]]] | None = None  # preview: text, offsets, messages


@dataclass
class _Pending:
    """One chunk between the stages of Encoder (rendered, spans located, maybe tokenized)."""

    rows: list[Row]
    bad: list[BadRow]
    keep_text: bool
    keep: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    intervals: list = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    convs: list = field(default_factory=list)
    encs: list | None = None
    ids: list | None = None
    ranges: list | None = None
    offsets: list | None = None


def fold_system(messages: list[dict]) -> list[dict]:
    """For templates without a system role: "system\\n\\nuser" as the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    sys_text, rest = messages[0]["content"], messages[1:]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            return rest[:i] + [{**m, "content": f"{sys_text}\n\n{m['content']}"}] + rest[i + 1:]
    return [{"role": "user", "content": sys_text}] + rest


class Encoder:
    def __init__(self, tokenizer, chat: ChatTemplate, max_length: int, truncation: str, train_on_eos: str):
        self.tok, self.chat = tokenizer, chat
        self.max_length, self.truncation, self.train_on_eos = max_length, truncation, train_on_eos
        self.markers = bool(_GEN.search(chat.text))
        self._compiled, self._kwargs, self._checked = None, {}, False
        try:  # the same compiled template and kwargs apply_chat_template uses, minus its per-call copying
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

            self._compiled = _compile_jinja_template(chat.text)
            self._kwargs = _plain_template_data(dict(getattr(tokenizer, "special_tokens_map", {}) or {}))
        except Exception:  # noqa: BLE001 - fall back to apply_chat_template for every row
            self._compiled = None
        self._skeletons: dict[tuple, list | Exception] = {}
        eos = sorted({e for e in chat.eos_tokens if e}, key=len, reverse=True)
        # a run of them: Command R7B ends a turn with <|END_RESPONSE|><|END_OF_TURN_TOKEN|>
        self._eos = re.compile(r"\s*(?:" + "|".join(map(re.escape, eos)) + ")+") if eos else None
        self._eos_any = re.compile("|".join(map(re.escape, eos))) if eos else None  # the next one, anywhere

    # ---- rendering ---------------------------------------------------------------------
    def messages_for(self, row: Row) -> list[dict]:
        """The messages the template sees (train flags removed; system folded where unsupported)."""
        msgs = fold_system(row.messages) if self.chat.system == "folded" else row.messages
        return msgs

    def _render(self, convs: list[list[dict]]) -> tuple[list[str], list | None]:
        plain = [[{"role": m["role"], "content": m["content"]} for m in c] for c in convs]
        if self.markers:
            from transformers.utils.chat_template_utils import render_jinja_template

            return render_jinja_template(conversations=plain, chat_template=self.chat.text,
                                         return_assistant_tokens_mask=True, **self.tok.special_tokens_map)
        if self._compiled is None:
            return self.tok.apply_chat_template(plain, chat_template=self.chat.text, tokenize=False), None
        texts = [self._compiled.render(messages=c, tools=None, documents=None, add_generation_prompt=False,
                                       **self._kwargs) for c in plain]
        if not self._checked:  # the fast path must be byte-identical to apply_chat_template
            ref = self.tok.apply_chat_template(plain[0], chat_template=self.chat.text, tokenize=False)
            if ref != texts[0]:
                self._compiled = None
                return self._render(convs)
            self._checked = True
        return texts, None

    def _skeleton(self, roles: tuple) -> list:
        if roles not in self._skeletons:
            try:
                text = self._render([[{"role": r, "content": sentinel(i)} for i, r in enumerate(roles)]])[0][0]
                parts = _SLOT.split(text)
                self._skeletons[roles] = [int(p) if k % 2 else p for k, p in enumerate(parts)]
            except Exception as e:  # noqa: BLE001 - raise_exception in templates
                self._skeletons[roles] = e
        return self._skeletons[roles]

    def spans(self, text: str, msgs: list[dict]) -> dict[int, tuple[int, int]] | None:
        """Character span of every message's content in the rendered text (None if not locatable)."""
        sk = self._skeleton(tuple(m["role"] for m in msgs))
        if isinstance(sk, list):
            out = walk(text, sk, msgs)
            if out is not None:
                return out
        return search(text, msgs)

    # ---- the batch ---------------------------------------------------------------------
    def encode_records(self, recs: list[tuple], data_spec, model_spec, keep_text: bool = False) -> Encoded:
        """Raw records (from formats.iter_records) → normalised rows → Encoded; bad rows reported in it."""
        return self.finish(self.tokenize(self.stage(recs, data_spec, model_spec, keep_text)))

    def encode(self, rows: list[Row], keep_text: bool = False) -> Encoded:
        return self.finish(self.tokenize(self._stage_rows(rows, [], keep_text)))

    # Three stages so a caller can overlap them: stage (Python: parse, render, locate spans),
    # tokenize (Rust, releases the GIL, parallel inside), finish (array ops).
    def stage(self, recs: list[tuple], data_spec, model_spec, keep_text: bool = False) -> _Pending:
        rows, bad = [], []
        for where, raw, fmt in recs:
            r = to_row(where, raw, fmt, data_spec, model_spec)
            (bad if isinstance(r, BadRow) else rows).append(r)
        return self._stage_rows(rows, bad, keep_text)

    def _stage_rows(self, rows: list[Row], bad: list[BadRow], keep_text: bool) -> _Pending:
        convs = [self.messages_for(r) for r in rows]
        tools = [bool(r.tools) or any(m["role"] == "tool" or "tool_calls" in m for m in c)
                 for r, c in zip(rows, convs, strict=True)]
        texts, gens = self._render_plain(rows, convs, tools, bad)
        p = _Pending(rows=rows, bad=bad, keep_text=keep_text)
        for i, t in enumerate(texts):
            try:
                masked = self._mask(rows[i], convs[i], t, gens[i] if gens else None, tools[i])
            except Unmaskable as e:
                bad.append(BadRow(rows[i].where, "messages", str(e)))
                continue
            if masked is None:  # the template rejected the row (reported while rendering)
                continue
            t, iv, nt = masked
            p.keep.append(i)
            p.texts.append(t)
            p.intervals.append(iv)
            p.turns.append(nt)
            if keep_text:
                p.convs.append(convs[i])
        return p

    def _render_plain(self, rows, convs, tools: list[bool], bad) -> tuple[list, list | None]:
        """Rows without tool use rendered in one batch; tool-use rows (None here) are rendered with
        their tools when they are masked."""
        if not any(tools):
            return self._render_each(rows, convs, bad)
        plain = [i for i, t in enumerate(tools) if not t]
        t_, g_ = self._render_each([rows[i] for i in plain], [convs[i] for i in plain], bad)
        texts, gens = [None] * len(rows), ([None] * len(rows) if g_ is not None else None)
        for k, i in enumerate(plain):
            texts[i] = t_[k]
            if gens is not None:
                gens[i] = g_[k]
        return texts, gens

    def _mask(self, row: Row, msgs: list[dict], text: str | None, gen, uses_tools: bool):
        """(text, trained character spans, trained turns); None for a row the template rejected."""
        if uses_tools:
            return self._by_rendering(row, msgs)
        if text is None:
            return None
        try:
            return (text, *self._trained(text, msgs, row, gen))
        except Unmaskable as first:
            if gen is not None:
                raise
            try:  # a template that rewrites contents: delimit the turns by rendering instead
                return self._by_rendering(row, msgs)
            except Unmaskable:
                raise first from None

    def tokenize(self, p: _Pending) -> _Pending:
        """Only the Rust batch call (GIL released): what a tokenizer thread runs."""
        p.encs = self._encode_batch(p.texts)
        return p

    def finish(self, p: _Pending) -> Encoded:
        p.ids, p.ranges, p.offsets = self._spans_to_tokens(p.texts, p.intervals, p.keep_text, p.encs)
        return self._finish(p.rows, p.keep, p.texts, p.ids, p.ranges, p.offsets, p.turns, p.bad,
                            p.convs if p.keep_text else None)

    def _render_each(self, rows, convs, bad):
        try:
            texts, gens = self._render(convs)
            return list(texts), gens
        except Exception:  # noqa: BLE001 - find the rows the template rejects, one by one
            pass
        texts, gens = [], []
        for r, c in zip(rows, convs, strict=False):
            try:
                t, g = self._render([c])
                texts.append(t[0])
                gens.append(g[0] if g else None)
            except Exception as e:  # noqa: BLE001
                msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
                roles = "/".join(m["role"] for m in c)
                bad.append(BadRow(r.where, "messages", f"the chat template rejects this conversation ({roles}): {msg}"))
                texts.append(None)
                gens.append(None)
        return texts, (gens if self.markers else None)

    def _by_rendering(self, row: Row, msgs: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
        """Turns delimited by rendering, not by finding contents: tool calls are rendered by the template
        from structured fields (no content to find), and some templates rewrite contents. Each assistant
        turn is what changes in the rendering when that turn alone is replaced by a placeholder without
        tool calls (else: what follows its generation prompt); the end-of-turn after it is added as for
        any turn."""
        plain = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
        kw = {"chat_template": self.chat.text, "tokenize": False, "tools": row.tools}
        try:
            text = self.tok.apply_chat_template(plain, **kw)
        except Exception as e:  # noqa: BLE001 - raise_exception in templates
            raise Unmaskable(f"the chat template rejects this tool-use conversation: {first_line(e)}") from None
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        last = asst[-1] if asst else -1
        out, nt = [], 0
        for i in asst:
            if msgs[i].get("train") is False:
                continue
            s, e = self._turn_by_diff(text, plain, i, kw) or self._turn_by_prompt(text, plain, i, kw)
            names = [c["function"]["name"] for c in msgs[i].get("tool_calls") or []]
            if names and not any(n in text[s:e] for n in names):
                raise Unmaskable(f"the chat template does not render the tool_calls of assistant message {i}; "
                                  "write the call into the content in the model's own tool-call format")
            think = EMPTY_THINK.match(text, s)
            if think and think.end() <= e and "<think>" not in (msgs[i]["content"] or ""):
                s = think.end()  # an empty reasoning block the template adds (Qwen3): scaffolding
            if self._eos is not None and (self.train_on_eos == "turn" or (self.train_on_eos == "last" and i == last)):
                m = self._eos.match(text, e)
                e = m.end() if m else e
            if e > s:
                out.append((s, e))
                nt += 1
        return text, out, nt

    def _turn_by_diff(self, text: str, plain: list[dict], i: int, kw: dict) -> tuple[int, int] | None:
        """Turn i = what differs from a rendering where it is a placeholder (None if the template refuses
        the placeholder, e.g. Mistral checks that tool results follow tool calls)."""
        alt = plain[:i] + [{"role": "assistant", "content": sentinel(0)}] + plain[i + 1:]
        try:
            other = self.tok.apply_chat_template(alt, **kw)
        except Exception:  # noqa: BLE001
            return None
        s = len(os.path.commonprefix([text, other]))
        tail = min(len(os.path.commonprefix([text[::-1], other[::-1]])), min(len(text), len(other)) - s)
        return (s, len(text) - tail) if sentinel(0) in other[s:len(other) - tail] else None

    def _turn_by_prompt(self, text: str, plain: list[dict], i: int, kw: dict) -> tuple[int, int]:
        """Turn i = from the end of the generation prompt for the conversation so far (what inference
        renders) to the next end-of-turn token; needs that prompt to be a prefix of the whole."""
        try:
            head = self.tok.apply_chat_template(plain[:i], add_generation_prompt=True, **kw) if i else None
        except Exception as e:  # noqa: BLE001
            raise Unmaskable(f"cannot delimit assistant message {i}: {first_line(e)}") from None
        if head is None or not text.startswith(head) or self._eos_any is None:
            raise Unmaskable(f"cannot delimit assistant message {i}: the template renders the conversation "
                              "before it differently from its generation prompt")
        eot = self._eos_any.search(text, len(head))
        if eot is None:
            raise Unmaskable(f"no end-of-turn token after assistant message {i}")
        return len(head), max(len(head), len(text[:eot.start()].rstrip()))

    def _trained(self, text: str, msgs: list[dict], row: Row, gen) -> tuple[list[tuple[int, int]], int]:
        spans = self.spans(text, msgs)
        if spans is None:
            raise Unmaskable("cannot locate the message contents in the rendered template text")
        asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        last = asst[-1] if asst else -1
        out, nt = [], 0
        for k, i in enumerate(asst):
            if i not in spans:
                raise Unmaskable(f"the chat template does not render assistant message {i}")
            s, e = spans[i]
            if gen is not None:
                if k >= len(gen) or not (gen[k][0] <= s and e <= gen[k][1]):
                    raise Unmaskable("the template's {% generation %} spans and the located assistant contents disagree")
            if msgs[i].get("train") is False:
                continue
            if "</think>" in msgs[i]["content"]:
                s = reasoning_start(text, s, e, msgs[i]["content"], max((v[1] for j, v in spans.items() if j < i), default=0))
            nt += 1
            with_eos = self.train_on_eos == "turn" or (self.train_on_eos == "last" and i == last)
            if gen is not None and with_eos:
                s, e = gen[k]
            elif with_eos and self._eos is not None:
                m = self._eos.match(text, e)
                if m:
                    e = m.end()
            out.append((s, e))
        return out, nt

    def _encode_batch(self, texts: list[str]):
        """Rust encodings of the texts, exactly as tokenizer(texts, add_special_tokens=False); None if unusable."""
        tok = self.tok
        if not texts or not (getattr(tok, "is_fast", False) and hasattr(tok, "_tokenizer")):
            return None
        first = tok(texts[0], add_special_tokens=False)["input_ids"]  # also resets truncation/padding state
        encs = tok._tokenizer.encode_batch(texts, add_special_tokens=False)
        return encs if encs[0].ids == first else None

    def _spans_to_tokens(self, texts: list[str], intervals, keep_offsets: bool, encs):
        """(ids per row, trained token ranges per row, offsets per row or None).

        Fast tokenizers: char_to_token at span edges only (no per-token Python). Slow tokenizers (or
        a wrapper that does more than the Rust call): token boundaries from tokenizing text prefixes.
        """
        if not texts:
            return [], [], None
        if encs is not None:
            ranges = [[r for s, e in iv if (r := token_range(enc, s, e))] for enc, iv in zip(encs, intervals, strict=True)]
            return [e.ids for e in encs], ranges, [e.offsets for e in encs] if keep_offsets else None
        tok = self.tok
        ids_l = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        ranges = [[(len(tok(t[:s], add_special_tokens=False)["input_ids"]), len(tok(t[:e], add_special_tokens=False)["input_ids"]))
                   for s, e in iv] for t, iv in zip(texts, intervals, strict=True)]
        return ids_l, ranges, None

    def _finish(self, rows, keep, texts, ids_l, ranges, offs_l, turns, bad, convs) -> Encoded:
        """Labels, truncation and drops for the whole batch with array ops; only over-long rows loop."""
        lengths = np.fromiter((len(x) for x in ids_l), dtype=np.int64, count=len(ids_l))
        ids = np.fromiter(chain.from_iterable(ids_l), dtype=np.int32, count=int(lengths.sum()))
        trained = ranges_mask(lengths, ranges)
        labels = np.where(trained, ids, IGNORE).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        lo, hi = starts[:-1].copy(), starts[1:].copy()
        ok = np.ones(len(keep), bool)
        dropped: dict[str, int] = {}
        too_long: list[BadRow] = []
        long_rows = np.flatnonzero(lengths > self.max_length)
        for j in long_rows.tolist():
            if self.truncation == "drop":
                ok[j] = False
                too_long.append(BadRow(rows[keep[j]].where, "(row)",
                                       f"{lengths[j]} tokens > max_length {self.max_length} with truncation: drop"))
            elif self.truncation == "truncate_right":
                hi[j] = lo[j] + self.max_length
            else:
                lo[j] = hi[j] - self.max_length
        if len(long_rows) and self.truncation == "drop":
            dropped["too_long"] = len(long_rows)
        cum = np.concatenate([[0], np.cumsum(trained)])
        none = ok & (cum[hi] - cum[lo] == 0)
        if none.any():
            dropped["no_trained_tokens"] = int(none.sum())
        ok &= ~none
        sel = np.flatnonzero(ok)
        lo, hi = lo[sel], hi[sel]
        n = hi - lo
        tok_idx = np.repeat(lo - np.concatenate([[0], np.cumsum(n)])[:-1], n) + np.arange(int(n.sum()))
        kept = [keep[j] for j in sel.tolist()]
        rendered = None
        if convs is not None:
            rendered = [(texts[j], list(offs_l[j][lo[k] - starts[j]:hi[k] - starts[j]]) if offs_l else [], convs[j])
                        for k, j in enumerate(sel.tolist())]
        return Encoded(ids=ids[tok_idx], labels=labels[tok_idx], lengths=n.astype(np.int32),
                       weights=np.asarray([rows[i].weight for i in kept], np.float32),
                       turns=np.asarray(turns, np.int32)[sel] if len(sel) else np.zeros(0, np.int32),
                       wheres=[rows[i].where for i in kept], bad=bad, dropped=dropped, too_long=too_long,
                       truncated=int(self.truncation != "drop") * len(long_rows) - int(none[long_rows].sum()),
                       over_length=len(long_rows),
                       rendered=rendered)


def check_encoder(enc: Encoder) -> None:
    """Fail early (not per row) when the template cannot be rendered at all."""
    sk = enc._skeleton(("user", "assistant"))
    if isinstance(sk, Exception):
        where = syntax_error_at(enc.chat.name, enc.chat.text, sk)
        why = f"Jinja syntax error at {where}: {sk.message}" if where else first_line(sk)
        raise ConfigError(f"chat template '{enc.chat.name}' fails on a plain user/assistant exchange: {why}",
                          hint="fix the Jinja template or pick a built-in chat_template")
    if 1 not in sk:  # nothing to train on: the template never outputs the assistant's text
        what = "the assistant message's content" if 0 in sk else "any message content"
        raise ConfigError(f"chat template '{enc.chat.name}' does not render {what} (a user/assistant exchange "
                          "renders without the messages' text)",
                          hint="the template must output message['content'] for every message, or pick a built-in chat_template")
