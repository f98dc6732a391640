"""Storage by URI scheme: ``s3://bucket/key`` → s3.py, anything else → local.py.

Every other module reads and writes through these functions; only this package imports boto3.
URIs name objects/files; a "prefix" is a directory-like URI (trailing slash optional).
Errors are project errors with exit codes: NotFoundError 66, UnavailableError 69,
AlreadyPublishedError 73, PermissionDeniedError 77 (see job/errors.py).
Integrity: ``sha256=`` (hex) on writes/uploads is the digest the stored bytes must have; S3 sends it as
ChecksumSHA256 so the server rejects a body that does not match, the local backend checks it itself.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from job.storage import config, local, paths


def configure(settings) -> None:
    """Apply the run's storage section (endpoint, addressing style, retries, ...)."""
    config.current = settings
    if _s3_loaded():
        from job.storage import s3

        s3.reset()


def settings():
    return config.current


def _s3_loaded() -> bool:
    import sys

    return "job.storage.s3" in sys.modules


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def backend(uri: str):
    why = paths.scheme_problem(uri)
    if why:
        from job.errors import ConfigError

        raise ConfigError(why, hint="use s3://bucket/key or a local path")
    if is_remote(uri):
        from job.storage import s3

        return s3
    return local


def join(prefix: str, *parts: str) -> str:
    out = str(prefix).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def read_bytes(uri: str) -> bytes:
    return backend(uri).read_bytes(uri)


def open(uri: str):  # noqa: A001 - storage.open reads like io.open
    """A binary file object for reading (local file or S3 stream); close it (or use `with`)."""
    return backend(uri).open_read(uri)


def write_bytes(uri: str, data: bytes, *, if_none_match: bool = False, sha256: str | None = None) -> None:
    """Write an object; with if_none_match the write fails (AlreadyPublishedError) if it exists."""
    backend(uri).write_bytes(uri, data, if_none_match=if_none_match, sha256=sha256)


def sha256(uri: str) -> str:
    """Hex SHA256 of an object/file, streamed."""
    return backend(uri).sha256(uri)


def check_access(prefix: str) -> None:
    """Fail fast before long work: missing bucket → 66, denied → 77, endpoint down → 69."""
    backend(prefix).check_access(prefix)


def exists(uri: str) -> bool:
    return backend(uri).exists(uri)


def list_files(prefix: str) -> list[str]:
    """Every object/file under a prefix (recursive), as full URIs, sorted."""
    return backend(prefix).list_files(prefix)


def delete(uri: str) -> None:
    backend(uri).delete(uri)


def delete_prefix(prefix: str) -> None:
    backend(prefix).delete_prefix(prefix)


def _mover(uri: str):
    """Whole files and trees: S3's through transfer.py (parallel, resumable, checksummed), local ones by copy."""
    if backend(uri) is local:
        return local
    from job.storage import transfer

    return transfer


def download_file(uri: str, dest: Path) -> Path:
    return _mover(uri).download_file(uri, Path(dest))


def upload_file(src: Path, uri: str, *, sha256: str | None = None) -> None:
    _mover(uri).upload_file(Path(src), uri, sha256=sha256)


def download_tree(prefix: str, dest: Path) -> list[Path]:
    """Copy everything under prefix into dest (same relative layout); returns local paths."""
    return _mover(prefix).download_tree(prefix, Path(dest))


def upload_tree(src: Path, prefix: str, *, files: Iterable[Path] | None = None,
                sha256: dict[str, str] | None = None) -> list[str]:
    """Copy a local directory (or the given files in it) under prefix, in parallel; returns URIs.

    sha256 maps a relative path (posix) to the hex digest its stored copy must have.
    """
    return _mover(prefix).upload_tree(Path(src), prefix, files=files, sha256=sha256)


def fetch(uri: str, cache_dir: Path, *, only=None) -> Path:
    """A local path for uri: local paths as they are, remote files/prefixes cached under cache_dir.

    Remote copies are keyed by ETag/size, guarded by a lock and a completion marker, so the ranks
    (and pods sharing a PVC) of a node download once and a restarted download resumes.
    ``only(relative name) -> bool`` takes part of a remote prefix (a tokenizer without the weights).
    """
    if backend(uri) is local:
        return local.fetch(uri, Path(cache_dir), only)
    from job.storage import cache  # the node cache of remote copies

    return cache.fetch(uri, Path(cache_dir), only)
