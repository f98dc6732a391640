"""Row formats → one normal form: a list of {role, content[, train]} messages + a weight.

Files are read by job/data/readers.py (streamed, each row with its FILE:LINE); every problem is reported as
FILE:LINE: field: what.
Formats: OpenAI ``messages``, ShareGPT ``conversations``, Alpaca, prompt/completion (plain strings
become one user/assistant exchange rendered by the chat template; conversational lists are joined and
only the completion is trained). The format is detected per file from its first rows unless forced.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from job.data.readers import check_unique_keys, iter_file, parse_line, parsed
from job.data.rows import BadRow, Row, RowIssue
from job.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_ROLES = {  # the role names public datasets use; anything else is mapped with data.roles
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",  # ShareGPT
    "prompter": "user",  # OpenAssistant
    "model": "assistant",  # Gemma
    "function_call": "assistant", "observation": "tool", "function": "tool", "ipython": "tool",  # tool use
}
# Per-message "train this turn?" flags: ours, axolotl's, and a 0/1 per-message weight (ShareGPT exports).
TRAIN_FLAGS = ("train", "training", "weight")
CANONICAL = {  # canonical column name → default column name in the file
    "messages": "messages", "conversations": "conversations", "role": "role", "content": "content",
    "instruction": "instruction", "input": "input", "output": "output", "system": "system",
    "prompt": "prompt", "completion": "completion", "weight": "weight", "tools": "tools",
}
DETECT_ROWS = 20


# ---- formats -------------------------------------------------------------------------------

def detect(objs: list[Any], columns: dict[str, str]) -> str | None:
    col = {**CANONICAL, **columns}.get
    votes: dict[str, int] = {}
    for o in objs:
        if not isinstance(o, dict):
            continue
        for fmt, keys in (("messages", ["messages"]), ("sharegpt", ["conversations"]),
                          ("alpaca", ["instruction", "output"]), ("prompt_completion", ["prompt", "completion"])):
            if all(col(k) in o for k in keys):
                votes[fmt] = votes.get(fmt, 0) + 1
                break
    return max(votes, key=votes.get) if votes else None


def normalize(obj: Any, fmt: str, columns: dict[str, str], roles: dict[str, str],
              ) -> tuple[list[dict], float, list[dict] | None]:
    """(messages, weight, tools) or RowIssue. Messages are {role, content[, train][, tool_calls, name,
    tool_call_id]} with roles mapped."""
    if isinstance(obj, RowIssue):
        raise obj
    if isinstance(obj, bytes):  # a JSON line, parsed late so workers do it in parallel
        raw = obj
        obj = parse_line(raw)
        check_unique_keys(raw, obj)
    if not isinstance(obj, dict):
        raise RowIssue("(row)", f"expected a JSON object, got {type(obj).__name__}")
    col = {**CANONICAL, **columns}
    if fmt in ("messages", "sharegpt"):
        key = col["messages"] if fmt == "messages" else col["conversations"]
        rk, ck = (col["role"], col["content"]) if fmt == "messages" else (columns.get("role", "from"), columns.get("content", "value"))
        msgs = message_list(obj, key, rk, ck, roles)
    elif fmt == "alpaca":
        instr, inp, out = (_text(obj, col[k], required=k != "input") for k in ("instruction", "input", "output"))
        msgs = [{"role": "user", "content": instr + (f"\n\n{inp}" if inp.strip() else "")},
                {"role": "assistant", "content": out}]
        if isinstance(obj.get(col["system"]), str) and obj[col["system"]].strip():
            msgs.insert(0, {"role": "system", "content": obj[col["system"]]})
    elif fmt == "prompt_completion":
        p, c = obj.get(col["prompt"]), obj.get(col["completion"])
        if isinstance(p, list) or isinstance(c, list):
            pm = message_list(obj, col["prompt"], col["role"], col["content"], roles, need_assistant=False)
            cm = message_list(obj, col["completion"], col["role"], col["content"], roles)
            msgs = [{**m, "train": m.get("train", False)} if m["role"] == "assistant" else m for m in pm] + cm
        else:
            msgs = [{"role": "user", "content": _text(obj, col["prompt"])},
                    {"role": "assistant", "content": _text(obj, col["completion"])}]
    else:
        raise RowIssue("(row)", f"unknown format '{fmt}'")
    return msgs, row_weight(obj, col["weight"]), _tools(obj.get(col["tools"]), col["tools"])


def _tools(tools: Any, key: str) -> list[dict] | None:
    """The row's tool (function) schemas: a list, or a JSON string of one (as many datasets store it)."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowIssue(key, f"not valid JSON: {e.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowIssue(key, "must be a list of tool schemas ({type: function, function: {name, parameters}})")
    return tools or None


def message_list(obj: dict, key: str, rk: str, ck: str, roles: dict[str, str], need_assistant: bool = True) -> list[dict]:
    if key not in obj:
        other = detect([obj], {})
        hint = (f"; this row looks like {other} — one file holds one format: split the file" if other else "")
        raise RowIssue(key, f"missing (row has: {', '.join(map(str, list(obj)[:8])) or 'no fields'}){hint}")
    raw = obj[key]
    if not isinstance(raw, list) or not raw:
        raise RowIssue(key, "must be a non-empty list of messages" if isinstance(raw, list) else f"must be a list, got {type(raw).__name__}")
    rmap = _role_map(tuple(sorted(roles.items())))
    out = []
    has_assistant = False
    for i, m in enumerate(raw):  # hot loop: the common case takes no slow path
        if type(m) is not dict:
            raise RowIssue(f"{key}[{i}]", f"must be an object with {rk}/{ck}, got {type(m).__name__}")
        role = m.get(rk)
        mapped = rmap.get(role) if type(role) is str else None
        if mapped is None:
            mapped = _slow_role(role, rmap, f"{key}[{i}].{rk}")
        c = m.get(ck)
        if type(c) is not str or not c or c.isspace():
            c = _content(c, f"{key}[{i}].{ck}", mapped, m.get("tool_calls"))
        msg = {"role": mapped, "content": c}
        if len(m) > 2 or ck not in m:  # more than role and content (a tool call may come without content)
            t = _train_flag(m, f"{key}[{i}]", mapped)
            if t is not None:
                msg["train"] = t
            if mapped == "assistant" and m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{key}[{i}].tool_calls")
            elif mapped == "tool":
                msg.update({k: m[k] for k in ("name", "tool_call_id") if m.get(k) is not None})
        has_assistant = has_assistant or mapped == "assistant"
        out.append(msg)
    if need_assistant and not has_assistant:
        raise RowIssue(key, "no assistant turn")
    return out


def _train_flag(m: dict, where: str, role: str) -> bool | None:
    """train: true|false, axolotl's training: true|false, or weight: 0|1 on a message."""
    for k in TRAIN_FLAGS:
        t = m.get(k)
        if t is None:
            continue
        if k == "weight" and type(t) in (int, float) and t in (0, 1):
            t = bool(t)
        if type(t) is not bool:
            want = "0 or 1" if k == "weight" else "true or false"
            raise RowIssue(f"{where}.{k}", f"must be {want}, got {t!r}")
        if t and role != "assistant":
            if k == "weight":  # exports put weight 1 on every turn; only assistant turns are trained anyway
                return None
            raise RowIssue(f"{where}.{k}", f"only assistant messages can be trained (role is {role})")
        return t
    return None


@lru_cache(maxsize=64)
def _role_map(roles: tuple) -> dict[str, str]:
    rmap = {**DEFAULT_ROLES, **dict(roles)}
    return {k: v for k, v in rmap.items() if v in ROLES}


def _slow_role(role: Any, rmap: dict[str, str], where: str) -> str:
    if not isinstance(role, str):
        raise RowIssue(where, "missing role" if role is None else f"role must be a string, got {type(role).__name__}")
    mapped = rmap.get(role.lower())
    if mapped is None:
        raise RowIssue(where, f"unknown role '{role}' (expected system, user, assistant or tool; map others with data.roles)")
    return mapped


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI-style tool calls → what chat templates read: {type, function: {name, arguments: dict}}.
    Tool use passes through to the template as transformers expects it: tool_calls on assistant
    messages, name / tool_call_id on tool results, the row's schemas as `tools`."""
    if not isinstance(calls, list) or not calls:
        raise RowIssue(where, "must be a non-empty list of calls")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowIssue(f"{where}[{k}]", "each call needs a function name ({function: {name, arguments}})")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string; templates render a mapping
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RowIssue(f"{where}[{k}].function.arguments", f"not valid JSON: {e.msg}") from None
        out.append({**({"id": call["id"]} if isinstance(call, dict) and "id" in call else {}),
                    "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _content(c: Any, where: str, role: str = "", tool_calls: Any = None) -> str:
    if role == "assistant" and tool_calls and (c is None or (isinstance(c, str) and not c.strip())):
        return c or ""  # a turn that only calls tools
    if role == "tool" and isinstance(c, (dict, list)) and not (isinstance(c, list) and c and isinstance(c[0], dict)
                                                                and c[0].get("type") == "text"):
        return json.dumps(c, ensure_ascii=False)  # a structured tool result
    if isinstance(c, list):  # OpenAI content parts
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise RowIssue(where, "only text content parts ({type: text, text: ...}) are supported")
            parts.append(p["text"])
        c = "".join(parts)
    if c is None:
        raise RowIssue(where, "missing content")
    if not isinstance(c, str):
        raise RowIssue(where, f"content must be a string, got {type(c).__name__}")
    if not c.strip():
        raise RowIssue(where, "empty content")
    return c


def _text(obj: dict, key: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if v is None:
        raise RowIssue(key, f"missing (row has: {', '.join(map(str, list(obj)[:8]))})")
    if not isinstance(v, str):
        raise RowIssue(key, f"must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise RowIssue(key, "empty content")
    return v


def row_weight(obj: dict, key: str) -> float:
    w = obj.get(key, 1.0)
    if w is None:
        return 1.0
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= MAX_WEIGHT:  # NaN fails too
        raise RowIssue(key, f"must be a number from 0 to {MAX_WEIGHT:g} (copies of the row), got {w!r}")
    return float(w)


#: a row (or source) weight is a number of copies: a larger one is a mistake that would exhaust memory
MAX_WEIGHT = 1000.0


def apply_system_prompt(messages: list[dict], prompt: str | None, mode: str) -> list[dict]:
    """default: add prompt where a row has no system message; override: replace it; none: leave rows alone."""
    if not prompt or mode == "none":
        return messages
    has = bool(messages) and messages[0]["role"] == "system"
    if mode == "override":
        return [{"role": "system", "content": prompt}] + (messages[1:] if has else messages)
    return messages if has else [{"role": "system", "content": prompt}] + messages


def iter_records(files: list[tuple[str, Path]], data_spec, limit: int | None = None,
                 ) -> Iterator[tuple[str, Any, str]]:
    """(FILE:LINE, raw row, format) for every row of the files (from expand), in order; cheap, unparsed."""
    n = 0
    if limit is not None and limit <= 0:
        return
    for display, path in files:
        it = iter_file(display, path)
        head: list[tuple[str, Any]] = []
        fmt = data_spec.format
        if fmt == "auto":
            for item in it:
                head.append(item)
                if len(head) >= DETECT_ROWS:
                    break
            objs = [parsed(o) for _, o in head]
            fmt = detect(objs, data_spec.columns)
            if fmt is None:
                refuse_unreadable(head)
                keys = sorted({k for o in objs if isinstance(o, dict) for k in o})[:10]
                if looks_like_pairs(objs, data_spec.columns):  # iter_records reads SFT rows only
                    raise DataError(f"{display}: these look like preference pairs: use --objective dpo "
                                    f"(fields: {', '.join(keys)}; this run's objective is sft)",
                                    hint="set --objective dpo (train.objective: dpo) to train on preference pairs, "
                                         "or give SFT rows (messages, conversations, ...)")
                raise DataError(f"{display}: cannot detect the row format from the first rows (fields: {', '.join(keys) or 'none'})",
                                hint="set data.format (messages, sharegpt, alpaca, prompt_completion) and data.columns")
        for where, obj in chain_rows(head, it):
            yield where, obj, fmt
            n += 1
            if limit is not None and n >= limit:
                return


def refuse_unreadable(head: list[tuple[str, Any]]) -> None:
    """When no row of a file's first rows is readable JSON, the first one's problem as a DataError (a
    one-row file with a broken row was reported as a format that cannot be detected)."""
    first = None
    for where, o in head:
        try:
            if isinstance(o, RowIssue):
                raise o
            if isinstance(o, bytes):
                parse_line(o)
        except RowIssue as e:
            first = first or (where, e)
            continue
        return
    if first is not None:
        raise DataError(f"{first[0]}: {first[1]}",
                        hint="fix or remove this row (`sftjob validate --data ...` lists every bad row)")


def to_row(where: str, raw: Any, fmt: str, data_spec, model_spec) -> Row | BadRow:
    try:
        msgs, weight, tools = normalize(raw, fmt, data_spec.columns, data_spec.roles)
    except RowIssue as e:
        return BadRow(where, e.field, e.problem)
    return Row(where, apply_system_prompt(msgs, model_spec.system_prompt, model_spec.system_prompt_mode), weight, tools)


def read_rows(files: list[tuple[str, Path]], data_spec, model_spec, limit: int | None = None,
              ) -> Iterator[Row | BadRow]:
    """Every row of the files, normalised (Row) or what is wrong with it (BadRow), in order."""
    for where, raw, fmt in iter_records(files, data_spec, limit):
        yield to_row(where, raw, fmt, data_spec, model_spec)


def chain_rows(head, it):
    yield from head
    yield from it


PAIR_KEYS = ("prompt", "chosen", "rejected")  # a preference pair's fields (job/data/preference.py)


def looks_like_pairs(objs: list[Any], columns: dict[str, str]) -> bool:
    """True when most parsed rows carry chosen (and rejected) columns: preference data."""
    col = {k: columns.get(k, k) for k in PAIR_KEYS}
    dicts = [o for o in objs if isinstance(o, dict)]
    return bool(dicts) and sum(col["chosen"] in o for o in dicts) * 2 > len(dicts)
