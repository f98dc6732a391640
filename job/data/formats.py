"""Input files and row formats → one normal form: a list of {role, content[, train]} messages + a weight.

Files are streamed (jsonl, jsonl.gz line by line; parquet by record batch); a .json array is parsed
whole but each element keeps its line number, so every problem is reported as FILE:LINE: field: what.
Formats: OpenAI ``messages``, ShareGPT ``conversations``, Alpaca, prompt/completion (plain strings
become one user/assistant exchange rendered by the chat template; conversational lists are joined and
only the completion is trained). The format is detected per file from its first rows unless forced.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from job import storage
from job.errors import DataError, NotFoundError

EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet")
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


class RowIssue(Exception):
    """A problem with one row: field + what is wrong (the caller adds FILE:LINE)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # crosses to the tokenizer workers (a .json array's unreadable element)
        return RowIssue, (self.field, self.problem)


@dataclass
class Row:
    where: str  # FILE:LINE
    messages: list[dict]
    weight: float = 1.0
    tools: list[dict] | None = None  # function schemas the chat template renders (tool-use rows)


@dataclass
class BadRow:
    where: str
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.problem}"


# ---- files ---------------------------------------------------------------------------------

def supported(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def expand(uri: str, cache_dir: Path) -> list[tuple[str, Path]]:
    """(display name, local path) for every data file a source names (file, directory or S3 prefix)."""
    uri = str(uri)
    if storage.is_remote(uri):
        files = [u for u in storage.list_files(uri) if supported(u) and not hidden(u)]
        if not files:
            raise NotFoundError(f"no data files ({', '.join(EXTENSIONS)}) under {uri}",
                                hint="check the S3 prefix and the file extensions")
        return [(u, storage.fetch(u, cache_dir)) for u in files]
    p = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and supported(f.name) and not hidden(str(f.relative_to(p))))
        if not files:
            raise DataError(f"{uri}: no data files ({', '.join(EXTENSIONS)}) in this directory",
                            hint="put .jsonl/.jsonl.gz/.json/.parquet files there or point data at a file")
        return [(str(f), f) for f in files]
    if not p.exists():
        raise NotFoundError(f"data not found: {uri}", hint="check the path (file, directory or s3:// prefix)")
    if not supported(p.name):
        raise DataError(f"{uri}: unsupported file extension '{''.join(p.suffixes) or '(none)'}'",
                        hint=f"use one of {', '.join(EXTENSIONS)}")
    return [(uri, p)]


def hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in Path(rel).parts)


_BOMS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe", "utf-16-le"))


def _encoding(display: str, path: Path, gz: bool) -> str | None:
    """The text encoding from the first bytes: None for UTF-8 (the fast path), else what to decode with."""
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        head = f.read(4)
    if not gz and head[:2] == b"\x1f\x8b":
        stem = path.name[:-len(path.suffix)] if path.suffix else path.name
        raise DataError(f"{display}: the file is gzip-compressed but its name does not end in .gz",
                        hint=f"rename it to {stem}.jsonl.gz (gzip-compressed JSON lines), or decompress it")
    enc = next((e for bom, e in _BOMS if head.startswith(bom)), None)
    if enc is None and b"\x00" in head:
        raise DataError(f"{display}: the file looks like UTF-16/UTF-32 text without a byte order mark",
                        hint="re-save it as UTF-8 (e.g. `iconv -f UTF-16LE -t UTF-8`)")
    return enc


def iter_file(display: str, path: Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, object or RowIssue) for every row; file-level problems raise DataError."""
    name = path.name.lower()
    n = 0
    try:
        if name.endswith(".parquet"):
            it = _iter_parquet(path)
        elif name.endswith(".json"):
            it = _iter_json_array(path, _encoding(display, path, False))
        else:
            gz = name.endswith(".gz")
            it = _iter_jsonl(path, gz=gz, encoding=_encoding(display, path, gz))
        for line, obj in it:
            n += 1
            yield f"{display}:{line}", obj
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{display}: unreadable file ({type(e).__name__}: {e})",
                        hint="re-create the file; a .gz must be a complete gzip stream") from None
    if n == 0:
        raise DataError(f"{display}: empty file (no rows)", hint="remove the file or add rows to it")


def _iter_jsonl(path: Path, gz: bool, encoding: str | None = None) -> Iterator[tuple[int, Any]]:
    f = gzip.open(path, "rb") if gz else open(path, "rb")
    with f:
        lines = f if encoding in (None, "utf-8-sig") else (  # json.loads takes a UTF-8 BOM; UTF-16/32 → UTF-8
            line.encode("utf-8") for line in io.TextIOWrapper(f, encoding=encoding))
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            yield i, raw  # parsed by the worker that normalises it (to_row), not here


def _iter_json_array(path: Path, encoding: str | None = None) -> Iterator[tuple[int, Any]]:
    text = path.read_bytes().decode(encoding or "utf-8", errors="replace").lstrip("\ufeff")
    dec = json.JSONDecoder(object_pairs_hook=_unique)
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] != "[":  # a JSON-lines file named .json
        yield from _iter_jsonl(path, gz=False, encoding=encoding)
        return
    i = _skip_ws(text, i + 1)
    rows: list[tuple[int, Any]] = []
    while i < len(text) and text[i] != "]":
        line, start = text.count("\n", 0, i) + 1, i
        try:
            obj, i = dec.raw_decode(text, i)
        except _DuplicateKey:
            obj, i = _MARKING.raw_decode(text, i)
            obj = _duplicate_issue(obj)
        except json.JSONDecodeError as e:
            rows.append((text.count("\n", 0, e.pos) + 1,
                         RowIssue("(row)", f"invalid JSON: {e.msg}; the rest of the array is unreadable")))
            break
        except RecursionError:
            rows.append((line, RowIssue("(row)", f"{_TOO_DEEP}; the rest of the array is unreadable")))
            break
        if text.find("\\ud", start, i) >= 0 or text.find("\\uD", start, i) >= 0:
            obj = _lone_surrogate(obj) or obj
        rows.append((line, obj))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    starts = Counter(line for line, _ in rows)
    for k, (line, obj) in enumerate(rows, 1):  # elements sharing a line are told apart by position
        yield (line if starts[line] == 1 else f"{line} (element {k})"), obj


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})", hint="re-write the file with pyarrow/pandas") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            i += 1
            yield i, obj


# ---- formats -------------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list) -> dict:
    """object_pairs_hook: a repeated key is an error (json.loads lets the last one win silently)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey
    return d


class _Marked(dict):
    duplicate: str | None = None


def _mark(pairs: list) -> dict:
    d = _Marked(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        d.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return d


_MARKING = json.JSONDecoder(object_pairs_hook=_mark)


def _duplicate_issue(obj: Any, where: str = "") -> RowIssue | None:
    """The first object (depth first) with a repeated key, as a RowIssue naming its place in the row."""
    if isinstance(obj, _Marked) and obj.duplicate is not None:
        return RowIssue(where or "(row)", f"duplicate key '{obj.duplicate}' (the last value would silently win)")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _duplicate_issue(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def parse_line(raw: bytes) -> Any:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RowIssue("(row)", f"invalid JSON: {getattr(e, 'msg', None) or e}") from None
    except RecursionError:
        raise RowIssue("(row)", _TOO_DEEP) from None
    if b"\\ud" in raw or b"\\uD" in raw:  # a \uXXXX escape of a UTF-16 surrogate: is it paired?
        issue = _lone_surrogate(obj)
        if issue is not None:
            raise issue
    return obj


_TOO_DEEP = "invalid JSON: nested too deeply to read (thousands of levels)"


def _lone_surrogate(obj: Any, where: str = "") -> RowIssue | None:
    """A string holding half of a UTF-16 surrogate pair (JSON lets ``\\ud800`` through; it is not a
    character, and the tokenizer rejects it), as a RowIssue naming its place in the row."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return RowIssue(where or "(row)", f"invalid Unicode: a lone surrogate (\\u{ord(obj[e.start]):04x}) at "
                                              f"character {e.start}; the file was written with broken escapes")
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        place = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
        found = _lone_surrogate(k, place) if isinstance(k, str) else None
        found = found or _lone_surrogate(v, place)
        if found is not None:
            return found
    return None


def check_unique_keys(raw: bytes, obj: Any) -> None:
    """RowIssue for a key repeated in one object of the row (json.loads keeps the last one silently).

    The fast path proves there is none without a Python hook per object: when no key has whitespace before
    its colon, every key adds one ``":`` to the raw bytes, so if their count equals the keys of the row
    and its messages, no key is repeated (and nothing deeper has keys). Otherwise (nested objects, a
    ``":`` inside a text) the row is parsed again with a hook that checks every object.
    """
    if type(obj) is not dict:
        return
    n = len(obj)
    for v in obj.values():
        if type(v) is list:
            for m in v:
                if type(m) is dict:
                    n += len(m)
    if raw.count(b'":') == n and b'" ' not in raw and b'"\t' not in raw and b'"\r' not in raw:
        return
    try:
        json.loads(raw, object_pairs_hook=_unique)
    except _DuplicateKey:
        raise _duplicate_issue(_MARKING.decode(raw.decode("utf-8-sig"))) from None


def parsed(obj: Any) -> Any:
    try:
        return parse_line(obj) if isinstance(obj, bytes) else obj
    except RowIssue:
        return None


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
