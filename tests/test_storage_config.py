"""Client configuration comes from storage settings + the ordinary boto3 environment, nothing else."""
from __future__ import annotations

import pytest

from job import storage
from job.spec import StorageSpec
from job.storage import s3 as s3backend


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret-not-used-for-any-request")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    s3backend.reset()
    yield monkeypatch
    s3backend.reset()


def test_custom_endpoint_means_path_style_by_default(fresh):
    fresh.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    c = s3backend.client()
    assert c.meta.endpoint_url == "http://minio.local:9000" and c.meta.config.s3["addressing_style"] == "path"
    assert c.meta.region_name == "eu-west-1"


def test_spec_endpoint_region_and_virtual_style_override_env(fresh):
    fresh.setenv("AWS_ENDPOINT_URL", "http://ignored:1")
    storage.configure(StorageSpec(endpoint_url="https://s3.example.com", addressing_style="virtual",
                                  region="ap-south-1", max_attempts=7))
    c = s3backend.client()
    assert c.meta.endpoint_url == "https://s3.example.com" and c.meta.config.s3["addressing_style"] == "virtual"
    assert c.meta.region_name == "ap-south-1"
    assert c.meta.config.retries == {"total_max_attempts": 7, "mode": "adaptive"}


def test_aws_without_endpoint_keeps_boto3_auto_addressing(fresh):
    c = s3backend.client()
    assert c.meta.config.s3["addressing_style"] == "auto" and "amazonaws.com" in c.meta.endpoint_url


def test_tls_verify_and_ca_bundle(fresh, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    storage.configure(StorageSpec(ca_bundle=str(ca)))
    assert s3backend.client()._endpoint.http_session._verify == str(ca)
    storage.configure(StorageSpec(verify=False))
    assert s3backend.client()._endpoint.http_session._verify is False


def test_checksums_when_required_sends_no_sha256_and_keeps_payload_signing(fresh):
    assert s3backend.client().meta.config.s3.get("payload_signing_enabled") is False
    fresh.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    c = s3backend.client()
    assert "payload_signing_enabled" not in c.meta.config.s3 and not s3backend.checksums_enabled()


def test_client_is_rebuilt_when_credentials_change(fresh):
    a = s3backend.client()
    assert s3backend.client() is a
    fresh.setenv("AWS_SECRET_ACCESS_KEY", "another-secret-value-0000000000")
    assert s3backend.client() is not a


def test_endpoint_userinfo_never_reaches_messages(fresh):
    storage.configure(StorageSpec(endpoint_url="http://user:pa55word@127.0.0.1:1"))
    assert "pa55word" not in s3backend.safe_endpoint() and s3backend.safe_endpoint() == "http://127.0.0.1:1"
