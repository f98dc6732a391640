"""S3 backend: the only module (with its helpers in this package) that talks to boto3.

Why it looks like this:
- Credentials come only from the boto3 chain (env, shared config/profile, web identity / IRSA,
  EKS Pod Identity, instance role), so the same container works everywhere without code changes.
- Every botocore failure is translated into a project error with an exit code (66 missing,
  69 unavailable, 73 refused overwrite, 77 permission) and a message that names the URI but never
  the secret key, session token or a raw botocore traceback.
- botocore's own DEBUG logs print request headers (including x-amz-security-token), so its loggers
  are clamped to WARNING unless SFTJOB_BOTO_DEBUG=1.
- Uploads carry a SHA256 checksum so the server rejects corrupted bodies; stores that reject
  boto3's checksums are served by AWS_REQUEST_CHECKSUM_CALCULATION=when_required (then integrity
  rests on the manifest's sha256, checked by publish.verify_published).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from job.errors import ConfigError, PermissionDeniedError, SftjobError, VerificationError
from job.storage import config, s3errors

if os.environ.get("SFTJOB_BOTO_DEBUG") != "1":
    for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(_name).setLevel(logging.WARNING)

MiB = 1024 * 1024
_lock = threading.Lock()
_clients: dict = {}


@dataclass(frozen=True)
class Obj:
    """One listed object: enough to key a cache entry (etag, size) without a HEAD request."""

    bucket: str
    key: str
    size: int
    etag: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# ---- configuration -----------------------------------------------------------------------------

def options():
    s = config.current
    if s is None:
        from job.spec import StorageSpec

        s = StorageSpec()
    return s


def endpoint_url() -> str | None:
    s = options()
    return s.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def safe_endpoint() -> str:
    """The endpoint for messages, with any user:password@ removed."""
    url = endpoint_url()
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def checksums_enabled() -> bool:
    """False for stores that reject flexible checksums (AWS_REQUEST_CHECKSUM_CALCULATION=when_required)."""
    return os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").lower() != "when_required"


def chunk_size() -> int:
    return options().multipart_chunksize_mb * MiB


def concurrency() -> int:
    return options().max_concurrency


def _fingerprint(s) -> str:
    env = "\0".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("AWS_"))
    return hashlib.sha256((s.model_dump_json() + env).encode()).hexdigest()


def client():
    """One thread-safe client per (storage settings, AWS_* environment); rebuilt when either changes."""
    s = options()
    key = _fingerprint(s)
    with _lock:
        c = _clients.get(key)
        if c is None:
            _clients.clear()
            c = _clients[key] = _make_client(s)
    return c


def _make_client(s):
    endpoint = endpoint_url()
    style = s.addressing_style
    if style == "auto":
        style = "path" if endpoint else "auto"  # custom stores rarely have wildcard DNS
    verify = (s.ca_bundle or None) if s.verify else False
    s3cfg: dict = {"addressing_style": style}
    if checksums_enabled():
        # The SHA256 checksum already protects the body; signing it too (botocore does over plain
        # http) would hash every byte twice. Without checksums, keep botocore's payload signing.
        s3cfg["payload_signing_enabled"] = False
    cfg = Config(retries={"total_max_attempts": s.max_attempts, "mode": "adaptive"},
                 s3=s3cfg, max_pool_connections=2 * s.max_concurrency + 4,
                 connect_timeout=s.connect_timeout, read_timeout=s.read_timeout, tcp_keepalive=True, user_agent_extra="sftjob")
    try:
        return boto3.session.Session(region_name=s.region or None).client(
            "s3", endpoint_url=endpoint, verify=verify, config=cfg)
    except BotoCoreError as e:
        raise translate(e, endpoint or "s3://", "configuring S3 for") from None
    except ValueError as e:  # e.g. "Invalid endpoint"
        raise ConfigError(f"invalid S3 settings: {e}", hint="check storage.endpoint_url / AWS_ENDPOINT_URL") from None


def reset() -> None:
    with _lock:
        _clients.clear()


# ---- URIs and errors ----------------------------------------------------------------------------

def parse(uri: str) -> tuple[str, str]:
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"invalid S3 URI (no bucket): {uri}", hint="use s3://bucket/key")
    return bucket, key


def translate(e: BaseException, uri: str, op: str) -> SftjobError:
    """botocore exception → project error (exit code) naming the URI and endpoint, never a secret."""
    o = options()
    return s3errors.translate(e, uri, op, endpoint=safe_endpoint(), attempts=o.max_attempts,
                              read_timeout=o.read_timeout)


def call(op: str, uri: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError, OSError) as e:
        raise translate(e, uri, op) from None


def b64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


# ---- objects -------------------------------------------------------------------------------------

_STREAM_ERRORS = (ResponseStreamingError, ReadTimeoutError, IncompleteReadError, ConnectionClosedError,
                  ConnectionError, TimeoutError)


def retry_stream(fn):
    """botocore retries requests, not a body that breaks mid-stream: retry those here, with backoff."""
    attempts = options().max_attempts
    for i in range(attempts):
        try:
            return fn()
        except _STREAM_ERRORS:
            if i == attempts - 1:
                raise
            time.sleep(min(8.0, 0.25 * 2 ** i) * random.uniform(0.5, 1.0))


def read_bytes(uri: str) -> bytes:
    bucket, key = parse(uri)

    def get():
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()

    return call("reading", uri, lambda: retry_stream(get))


def open_read(uri: str):
    """A streaming binary file object (read(), iter_chunks(), close())."""
    bucket, key = parse(uri)
    return call("reading", uri, lambda: client().get_object(Bucket=bucket, Key=key)["Body"])


def write_bytes(uri: str, data: bytes, *, if_none_match: bool = False, sha256: str | None = None) -> None:
    """PUT with a SHA256 checksum (``sha256``: the hex digest the bytes must have, else computed)."""
    bucket, key = parse(uri)
    kw: dict = {"Bucket": bucket, "Key": key, "Body": data}
    if checksums_enabled():
        kw["ChecksumSHA256"] = b64_sha256(sha256 or hashlib.sha256(data).hexdigest())
    elif sha256 and hashlib.sha256(data).hexdigest() != sha256:  # no server check: at least ours
        raise VerificationError(f"{uri}: the bytes to upload do not match their sha256",
                                         hint="the source changed or is corrupted; rerun")
    if if_none_match:
        kw["IfNoneMatch"] = "*"
    call("writing", uri, lambda: client().put_object(**kw))


def head(uri: str) -> Obj | None:
    bucket, key = parse(uri)
    try:
        r = client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise translate(e, uri, "checking") from None
    except BotoCoreError as e:
        raise translate(e, uri, "checking") from None
    return Obj(bucket, key, int(r["ContentLength"]), r.get("ETag", ""))


def exists(uri: str) -> bool:
    return head(uri) is not None


def check_access(prefix: str) -> None:
    """Fail fast (66/77/69/64) when the bucket is missing, the prefix unlistable or not writable, the
    endpoint down, or the prefix names an object.

    A one-key listing of the prefix rather than HeadBucket: policies often grant s3:ListBucket only
    with an s3:prefix condition, which HeadBucket (no prefix) would fail although the run could work.
    Then a probe object is created and deleted under the prefix: read-only credentials list fine.
    """
    bucket, key = parse(prefix)
    base = key if (not key or key.endswith("/")) else key + "/"
    call("listing", prefix, lambda: client().list_objects_v2(Bucket=bucket, Prefix=base, MaxKeys=1))
    if key and not key.endswith("/") and head(prefix) is not None:
        raise ConfigError(f"output {prefix} is an object, not a prefix",
                          hint="give a prefix for the run's files, e.g. s3://bucket/runs/<name>/")
    probe = f"{base}.sftjob-probe-{uuid.uuid4().hex[:12]}"
    uri = f"s3://{bucket}/{probe}"
    try:
        call("writing", uri, lambda: client().put_object(Bucket=bucket, Key=probe, Body=b""))
        call("deleting", uri, lambda: client().delete_object(Bucket=bucket, Key=probe))
    except PermissionDeniedError as e:
        raise PermissionDeniedError(f"cannot write under {prefix}: {e.message}", hint=e.hint) from None


def list_objects(prefix: str) -> list[Obj]:
    """Objects under prefix (recursive). 'p' means 'p/' (a directory) or, failing that, the object 'p'."""
    bucket, key = parse(prefix)
    base = key if (not key or key.endswith("/")) else key + "/"

    def run():
        out = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            out += [Obj(bucket, o["Key"], int(o["Size"]), o.get("ETag", "")) for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]
        return out

    objs = call("listing", prefix, run)
    if not objs and key and not key.endswith("/"):
        one = head(prefix)
        objs = [one] if one else []
    return sorted(objs, key=lambda o: o.key)


def list_files(prefix: str) -> list[str]:
    return [o.uri for o in list_objects(prefix)]


def delete(uri: str) -> None:
    bucket, key = parse(uri)
    call("deleting", uri, lambda: client().delete_object(Bucket=bucket, Key=key))


def delete_prefix(prefix: str) -> None:
    objs = list_objects(prefix)
    for i in range(0, len(objs), 1000):
        batch = [{"Key": o.key} for o in objs[i:i + 1000]]
        call("deleting", prefix, lambda b=batch: client().delete_objects(
            Bucket=objs[0].bucket, Delete={"Objects": b, "Quiet": True}))


def sha256(uri: str) -> str:
    bucket, key = parse(uri)

    def run():
        h = hashlib.sha256()
        for chunk in client().get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(MiB):
            h.update(chunk)
        return h.hexdigest()

    return call("reading", uri, run)


def relative_names(prefix: str, objs: list[Obj]) -> list[str]:
    _, key = parse(prefix)
    out = []
    for o in objs:
        if o.key == key:  # the prefix named one object
            out.append(o.key.rsplit("/", 1)[-1])
        else:
            base = key if (not key or key.endswith("/")) else key + "/"
            out.append(o.key[len(base):])
    return out
