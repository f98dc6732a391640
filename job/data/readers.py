"""Input files: which are read (extensions, hidden files), their text encoding, and their rows streamed
out one by one with the line each came from (jsonl, jsonl.gz line by line; parquet by record batch; a .json
array parsed whole, each element keeping its line number), so every problem names FILE:LINE."""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job import storage
from job.data.rows import RowIssue
from job.errors import DataError, NotFoundError

EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet")


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


# ---- one JSON row, read safely (duplicate keys, lone surrogates, nesting) ----------------------

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
