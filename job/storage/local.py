"""Local filesystem backend (also ``file://``), with the same guarantees as S3 where they matter.

Writes are atomic (temp file in the same directory + rename) so a killed process never leaves a
half-written file under its final name; ``if_none_match`` is an atomic create-if-absent (hard link),
the local twin of S3's ``If-None-Match: *``; ``sha256=`` is checked while copying, like S3's checksum.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from job.errors import (
    AlreadyPublishedError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    VerificationError,
)
from job.storage.paths import local_child

_BUF = 4 * 1024 * 1024


def _path(uri: str) -> Path:
    s = str(uri)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def _missing(uri) -> NotFoundError:
    return NotFoundError(f"not found: {uri}", hint="check the path")


@contextmanager
def _errors(uri, op: str):
    try:
        yield
    except FileNotFoundError:
        raise _missing(uri) from None
    except PermissionError:
        raise PermissionDeniedError(f"permission denied {op} {uri}",
                                    hint="check the file's owner/mode (the container runs as non-root)") from None
    except OSError as e:
        raise UnavailableError(f"{op} {uri} failed: {e.strerror or e}", hint="check the disk / volume") from None


def read_bytes(uri: str) -> bytes:
    with _errors(uri, "reading"):
        return _path(uri).read_bytes()


def open_read(uri: str):
    with _errors(uri, "reading"):
        return builtins.open(_path(uri), "rb")


def _atomic_write(p: Path, fill, if_none_match: bool, uri) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        if if_none_match:
            try:
                os.link(tmp, p)  # atomic create-if-absent
            except FileExistsError:
                raise AlreadyPublishedError(f"{uri} already exists; write refused",
                                            hint="publish to a new output or set output.overwrite: true") from None
        else:
            os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check(uri, got: str, want: str | None) -> None:
    if want and got != want:
        raise VerificationError(f"checksum mismatch writing {uri}: sha256 {got[:12]}… != expected {want[:12]}…",
                                hint="the source changed or is corrupted; rerun")


def write_bytes(uri: str, data: bytes, *, if_none_match: bool = False, sha256: str | None = None) -> None:
    if sha256:
        _check(uri, hashlib.sha256(data).hexdigest(), sha256)
    with _errors(uri, "writing"):
        _atomic_write(_path(uri), lambda f: f.write(data), if_none_match, uri)


def exists(uri: str) -> bool:
    return _path(uri).exists()


def check_access(prefix: str) -> None:
    """Prove, before training, that a file can be created and deleted in the output directory: a file
    (or a path under one) is 64, an unwritable directory 77. Directories made for the probe are removed."""
    p = _path(prefix).absolute()
    top = p
    while not top.exists() and top != top.parent:
        top = top.parent
    if not top.is_dir():
        where = "a file" if top == p else f"under a file ({top})"
        raise ConfigError(f"output {prefix} is {where}, not a directory",
                          hint="choose a directory (new or existing) for output.uri")
    made: list[Path] = []
    try:
        for d in reversed([p, *p.parents][:len(p.relative_to(top).parts)]):
            try:
                d.mkdir()
                made.append(d)
            except FileExistsError:  # another node or rank made it meanwhile
                continue
        probe = p / f".sftjob-probe-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise PermissionDeniedError(f"cannot write under {prefix} (creating a file there was denied)",
                                    hint="choose a writable output directory") from None
    except OSError as e:
        raise UnavailableError(f"cannot write under {prefix}: {e.strerror or e}", hint="check the disk / volume") from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass


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


def _copy(src: Path, dest: Path, uri, sha256: str | None = None, if_none_match: bool = False) -> None:
    h = hashlib.sha256()

    def fill(f):
        with builtins.open(src, "rb") as s:
            while chunk := s.read(_BUF):
                h.update(chunk)
                f.write(chunk)
        _check(uri, h.hexdigest(), sha256)

    _atomic_write(dest, fill, if_none_match, uri)


def sha256(uri: str) -> str:
    h = hashlib.sha256()
    with _errors(uri, "reading"), builtins.open(_path(uri), "rb") as f:
        while chunk := f.read(_BUF):
            h.update(chunk)
    return h.hexdigest()


def download_file(uri: str, dest: Path) -> Path:
    src = _path(uri)
    with _errors(uri, "copying"):
        if not src.is_file():
            raise _missing(uri)
        _copy(src, Path(dest), uri)
    return Path(dest)


def upload_file(src: Path, uri: str, *, sha256: str | None = None) -> None:
    with _errors(src, "copying"):
        _copy(Path(src), _path(uri), uri, sha256)


def download_tree(prefix: str, dest: Path) -> list[Path]:
    root = _path(prefix)
    if not root.exists():
        raise _missing(prefix)
    out = []
    for f in list_files(prefix):
        rel = Path(f).relative_to(root) if root.is_dir() else Path(Path(f).name)
        out.append(download_file(f, Path(dest) / rel))
    return out


def upload_tree(src: Path, prefix: str, *, files: Iterable[Path] | None = None,
                sha256: dict[str, str] | None = None) -> list[str]:
    src = Path(src)
    paths = [Path(f) for f in files] if files is not None else sorted(p for p in src.rglob("*") if p.is_file())
    out = []
    for f in paths:
        f = f if f.is_absolute() else src / f
        rel = f.relative_to(src).as_posix()
        uri = str(local_child(_path(prefix), rel, f"writing under {prefix}"))  # no symlink out of the output
        upload_file(f, uri, sha256=(sha256 or {}).get(rel))
        out.append(uri)
    return out


def fetch(uri: str, cache_dir: Path, only=None) -> Path:  # local files are used where they are
    p = _path(uri)
    if not p.exists():
        raise _missing(uri)
    return p
