"""botocore failures → the project's errors (exit codes), with messages users can act on.

Messages name the operation, the URI and the endpoint (without user:password@); they never carry the
secret key or session token, nor a raw botocore message for auth failures (some stores echo keys).
"""
from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from job import redact
from job.errors import (
    AlreadyPublishedError,
    ConfigError,
    NotFoundError,
    PermissionDeniedError,
    SftjobError,
    UnavailableError,
)

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "403",
               "Forbidden", "UnrecognizedClientException", "InvalidClientTokenId", "MissingSecurityHeader"}
_CHECKSUM_CODES = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum",
                   "InvalidRequest_Checksum"}
_RETRYABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"}


def translate(e: BaseException, uri: str, op: str, *, endpoint: str, attempts: int,
              read_timeout: float | None = None) -> SftjobError:
    """botocore exception → project error (exit code) with a message naming the URI, never a secret."""
    if isinstance(e, SftjobError):
        return e
    where = f"{op} {uri} at {endpoint}"
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        tried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        if code == "NoSuchBucket":
            bucket = str(uri)[5:].split("/", 1)[0] if str(uri).startswith("s3://") else "?"
            return NotFoundError(f"bucket not found: s3://{bucket}/ ({where})",
                                 hint="create the bucket, or fix the URI / storage.endpoint_url")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFoundError(f"not found: {uri} ({where})", hint="check the key and the prefix")
        if code in _AUTH_CODES or status == 403:
            return PermissionDeniedError(
                f"access denied ({code or status}): {where}",
                hint="check the credentials the boto3 chain found (AWS_ACCESS_KEY_ID / AWS_PROFILE / "
                     "IRSA or Pod Identity role) and the bucket policy")
        if code in _CHECKSUM_CODES:
            return UnavailableError(
                f"the server rejected the body of {uri}: checksum mismatch ({code}); the bytes were "
                f"corrupted in transit or the file changed while being sent",
                hint="retry; if the store rejects SHA256 checksums itself, set "
                     "AWS_REQUEST_CHECKSUM_CALCULATION=when_required")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyPublishedError(f"{uri} already exists; write refused (If-None-Match: *)",
                                         hint="publish to a new prefix or set output.overwrite: true")
        if status >= 500 or code in _RETRYABLE_CODES:
            return UnavailableError(f"storage unavailable: {where} failed with {code or status} "
                                    f"(HTTP {status}) after {tried} attempts",
                                    hint="the job can be retried; raise storage.max_attempts for flaky stores")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return ConfigError(f"wrong region or endpoint for {uri} ({code})",
                               hint="set storage.region / AWS_REGION to the bucket's region")
        msg = redact.text(str(err.get("Message", "")))[:200]
        return ConfigError(f"S3 refused {op} {uri}: {code or status} {msg}".rstrip(),
                           hint="check the URI and the storage settings")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return PermissionDeniedError(
            f"no usable S3 credentials for {where} ({type(e).__name__})",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web identity "
                 "(IRSA / EKS Pod Identity) for the pod's service account")
    if isinstance(e, SSLError):
        return ConfigError(f"TLS verification failed for {endpoint} ({op} {uri})",
                           hint="set storage.ca_bundle to the store's CA file (or storage.verify: false)")
    if isinstance(e, NoRegionError):
        return ConfigError(f"no region for {uri}", hint="set storage.region or AWS_REGION")
    if isinstance(e, ParamValidationError):
        return ConfigError(f"invalid S3 request for {uri}: {redact.text(str(e))[:200]}")
    if isinstance(e, ReadTimeoutError):  # accepted the connection, never answered: a hung store, not a dead one
        waited = f" within storage.read_timeout ({read_timeout:g} s)" if read_timeout else ""
        return UnavailableError(f"the store did not answer: {where} got no reply{waited}, "
                                f"{attempts} attempts",
                                hint="the store accepts connections but hangs; check its health, the job can be "
                                     "retried (storage.read_timeout x storage.max_attempts bound each request)")
    if isinstance(e, (BotoConnectionError, HTTPClientError, BotoCoreError, OSError)):
        return UnavailableError(f"storage endpoint unreachable: {where} ({type(e).__name__}) "
                                f"after {attempts} attempts",
                                hint="check storage.endpoint_url / AWS_ENDPOINT_URL and the network; "
                                     "the job can be retried")
    return UnavailableError(f"{op} {uri} failed: {type(e).__name__}")
