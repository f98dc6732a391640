"""Local filesystem backend (also ``file://``); writes are atomic (temp file + rename)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from job.errors import AlreadyPublishedError, NotFoundError, PermissionDeniedError


def _path(uri: str) -> Path:
    s = str(uri)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def _missing(uri) -> NotFoundError:
    return NotFoundError(f"not found: {uri}", hint="check the path")


def read_bytes(uri: str) -> bytes:
    p = _path(uri)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise _missing(uri) from None
    except PermissionError:
        raise PermissionDeniedError(f"permission denied reading {uri}") from None


def write_bytes(uri: str, data: bytes, *, if_none_match: bool = False) -> None:
    p = _path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if if_none_match:
        try:
            os.link(tmp, p)  # atomic create-if-absent
        except FileExistsError:
            raise AlreadyPublishedError(f"{uri} already exists") from None
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, p)


def exists(uri: str) -> bool:
    return _path(uri).exists()


def list_files(prefix: str) -> list[str]:
    root = _path(prefix)
    if root.is_file():
        return [str(root)]
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def delete(uri: str) -> None:
    _path(uri).unlink(missing_ok=True)


def delete_prefix(prefix: str) -> None:
    shutil.rmtree(_path(prefix), ignore_errors=True)


def download_file(uri: str, dest: Path) -> Path:
    src = _path(uri)
    if not src.exists():
        raise _missing(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def upload_file(src: Path, uri: str) -> None:
    write_bytes(uri, Path(src).read_bytes())


def download_tree(prefix: str, dest: Path) -> list[Path]:
    root = _path(prefix)
    if not root.exists():
        raise _missing(prefix)
    out = []
    for f in list_files(prefix):
        rel = Path(f).relative_to(root) if root.is_dir() else Path(Path(f).name)
        out.append(download_file(f, dest / rel))
    return out


def upload_tree(src: Path, prefix: str, *, files: Iterable[Path] | None = None) -> list[str]:
    files = [Path(f) for f in files] if files is not None else [p for p in src.rglob("*") if p.is_file()]
    out = []
    for f in files:
        f = f if f.is_absolute() else src / f
        uri = str(_path(prefix) / f.relative_to(src))
        upload_file(f, uri)
        out.append(uri)
    return out


def fetch(uri: str, cache_dir: Path) -> Path:
    p = _path(uri)
    if not p.exists():
        raise _missing(uri)
    return p
