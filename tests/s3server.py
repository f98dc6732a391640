"""Test-side name for the SeaweedFS helper; the code lives in job/storage/devserver.py (the demo uses it too)."""
from job.storage.devserver import (  # noqa: F401
    ADMIN,
    READER,
    REGION,
    S3Server,
    closed_port,
    free_port_block,
    start,
    weed_binary,
)
