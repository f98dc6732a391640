"""The local backend keeps the S3 guarantees that matter: atomic writes, create-only, checksums, errors."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from job import storage
from job.errors import (
    AlreadyPublishedError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    VerificationError,
)


def test_local_round_trip_tree_and_listing(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    uris = storage.upload_tree(src, str(tmp_path / "dst"))
    assert storage.list_files(str(tmp_path / "dst")) == sorted(uris)
    got = storage.download_tree(str(tmp_path / "dst"), tmp_path / "copy")
    assert sorted(p.read_text() for p in got) == ["a", "b"]
    assert storage.read_bytes(f"file://{tmp_path}/dst/sub/b.txt") == b"b"
    with storage.open(str(tmp_path / "dst" / "a.txt")) as f:
        assert f.read() == b"a"
    assert storage.sha256(str(tmp_path / "dst" / "a.txt")) == hashlib.sha256(b"a").hexdigest()
    storage.delete_prefix(str(tmp_path / "dst"))
    assert storage.list_files(str(tmp_path / "dst")) == []


def test_local_create_only_write_refuses_an_existing_file(tmp_path):
    uri = str(tmp_path / "out" / "_SUCCESS")
    storage.write_bytes(uri, b"1", if_none_match=True)
    with pytest.raises(AlreadyPublishedError) as e:
        storage.write_bytes(uri, b"2", if_none_match=True)
    assert e.value.exit_code == 73 and storage.read_bytes(uri) == b"1"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_SUCCESS"], "no temp file left behind"


def test_local_checksum_mismatch_is_refused_and_nothing_written(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"real")
    with pytest.raises(VerificationError):
        storage.upload_file(tmp_path / "f.bin", str(tmp_path / "o" / "f.bin"), sha256=hashlib.sha256(b"x").hexdigest())
    assert not (tmp_path / "o" / "f.bin").exists()
    with pytest.raises(VerificationError):
        storage.write_bytes(str(tmp_path / "o" / "g"), b"real", sha256="00" * 32)


def test_local_missing_paths_are_not_found(tmp_path):
    for fn in (lambda: storage.read_bytes(str(tmp_path / "nope")),
               lambda: storage.fetch(str(tmp_path / "nope"), tmp_path),
               lambda: storage.download_tree(str(tmp_path / "nope"), tmp_path / "d")):
        with pytest.raises(NotFoundError) as e:
            fn()
        assert e.value.exit_code == 66 and "nope" in str(e.value)


def _unwritable_checks(ro) -> None:
    with pytest.raises(PermissionDeniedError) as e:
        storage.check_access(str(ro / "runs" / "x"))
    assert e.value.exit_code == 77
    with pytest.raises(PermissionDeniedError):
        storage.write_bytes(str(ro / "f"), b"x")


def test_local_unwritable_output_is_permission_denied():
    """A directory the job may not write to → 77. Root ignores file modes (CI runs as root), so then
    the checks run in a forked child that has dropped to the `nobody` uid, as a pod's non-root user."""
    top = Path(tempfile.mkdtemp(prefix="sftjob-ro-"))
    try:
        top.chmod(0o755)
        ro = top / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        if os.geteuid() != 0:
            return _unwritable_checks(ro)
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                _unwritable_checks(ro)
                code = 0
            except BaseException as e:  # noqa: BLE001 - reported through the exit status
                print(f"child failed: {e!r}", file=sys.stderr)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError):
        storage.read_bytes("gs://bucket/key")
