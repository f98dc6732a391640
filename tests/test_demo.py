"""`sftjob demo` (what `make demo` runs): real SeaweedFS, tiny model, S3 in and out, verified download."""
import hashlib
import json
import re
import socket

import pytest
import trainkit

pytestmark = pytest.mark.slow


def test_demo_publishes_and_downloads_a_verified_adapter(tmp_path):
    out = tmp_path / "demo-out"
    r = trainkit.run("demo", "--out", str(out), "--max-steps", "10", env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "sftjob demo: OK" in r.stdout
    for name in ("_SUCCESS", "manifest.json", "adapter_config.json", "adapter_model.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["base_model"].startswith("s3://sftjob-demo/models/")
    port = int(re.search(r"S3 server \(SeaweedFS\) at http://127.0.0.1:(\d+)", r.stderr).group(1))
    with socket.socket() as s:  # the demo stopped its server
        assert s.connect_ex(("127.0.0.1", port)) != 0
