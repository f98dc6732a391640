"""AWS_REQUEST_CHECKSUM_CALCULATION=when_required: for stores that reject boto3's checksums (real server)."""
from __future__ import annotations

import hashlib

import pytest

from job import storage
from job.errors import VerificationError
from job.storage import s3 as s3backend


def test_when_required_uploads_without_checksum_headers(s3, monkeypatch):
    b = s3.bucket("nochecksum")
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    headers: list = []
    s3backend.client().meta.events.register("before-send.s3.PutObject",
                                            lambda request, **_: headers.append(dict(request.headers)))
    storage.write_bytes(f"s3://{b}/k", b"payload")
    assert storage.read_bytes(f"s3://{b}/k") == b"payload"
    assert not any(k.lower().startswith("x-amz-checksum") for k in headers[0])


def test_when_required_still_refuses_bytes_that_do_not_match_their_sha256(s3, monkeypatch):
    b = s3.bucket("nochecksum")
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    with pytest.raises(VerificationError):
        storage.write_bytes(f"s3://{b}/bad", b"corrupted", sha256=hashlib.sha256(b"real").hexdigest())
    assert not storage.exists(f"s3://{b}/bad")
