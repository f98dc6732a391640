"""Where each message sits in a rendered chat: character spans by walking the template's skeleton or by
searching the contents in order, then token ranges and the label mask (job/data/masks.py's Encoder uses
these; they hold no state of their own)."""
from __future__ import annotations

import re

import numpy as np


class Unmaskable(Exception):
    pass


def variants(c: str) -> tuple[str, ...]:
    """How a template may render a content: as is, trimmed, or only the answer after ``</think>``
    (Qwen3, DeepSeek-R1/V3 and GLM drop the reasoning of earlier turns, or of every turn)."""
    out = (c, c.strip(), c.rstrip(), c.lstrip())
    if "</think>" in c:
        answer = c.split("</think>")[-1]
        out += (answer, answer.lstrip("\n"), answer.strip())
    return out


EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def reasoning_start(text: str, s: int, e: int, content: str, floor: int) -> int:
    """Where a turn with reasoning starts when the template rewrote it (GLM-4.5 renders
    '<think>' + reasoning.strip() + '</think>' before the answer): from its <think> on, so the reasoning
    the model must write is trained. Reasoning a template leaves out (history turns, DeepSeek) stays out."""
    if "</think>" in text[s:e]:  # rendered as written
        return s
    reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
    j = text.rfind(reasoning, floor, s) if reasoning else -1
    if j < 0 or text[j + len(reasoning):s].strip() != "</think>":
        return s
    k = text.rfind("<think>", floor, j)
    return k if k >= 0 and not text[k + len("<think>"):j].strip() else s


def walk(text: str, sk: list, msgs: list[dict]) -> dict[int, tuple[int, int]] | None:
    """Match text against the skeleton [literal, slot, literal, slot, ..., literal]; spans per slot."""
    first = sk[0]
    if not text.startswith(first):
        return None
    pos, out = len(first), {}
    for k in range(1, len(sk), 2):
        part, nxt = sk[k], sk[k + 1]
        c = msgs[part]["content"]
        end = pos + len(c)
        if not (text.startswith(c, pos) and text.startswith(nxt, end)):
            for cand in variants(c)[1:]:  # templates that trim, or drop the reasoning
                end = pos + len(cand)
                if text.startswith(cand, pos) and text.startswith(nxt, end):
                    break
            else:
                return None
        if part not in out:
            out[part] = (pos, end)
        pos = end + len(nxt)
    return out if pos == len(text) else None


def search(text: str, msgs: list[dict]) -> dict[int, tuple[int, int]] | None:
    pos, out = 0, {}
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            continue
        for cand in variants(m["content"]):
            j = text.find(cand, pos)
            if j >= 0:
                out[i] = (j, j + len(cand))
                pos = j + len(cand)
                break
        else:
            return None
    return out


def token_range(enc, s: int, e: int) -> tuple[int, int] | None:
    """Tokens overlapping chars [s, e): first token holding a char at/after s, last holding one before e."""
    a = None
    for c in range(s, e):
        a = enc.char_to_token(c)
        if a is not None:
            break
    b = None
    for c in range(e - 1, s - 1, -1):
        b = enc.char_to_token(c)
        if b is not None:
            break
    if a is None or b is None:
        return None
    n = len(enc)
    while b + 1 < n and (nxt := enc.token_to_chars(b + 1)) is not None and nxt[0] < e:
        b += 1  # several tokens for one char (byte fallback): take them all
    return a, b + 1


def ranges_mask(lengths: np.ndarray, ranges) -> np.ndarray:
    """Boolean per token of the batch: inside any trained token range (vectorised, no per-token Python)."""
    n_tok = int(lengths.sum())
    base = np.concatenate([[0], np.cumsum(lengths)])
    s = np.fromiter((base[r] + a for r, rr in enumerate(ranges) for a, _ in rr), dtype=np.int64)
    e = np.fromiter((base[r] + b for r, rr in enumerate(ranges) for _, b in rr), dtype=np.int64)
    diff = np.zeros(n_tok + 1, np.int64)
    np.add.at(diff, s, 1)
    np.add.at(diff, e, -1)
    return np.cumsum(diff[:-1]) > 0
