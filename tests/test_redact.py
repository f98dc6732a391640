"""One redactor for everything published, logged or printed: URL userinfo, query values, secret env values."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job import cli, redact, specload
from job.errors import ConfigError
from job.status import Status

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "http://sftjob:pa55word@minio.local:9000/?X-Amz-Signature=deadbeefcafe"


def test_url_userinfo_and_query_values_are_masked_and_everything_else_kept():
    assert redact.text(f"endpoint {ENDPOINT}, retrying") == \
        "endpoint http://***@minio.local:9000/?X-Amz-Signature=***, retrying"
    assert redact.text("'https://u@h/p?a=1&flag#frag'") == "'https://***@h/p?a=***&***#frag'"
    assert redact.text("https://host?token=abc") == "https://host?token=***"
    plain = "s3://bucket/runs/x/adapter_model.safetensors and http://127.0.0.1:9000/path"
    assert redact.text(plain) == plain


def test_secret_environment_values_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "short")  # too short to mask safely
    assert redact.text("token hf_abcdefghijklmnop, short") == "token ***, short"
    assert redact.data({"a": ["hf_abcdefghijklmnop", 3], "b": None}) == {"a": ["***", 3], "b": None}


def test_run_yaml_masks_endpoint_credentials():
    s = specload.build(overrides={"storage.endpoint_url": ENDPOINT, "output.uri": "s3://b/runs/x"}, environ={})
    text = specload.to_yaml(s)
    assert "pa55word" not in text and "deadbeefcafe" not in text
    assert yaml.safe_load(text)["storage"]["endpoint_url"] == "http://***@minio.local:9000/?X-Amz-Signature=***"
    assert s.storage.endpoint_url == ENDPOINT, "the live spec keeps the real endpoint"


def test_path_and_sources_error_names_the_problem_without_dumping_the_config(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(f"data:\n  sources: [{{path: b.jsonl}}]\nstorage:\n  endpoint_url: '{ENDPOINT}'\n")
    with pytest.raises(ConfigError) as e:
        specload.build(f, {"data.path": "a.jsonl"}, environ={})
    assert "set data.path or data.sources, not both" in str(e.value)
    assert "pa55word" not in str(e.value) and "endpoint_url" not in str(e.value)
    assert cli.main(["validate", "--config", str(f), "--data", "a.jsonl"]) == 64
    err = capsys.readouterr().err
    assert "not both" in err and "pa55word" not in err


def test_a_value_error_shows_the_value_redacted(tmp_path):
    with pytest.raises(ConfigError) as e:
        specload.build(overrides={"storage.max_attempts": ENDPOINT}, environ={})
    assert "max_attempts" in str(e.value) and "http://***@minio.local" in str(e.value)
    assert "pa55word" not in str(e.value)


def test_log_lines_are_redacted():
    code = ("import logging; from job import logsetup; logsetup.setup(); "
            f"logging.getLogger('sftjob.x').warning('cannot reach %s', {ENDPOINT!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "cannot reach http://***@minio.local:9000/?X-Amz-Signature=***" in r.stderr, r.stderr
    assert "pa55word" not in r.stderr and "deadbeefcafe" not in r.stderr


def test_status_json_error_message_is_redacted(tmp_path):
    st = Status(tmp_path, None)
    st.start(run_id="r")
    st.fail(69, "unavailable", f"storage endpoint unreachable: {ENDPOINT}")
    text = (tmp_path / "status.json").read_text()
    assert "pa55word" not in text and "http://***@minio.local" in json.loads(text)["error"]["message"]
