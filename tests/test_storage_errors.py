"""Failures map to exit codes with the URI in the message and no secret anywhere (real SeaweedFS)."""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import threading
import time

import pytest

from job import publish, storage
from job.errors import NotFoundError, PermissionDeniedError, UnavailableError
from job.spec import StorageSpec
from job.storage import s3 as s3backend

WRONG_SECRET = "wrong-secret-d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture
def env(monkeypatch):
    def apply(values: dict):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        s3backend.reset()

    yield apply
    s3backend.reset()


def test_wrong_secret_key_is_permission_denied_without_echoing_it(s3, env):
    b = s3.bucket("auth")
    storage.write_bytes(f"s3://{b}/x", b"1")
    env({"AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    with pytest.raises(PermissionDeniedError) as e:
        storage.read_bytes(f"s3://{b}/x")
    assert e.value.exit_code == 77 and f"s3://{b}/x" in str(e.value)
    assert WRONG_SECRET not in str(e.value) and s3.secret_key not in str(e.value)


def test_unknown_access_key_is_permission_denied(s3, env):
    b = s3.bucket("auth")
    env({"AWS_ACCESS_KEY_ID": "NOSUCHKEY0000000000", "AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    with pytest.raises(PermissionDeniedError) as e:
        storage.list_files(f"s3://{b}/")
    assert e.value.exit_code == 77


def test_read_only_identity_can_fetch_but_not_publish(s3, env, tmp_path):
    b = s3.bucket("readonly")
    storage.write_bytes(f"s3://{b}/data/train.jsonl", b"{}\n")
    env(s3.reader_env)
    assert storage.read_bytes(f"s3://{b}/data/train.jsonl") == b"{}\n"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter.bin").write_bytes(b"w")
    with pytest.raises(PermissionDeniedError) as e:
        publish.publish(tmp_path / "out", f"s3://{b}/runs/r1", run_info={})
    assert e.value.exit_code == 77 and "runs/r1" in str(e.value)


def test_no_credentials_at_all_is_permission_denied(s3, monkeypatch, env):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    env({})  # the chain finds nothing: no env keys, no config files, IMDS disabled
    with pytest.raises(PermissionDeniedError) as e:
        storage.read_bytes("s3://auth/x")
    assert e.value.exit_code == 77 and "credentials" in str(e.value)


# No "write": SeaweedFS creates a missing bucket on an admin's PUT (AWS answers NoSuchBucket, which
# translate() maps to 66 like the reads); publish.check_output uses check_access before any write.
@pytest.mark.parametrize("op", ["read", "list", "fetch", "check_access"])
def test_missing_bucket_is_not_found_naming_the_uri(s3, op, tmp_path):
    uri = "s3://no-such-bucket-sftjob/some/key.jsonl"
    with pytest.raises(NotFoundError) as e:
        {"read": lambda: storage.read_bytes(uri), "list": lambda: storage.list_files(uri),
         "fetch": lambda: storage.fetch(uri, tmp_path), "check_access": lambda: storage.check_access(uri)}[op]()
    assert e.value.exit_code == 66 and "s3://no-such-bucket-sftjob" in str(e.value)


def test_missing_key_is_not_found(s3):
    b = s3.bucket("auth")
    with pytest.raises(NotFoundError) as e:
        storage.read_bytes(f"s3://{b}/nope.jsonl")
    assert e.value.exit_code == 66 and f"s3://{b}/nope.jsonl" in str(e.value)


def test_endpoint_down_is_unavailable_after_bounded_retries(s3):
    from s3server import closed_port

    storage.configure(StorageSpec(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=3))
    sent = []
    s3backend.client().meta.events.register("before-send.s3", lambda **kw: sent.append(1))
    t = time.monotonic()
    with pytest.raises(UnavailableError) as e:
        storage.read_bytes("s3://any/key")
    assert e.value.exit_code == 69 and "unreachable" in str(e.value) and "3 attempts" in str(e.value)
    assert len(sent) == 3 and time.monotonic() - t < 20


class _Always503(http.server.BaseHTTPRequestHandler):
    hits = 0

    def _fail(self):
        type(self).hits += 1
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down for test</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _fail

    def log_message(self, *a):
        pass


def test_server_errors_are_unavailable_after_retries(s3):
    # A real HTTP server that only answers 503: SeaweedFS cannot be told to fail on demand.
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        storage.configure(StorageSpec(endpoint_url=f"http://127.0.0.1:{srv.server_port}", max_attempts=2))
        with pytest.raises(UnavailableError) as e:
            storage.read_bytes("s3://any/key")
        assert e.value.exit_code == 69 and "503" in str(e.value) and _Always503.hits == 2
    finally:
        srv.shutdown()


def test_upload_whose_bytes_do_not_match_their_sha256_is_rejected_by_the_server(s3):
    b = s3.bucket("checksums")
    uri = f"s3://{b}/adapter.safetensors"
    with pytest.raises(UnavailableError) as e:
        storage.write_bytes(uri, b"corrupted bytes", sha256=hashlib.sha256(b"the real bytes").hexdigest())
    assert "checksum" in str(e.value) and not storage.exists(uri)


def _corrupt_body(request, **_):
    body = request.body
    data = body if isinstance(body, bytes) else body.read()
    request.body = bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.mark.parametrize("size_mib", [0, 6])
def test_body_corrupted_in_transit_is_rejected_and_nothing_is_stored(s3, tmp_path, size_mib):
    storage.configure(StorageSpec(multipart_chunksize_mb=5, max_attempts=1))
    b = s3.bucket("checksums")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(size_mib * 1024 * 1024 + 1000))
    op = "UploadPart" if size_mib else "PutObject"
    s3backend.client().meta.events.register(f"before-send.s3.{op}", _corrupt_body)
    with pytest.raises(UnavailableError) as e:
        storage.upload_file(src, f"s3://{b}/f{size_mib}.bin")
    assert "checksum" in str(e.value)
    assert not storage.exists(f"s3://{b}/f{size_mib}.bin")
    uploads = s3.client().list_multipart_uploads(Bucket=b).get("Uploads", [])
    assert not [u for u in uploads if u["Key"] == f"f{size_mib}.bin"], "a failed multipart upload is aborted"


def test_no_secret_appears_in_logs_errors_or_manifest(s3, env, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # as with --debug
    b = s3.bucket("secrets")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    manifest = publish.publish(tmp_path / "out", f"s3://{b}/runs/s1", run_info={"run_id": "s1"})
    storage.fetch(f"s3://{b}/runs/s1/", tmp_path / "cache")
    published = storage.read_bytes(f"s3://{b}/runs/s1/manifest.json").decode()
    messages = []
    for values in ({"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}, {"AWS_SESSION_TOKEN": "session-token-" + "z" * 40}):
        env(values)
        with pytest.raises(PermissionDeniedError) as e:
            storage.read_bytes(f"s3://{b}/runs/s1/a.txt")
        messages.append(str(e.value))
    out, err = capfd.readouterr()
    text = "\n".join([caplog.text, out, err, *messages, str(manifest), published])
    for secret in (s3.secret_key, s3.reader_secret, WRONG_SECRET, "session-token-" + "z" * 40):
        assert secret not in text
