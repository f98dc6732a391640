"""Shared test fixtures: an offline, isolated environment and one real S3 server per session.

``s3`` (session): a SeaweedFS server (job/storage/devserver.py, re-exported as tests/s3server.py) whose admin credentials and endpoint are put
into ``os.environ`` for the whole session (so code under test and subprocesses use the ordinary boto3
chain), restored and the server SIGKILLed at teardown. Use ``s3.bucket("name")`` to create buckets,
``s3.client()`` for assertions, ``s3.env`` / ``s3.reader_env`` for subprocess environments.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest

# Before anything imports transformers/tokenizers: never touch the network, no fork warnings.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("SFTJOB_PROGRESS", "0")
_CACHE = tempfile.TemporaryDirectory(prefix="sftjob-test-cache-")
os.environ["SFTJOB_CACHE_DIR"] = _CACHE.name
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(_CACHE.name, "torch_extensions"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from s3server import S3Server, weed_binary  # tests/ is on sys.path (pytest rootdir conftest)

    with _running(weed_binary, lambda: S3Server(root=tmp_path_factory.mktemp("seaweedfs"))) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        _reset_storage()
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_storage()


@contextlib.contextmanager
def _running(check, make):
    """A real server for the session: its binary checked (a clear failure naming `make tools`), started, stopped."""
    try:
        check()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    server = make().start()
    try:
        yield server
    finally:
        server.stop()


def _reset_storage() -> None:
    import sys

    if "job.storage" in sys.modules:
        sys.modules["job.storage"].configure(None)


@pytest.fixture(autouse=True)
def _storage_settings_restored():
    """Tests may call job.storage.configure(); never let one test's settings leak into the next."""
    import job.storage as storage

    before = storage.settings()
    yield
    if storage.settings() is not before:
        storage.configure(before)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (tools/mlflow, from `make tools`) for the session; stopped at teardown."""
    from mlflowserver import MlflowServer, binary

    with _running(binary, lambda: MlflowServer(tmp_path_factory.mktemp("mlflow"))) as server:
        print(f"mlflow server healthy in {server.start_seconds:.1f}s at {server.uri}")
        yield server


def pytest_collection_modifyitems(session, config, items):
    """Longest modules first (tests/timings.json: seconds per module, measured serially), each module's tests
    in their own order. With `-n` and `--dist loadscope` (make test) a module runs on one worker, so its
    module-scoped fixtures are built once; the longest starting first keeps one worker from finishing a long
    module alone at the end. A module not in the file counts as long (a new one is most likely a training test)."""
    import json
    from pathlib import Path

    try:
        seconds = json.loads((Path(__file__).parent / "timings.json").read_text())["modules"]
    except (OSError, ValueError, KeyError):
        return
    longest = max(seconds.values(), default=0)
    order = {}
    for i, item in enumerate(items):
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
        order[id(item)] = (-seconds.get(module, longest), i)
    items.sort(key=lambda it: order[id(it)])
