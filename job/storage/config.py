"""The run's storage section (job.spec.StorageSpec), set once by ``storage.configure``; the S3 client reads it
here, below the package's dispatch, so s3.py never imports the package that imports it."""
from __future__ import annotations

current = None  # job.spec.StorageSpec, or None: the defaults
