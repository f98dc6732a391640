"""Parallel S3 transfers: many small files at once, big ones in parts, big downloads resumable.

Why not a loop of boto3 ``upload_file``/``download_file``: each call builds a transfer manager, runs
one file at a time and (for downloads) spends a HEAD request per object. Here one pool serves a whole
tree: sizes and ETags come from the listing, so a download is one GET per object (or one ranged GET
per part). Big downloads go to ``<dest>.part`` with a journal of finished parts (``<dest>.part.log``,
keyed by ETag/size/part size) so a killed download resumes where it stopped; ranged GETs carry
``If-Match: <etag>`` so a part can never come from a newer version of the object. Big uploads are
multipart on the same pool with a SHA256 checksum per part (not s3transfer: see _Multipart); small
ones are single PUTs whose ChecksumSHA256 is the caller's hash (the manifest's), so the server
stores exactly those bytes.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from botocore.exceptions import IncompleteReadError

from job.errors import NotFoundError, UnavailableError
from job.storage import s3
from job.storage.paths import local_child
from job.storage.s3 import MiB, Obj, retry_stream

log = logging.getLogger(__name__)
PROGRESS_MIN_BYTES = 64 * MiB


class _LogProgress:
    """Progress for pod logs (no TTY): one plain log line every 30 s, not a carriage-return bar."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def update(self, k: int) -> None:
        with self.lock:
            self.n += k
            now = time.monotonic()
            if now - self.last >= 30:
                self.last = now
                log.info("%s %.2f/%.2f GiB (%d%%), %.0f MB/s", self.desc, self.n / 2**30, self.total / 2**30,
                         100 * self.n // max(1, self.total), self.n / 1e6 / (now - self.t0))

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    """tqdm on a terminal, log lines in a pod; only for transfers worth watching (>= 64 MiB)."""
    if total < PROGRESS_MIN_BYTES or os.environ.get("SFTJOB_PROGRESS") == "0":
        return None
    if not sys.stderr.isatty() and os.environ.get("SFTJOB_PROGRESS") != "1":
        return _LogProgress(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                mininterval=0.5)


def _run(tasks: list, what: str) -> None:
    """Run callables on one pool; the first failure cancels the rest and is raised as a project error.

    On a failure, a SIGTERM (Interrupted) or Ctrl-C, the transfers not started are cancelled and those
    running are left behind, not waited for: on a frozen store each would hold for read_timeout × attempts,
    far past the pod's grace period. A download left behind writes nothing once its file is closed."""
    if not tasks:
        return
    pool = cf.ThreadPoolExecutor(max_workers=min(s3.concurrency(), len(tasks)), thread_name_prefix="s3")
    try:
        futures = {pool.submit(fn): uri for fn, uri in tasks}
        done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise s3.translate(f.exception(), futures[f], what) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# ---- downloads ------------------------------------------------------------------------------------

class _Resumable:
    """A big object fetched as parallel ranged GETs into ``dest.part``; finished parts are journaled."""

    def __init__(self, obj: Obj, dest: Path, part: int, bar):
        self.obj, self.dest, self.part, self.bar = obj, dest, part, bar
        self.tmp = dest.with_name(dest.name + ".part")
        self.log = dest.with_name(dest.name + ".part.log")
        header = json.dumps({"etag": obj.etag, "size": obj.size, "part": part}, sort_keys=True)
        done: set[int] = set()
        if self.tmp.exists() and self.log.exists():
            lines = self.log.read_text().splitlines()
            if lines and lines[0] == header:
                done = {int(x) for x in lines[1:] if x.strip().isdigit()}
        if not done:
            self.tmp.unlink(missing_ok=True)
            self.log.write_text(header + "\n")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, obj.size)
        n = (obj.size + part - 1) // part
        self.todo = [i for i in range(n) if i not in done]
        self.remaining = len(self.todo)
        self.lock = threading.Lock()
        if bar is not None:
            bar.update(sum(min(part, obj.size - i * part) for i in done))

    def tasks(self) -> list:
        if not self.todo:
            return [(lambda: self._finish(), self.obj.uri)]
        return [(lambda i=i: self._fetch(i), self.obj.uri) for i in self.todo]

    def _fetch(self, i: int) -> None:
        start = i * self.part
        end = min(self.obj.size, start + self.part) - 1

        def get():
            kw = {"IfMatch": self.obj.etag} if self.obj.etag else {}
            body = s3.client().get_object(Bucket=self.obj.bucket, Key=self.obj.key,
                                          Range=f"bytes={start}-{end}", **kw)["Body"]
            off = start
            for chunk in body.iter_chunks(MiB):
                with self.lock:  # never into a closed fd (its number may already be another file's)
                    self._check_open()
                    os.pwrite(self.fd, chunk, off)
                off += len(chunk)
                if self.bar is not None:
                    self.bar.update(len(chunk))
            if off != end + 1:
                raise IncompleteReadError(actual_bytes=off - start, expected_bytes=end + 1 - start)

        try:
            retry_stream(get)
        except s3.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                raise UnavailableError(f"{self.obj.uri} changed while it was being downloaded",
                                       hint="retry; the download restarts from the new version") from None
            raise
        with self.lock:
            self._check_open()  # closed: a later attempt owns the journal now
            with open(self.log, "a") as f:
                f.write(f"{i}\n")
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        # No fsync: the cache survives pod kills (the page cache does); after a node crash the
        # marker is re-checked against sizes and a bad file is one re-download away.
        self.close()
        os.replace(self.tmp, self.dest)
        self.log.unlink(missing_ok=True)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _check_open(self) -> None:
        if self.fd < 0:
            raise UnavailableError(f"{self.obj.uri}: download abandoned", hint="the next attempt resumes it")


def _get_whole(obj: Obj, dest: Path, bar) -> None:
    def get():
        return s3.client().get_object(Bucket=obj.bucket, Key=obj.key)["Body"].read()

    data = retry_stream(get)
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    if bar is not None:
        bar.update(len(data))


def download(pairs: list[tuple[Obj, Path]], *, on_done=None) -> None:
    """Download (object, local path) pairs in parallel; on_done(obj, path) runs after each file lands."""
    part = s3.chunk_size()
    total = sum(o.size for o, _ in pairs)
    bar = _progress(total, "download")
    tasks: list = []
    small: list = []
    big: list[_Resumable] = []
    try:
        for obj, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if obj.size > part:
                r = _Resumable(obj, dest, part, bar)
                big.append(r)
                if on_done:
                    orig = r._finish
                    r._finish = lambda o=obj, d=dest, f=orig: (f(), on_done(o, d))
                tasks += r.tasks()
            else:
                small.append((lambda o=obj, d=dest: (_get_whole(o, d, bar), on_done and on_done(o, d)),
                              obj.uri))
        _run(tasks + small, "downloading")  # big parts first: they are the long poles
    finally:
        for r in big:
            r.close()  # after a failure; the .part and its journal stay for the resume
        if bar is not None:
            bar.close()


# ---- uploads -----------------------------------------------------------------------------------------

def _put_small(path: Path, bucket: str, key: str, sha: str | None, bar) -> None:
    data = path.read_bytes()
    s3.write_bytes(f"s3://{bucket}/{key}", data, sha256=sha)
    if bar is not None:
        bar.update(len(data))


def part_size(size: int, part: int) -> int:
    """S3 allows 10,000 parts: double the part size until the object fits."""
    while (size + part - 1) // part > 10_000:
        part *= 2
    return part


class _Multipart:
    """A big upload as parallel UploadPart requests on the shared pool; the last part completes it.

    Parts are read with pread into bytes (hashed once for ChecksumSHA256, sent with one sendall):
    measured ~10% faster than s3transfer's streamed file chunks on a 2-core loopback, and the same
    pool then serves small files and parts alike. Peak memory: max_concurrency x part size.
    """

    def __init__(self, path: Path, bucket: str, key: str, size: int, part: int, bar):
        self.path, self.bucket, self.key, self.size, self.bar = path, bucket, key, size, bar
        self.part = part_size(size, part)
        self.n = (size + self.part - 1) // self.part
        self.uri = f"s3://{bucket}/{key}"
        kw = {"ChecksumAlgorithm": "SHA256"} if s3.checksums_enabled() else {}
        self.upload_id = s3.call("uploading", self.uri, lambda: s3.client().create_multipart_upload(
            Bucket=bucket, Key=key, **kw))["UploadId"]
        self.closed = False
        self.parts: list = [None] * self.n
        self.remaining, self.done = self.n, False
        self.lock = threading.Lock()

    def tasks(self) -> list:
        return [(lambda i=i: self._part(i), self.uri) for i in range(self.n)]

    def _part(self, i: int) -> None:
        if self.closed:  # abandoned (a failure or a SIGTERM): nothing more to send
            raise UnavailableError(f"{self.uri}: upload abandoned", hint="the next attempt uploads it again")
        with open(self.path, "rb") as f:  # a file of its own: a part left running never reads a reused fd
            data = os.pread(f.fileno(), min(self.part, self.size - i * self.part), i * self.part)
        entry: dict = {"PartNumber": i + 1}
        kw = {}
        if s3.checksums_enabled():
            entry["ChecksumSHA256"] = kw["ChecksumSHA256"] = s3.b64_sha256(hashlib.sha256(data).hexdigest())
        r = s3.client().upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                    PartNumber=i + 1, Body=data, **kw)
        entry["ETag"] = r["ETag"]
        if self.bar is not None:
            self.bar.update(len(data))
        with self.lock:
            self.parts[i] = entry
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            s3.client().complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
            self.done = True

    def close(self) -> None:
        """Stop sending parts; abort an unfinished upload so its parts do not linger (and cost). The abort waits
        at most 5 s: on a frozen store it would hold a SIGTERM's exit for read_timeout × attempts."""
        self.closed = True
        if not self.done:
            def abort() -> None:
                try:
                    s3.client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
                except Exception:  # noqa: BLE001 - best effort: a lifecycle rule cleans up what this cannot
                    pass

            t = threading.Thread(target=abort, daemon=True, name="s3-abort")
            t.start()
            t.join(5)


def _stored_checksum(path: Path, size: int, sha_hex: str, part: int) -> str:
    """The ChecksumSHA256 S3 reports for this file uploaded by upload(): full-object for one PUT,
    composite (sha256 of the parts' sha256s, "-N") for multipart with _Multipart's part size."""
    if size <= part:
        return s3.b64_sha256(sha_hex)
    part = part_size(size, part)
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part):
            digests.append(hashlib.sha256(chunk).digest())
    return s3.b64_sha256(hashlib.sha256(b"".join(digests)).hexdigest()) + f"-{len(digests)}"


def changed(items: list[tuple[Path, str, str, str | None]], existing: list[Obj]) -> list:
    """The items whose object is missing or differs (same size is checked by its SHA256 checksum)."""
    sizes = {o.key: o.size for o in existing}
    part = s3.chunk_size()

    def same(it) -> bool:
        path, bucket, key, sha = it
        size = path.stat().st_size
        if not sha or sizes.get(key) != size:
            return False
        r = s3.call("checking", f"s3://{bucket}/{key}",
                    lambda: s3.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
        return r.get("ChecksumSHA256") == _stored_checksum(path, size, sha, part)

    candidates = [it for it in items if sizes.get(it[2]) is not None]
    if not candidates:
        return items
    with cf.ThreadPoolExecutor(max_workers=min(s3.concurrency(), len(candidates))) as pool:
        unchanged = {it[2] for it, ok in zip(candidates, pool.map(same, candidates), strict=True) if ok}
    return [it for it in items if it[2] not in unchanged]


def upload(items: list[tuple[Path, str, str, str | None]]) -> None:
    """Upload (path, bucket, key, sha256-hex|None) in parallel: PUTs for small files, multipart for big."""
    part = s3.chunk_size()
    sizes = [p.stat().st_size for p, *_ in items]
    bar = _progress(sum(sizes), "upload")
    big: list[_Multipart] = []
    try:
        small = [(lambda it=it: _put_small(*it, bar), f"s3://{it[1]}/{it[2]}")
                 for it, n in zip(items, sizes, strict=True) if n <= part]
        for (path, bucket, key, _), n in zip(items, sizes, strict=True):
            if n > part:
                big.append(_Multipart(path, bucket, key, n, part, bar))
        _run([t for m in big for t in m.tasks()] + small, "uploading")  # long poles first
    finally:
        for m in big:
            m.close()
        if bar is not None:
            bar.close()


# ---- whole files and trees (what storage.download_file/... run for s3:// URIs) ---------------------

def download_file(uri: str, dest: Path) -> Path:
    obj = s3.head(uri)
    if obj is None:
        raise NotFoundError(f"not found: {uri} (at {s3.safe_endpoint()})", hint="check the key")
    download([(obj, Path(dest))])
    return Path(dest)


def upload_file(src: Path, uri: str, *, sha256: str | None = None) -> None:
    bucket, key = s3.parse(uri)
    upload([(Path(src), bucket, key, sha256)])


def download_tree(prefix: str, dest: Path) -> list[Path]:
    objs = s3.list_objects(prefix)
    if not objs:
        raise NotFoundError(f"no objects under {prefix} (at {s3.safe_endpoint()})", hint="check the prefix")
    pairs = [(o, local_child(dest, rel, f"downloading {prefix}"))
             for o, rel in zip(objs, s3.relative_names(prefix, objs), strict=True)]
    download(pairs)
    return [p for _, p in pairs]


def upload_tree(src: Path, prefix: str, *, files: Iterable[Path] | None = None,
                sha256: dict[str, str] | None = None) -> list[str]:
    """Upload files (default: all under src) keeping relative paths; sha256 maps rel path → hex.

    With sha256 given, objects already stored with the same size and SHA256 checksum are skipped,
    so rerunning a publish that was killed halfway sends only what is missing.
    """
    src = Path(src)
    chosen = [Path(f) for f in files] if files is not None else sorted(p for p in src.rglob("*") if p.is_file())
    bucket, key = s3.parse(prefix)
    base = key if (not key or key.endswith("/")) else key + "/"
    items = []
    for f in chosen:
        f = f if f.is_absolute() else src / f
        rel = f.relative_to(src).as_posix()
        items.append((f, bucket, base + rel, (sha256 or {}).get(rel)))
    todo = changed(items, s3.list_objects(prefix)) if sha256 and s3.checksums_enabled() else items
    upload(todo)
    return [f"s3://{bucket}/{k}" for _, _, k, _ in items]
