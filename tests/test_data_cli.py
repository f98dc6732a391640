"""`sftjob validate` / `preview` / `prepare` contracts, as later checks call them."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from job.cli import main
from job.demo_data import conversations

ROOT = Path(__file__).resolve().parents[1]
OK = {"messages": [{"role": "user", "content": "¿Cuánto es 2 más 2?"}, {"role": "assistant", "content": "2 más 2 es 4."}]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from job import tiny

    d = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def bad_file(tmp_path):
    lines = [
        json.dumps(OK),
        '{"messages": [{"role": "user"',  # 2: invalid JSON
        json.dumps({"conversation": []}),  # 3: missing messages
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),  # 4
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),  # 5
        json.dumps({"messages": [{"role": "user", "content": "solo"}]}),  # 6: no assistant turn
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}),  # 7: non-alternating (llama2 rejects)
        json.dumps({"messages": [{"role": "user", "content": "hola " * 300}, {"role": "assistant", "content": "y"}]}),  # 8
        json.dumps(OK),
    ]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def run_cli(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, cwd=ROOT, env=e, timeout=120)


def test_validate_lists_every_bad_row_by_file_line_and_field_and_exits_65_without_traceback(bad_file, tok_dir):
    out = run_cli("validate", "--data", str(bad_file), "--tokenizer", str(tok_dir), "--chat-template", "llama2",
                  "--max-length", "200", "--truncation", "drop")
    assert out.returncode == 65, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(str(bad_file))]
    assert [ln.split(":")[1] for ln in lines] == ["2", "3", "4", "5", "6", "7", "8"]
    text = "\n".join(lines)
    for needle in ("invalid JSON", "messages: missing", "unknown role 'wizard'", "empty content", "no assistant turn",
                   "must alternate", "tokens > max_length 200 with truncation: drop"):
        assert needle in text
    assert "7 of 9 rows are bad" in out.stdout


def test_validate_without_tokenizer_checks_structure_and_says_token_checks_are_skipped(bad_file, capsys):
    assert main(["validate", "--data", str(bad_file), "--chat-template", "llama2"]) == 65
    out = capsys.readouterr().out
    assert "token checks (lengths, masks) skipped" in out
    assert ":7: messages: the chat template rejects this conversation" in out
    assert ":8:" not in out  # length needs a tokenizer
    assert main(["validate", "--data", str(bad_file)]) == 65
    assert "structural checks only" in capsys.readouterr().out


def test_validate_clean_data_exits_0_with_a_summary(tmp_path, tok_dir, capsys):
    f = tmp_path / "ok.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in conversations(30)))
    assert main(["validate", "--data", str(f), "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "validate: OK, 30 rows in 1 file(s)" in out and "trained" in out


def test_validate_lists_first_20_bad_rows_then_a_count(tmp_path, capsys):
    f = tmp_path / "many.jsonl"
    f.write_text("not json\n" * 25)
    assert main(["validate", "--data", str(f), "--format", "messages"]) == 65
    out = capsys.readouterr().out
    assert out.count("invalid JSON") == 20 and "... and 5 more bad rows" in out


@pytest.mark.parametrize("name,content,code,msg", [
    ("empty.jsonl", b"", 65, "empty file"),
    ("data.txt", b"{}", 65, "unsupported file extension"),
    ("bad.jsonl.gz", b"\x1f\x8b\x08garbage", 65, "unreadable file"),
    ("absent.jsonl", None, 66, "not found"),
])
def test_validate_file_problems_are_clear_errors(tmp_path, capsys, name, content, code, msg):
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    assert main(["validate", "--data", str(f)]) == code
    assert msg in capsys.readouterr().err


def test_preview_json_prints_one_object_per_example_with_ids_and_labels(tmp_path, tok_dir, capsys):
    from transformers import AutoTokenizer

    rows = conversations(5)
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["preview", "--data", str(f), "--tokenizer", str(tok_dir), "--limit", "3", "--json"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(objs) == 3
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    for o, r in zip(objs, rows, strict=False):
        assert o["input_ids"] == list(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"])
        assert len(o["labels"]) == len(o["input_ids"]) and -100 in o["labels"]


def test_preview_text_marks_trained_spans_with_brackets_when_not_a_tty(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    assert main(["preview", "--data", str(f), "--tokenizer", str(tok_dir), "--system-prompt", "Sé breve."]) == 0
    out = capsys.readouterr().out
    assert "[[2 más 2 es 4.<|im_end|>]]" in out
    assert "<|im_start|>system\nSé breve.<|im_end|>" in out and out.count("[[") == 1


def test_prepare_command_prints_where_the_cache_is(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in conversations(20)))
    args = ["prepare", "--data", str(f), "--model", str(tok_dir), "--cache-dir", str(tmp_path / "c"), "--num-proc", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("prepared: " + str(tmp_path / "c" / "prepared"))
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("cache hit")


def test_a_broken_chat_template_file_is_one_config_error_not_a_row_per_line(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    t = tmp_path / "broken.jinja"
    t.write_text("{% for message in messages %}{{ message['content'] }")
    assert main(["validate", "--data", str(f), "--chat-template", str(t)]) == 64
    err = capsys.readouterr().err
    assert "broken.jinja' fails on a plain user/assistant exchange" in err and "Traceback" not in err


# ---- every command honours the whole spec ------------------------------------------------------

def test_validate_preview_and_prepare_use_the_spec_storage_endpoint(s3, tmp_path, tok_dir):
    """--endpoint-url (or SFTJOB_ENDPOINT_URL) alone, no AWS_ENDPOINT_URL: not a call to AWS and exit 69."""
    import boto3

    b = s3.bucket("cmds-endpoint")
    body = "".join(json.dumps(r) + "\n" for r in conversations(12)).encode()
    boto3.client("s3", endpoint_url=s3.endpoint).put_object(Bucket=b, Key="data/train.jsonl", Body=body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["SFTJOB_CACHE_DIR"] = str(tmp_path / "cache")
    data = ["--data", f"s3://{b}/data/", "--tokenizer", str(tok_dir)]

    def cli(*args, extra=None):
        return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, cwd=ROOT,
                              env={**env, **(extra or {})}, timeout=300)

    r = cli("validate", *data, "--endpoint-url", s3.endpoint, "--max-attempts", "2")
    assert r.returncode == 0 and "validate: OK, 12 rows" in r.stdout, r.stderr
    r = cli("validate", *data, extra={"SFTJOB_ENDPOINT_URL": s3.endpoint})
    assert r.returncode == 0, r.stderr
    r = cli("preview", *data, "--endpoint-url", s3.endpoint, "--limit", "1", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"storage: {{endpoint_url: '{s3.endpoint}'}}\n")
    r = cli("prepare", "--config", str(cfg), "--data", f"s3://{b}/data/", "--model", str(tok_dir))
    assert r.returncode == 0 and r.stdout.startswith("prepared: "), r.stderr


def test_a_tokenizer_from_s3_comes_without_the_weights_and_run_completes_the_same_cache(s3, tmp_path, capsys):
    from job import specload, storage, tiny
    from job.data.templates import locate_tokenizer
    from job.pipeline import fetch_model

    b = s3.bucket("cmds-tok-only")
    tiny.write(tmp_path / "m")
    storage.upload_tree(tmp_path / "m", f"s3://{b}/models/tiny")
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in conversations(5)))
    cache = tmp_path / "cache"
    uri = f"s3://{b}/models/tiny"
    assert main(["validate", "--data", str(f), "--tokenizer", uri, "--cache-dir", str(cache)]) == 0
    files = {p.name: p for p in cache.rglob("*") if p.is_file() and ".sftjob" not in p.name and p.suffix != ".lock"}
    assert "tokenizer.json" in files and "config.json" in files
    assert "model.safetensors" not in files and "generation_config.json" not in files  # no weights for validate
    tok_file, before = files["tokenizer.json"], files["tokenizer.json"].stat().st_mtime_ns

    spec = specload.build(overrides={"model.path": uri, "cache_dir": str(cache)}, environ={})
    model_dir = Path(fetch_model(spec))  # what `run` does: the same directory, completed with the weights
    assert model_dir == tok_file.parent and (model_dir / "model.safetensors").is_file()
    assert tok_file.stat().st_mtime_ns == before  # not downloaded a second time
    assert not (cache / "models").exists()
    assert locate_tokenizer(spec) == model_dir and (model_dir / "model.safetensors").is_file()  # weights stay


def test_plan_exits_as_validate_would_on_bad_data_or_a_missing_tokenizer(tmp_path, bad_file, tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--data", str(bad_file), "--cache-dir", str(tmp_path / "c")]) == 65
    assert "bad row" in capsys.readouterr().err
    good = tmp_path / "ok.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in conversations(20)))
    assert main(["plan", "--model", str(tiny_model), "--tokenizer", str(tmp_path / "no-tok"), "--data", str(good)]) == 66
    assert "no-tok" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model), "--data", str(good), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("tokens "))
    processed, trained = (int(n) for n in re.findall(r"(\d+) (?:processed|trained)", line))
    assert 0 < trained < processed  # prompts are processed, only assistant tokens are trained


def test_an_offline_plan_goes_on_without_the_tokenizer_but_not_with_bad_data(tmp_path, bad_file, tiny_model, capsys,
                                                                           caplog):
    """--model-config plans from shapes alone: unreachable inputs are a warning, bad rows are still an error."""
    config = ["--model-config", str(tiny_model / "config.json"), "--cache-dir", str(tmp_path / "c")]
    good = tmp_path / "ok.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in conversations(20)))
    assert main(["plan", "--model", "Org/not-here", "--data", str(good), "--max-steps", "3", *config]) == 0
    assert "inputs not reachable" in caplog.text and "steps            3" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_model), "--data", str(bad_file), *config]) == 65


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from job import tiny

    return tiny.write(tmp_path_factory.mktemp("tiny"))


# ---- one verdict --------------------------------------------------------------------------------

def test_validate_fails_as_prepare_does_when_truncation_leaves_nothing_to_train(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in conversations(30)))
    common = ["--data", str(f), "--max-length", "9", "--cache-dir", str(tmp_path / "c")]
    assert main(["validate", "--tokenizer", str(tok_dir), *common]) == 65
    out, err = capsys.readouterr()
    why = "no training examples left: 30 row(s) read, dropped no_trained_tokens: 30; 30 longer than max_length 9"
    assert why in out and "OK" not in out
    assert "WARNING: 30 of 30 rows (100%) are longer than max_length 9" in err
    assert main(["prepare", "--model", str(tok_dir), *common]) == 65
    assert why in capsys.readouterr().err


def test_validate_and_prepare_give_the_same_row_counts(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in conversations(30)))
    common = ["--data", str(f), "--max-length", "60", "--cache-dir", str(tmp_path / "c"), "--num-proc", "1"]
    assert main(["validate", "--tokenizer", str(tok_dir), *common]) == 0
    v_out, v_err = capsys.readouterr()
    assert main(["prepare", "--model", str(tok_dir), *common]) == 0
    p_out, p_err = capsys.readouterr()
    rows = [ln.strip() for ln in v_out.splitlines() if ln.strip().startswith("rows read")]
    assert rows and rows[0] in p_out
    long = int(re.search(r"(\d+) longer than max_length 60", rows[0]).group(1))
    assert long > 3  # every row over 60 tokens, truncated ones and dropped ones alike
    assert f"WARNING: {long} of 30 rows" in v_err and f"WARNING: {long} of 30 rows" in p_err


# ---- templates that cannot work are one config error ------------------------------------------------

def test_a_template_that_renders_no_content_is_one_config_error(tmp_path, tok_dir):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    t = tmp_path / "roles-only.jinja"
    t.write_text("{% for m in messages %}{{ m['role'] }}\n{% endfor %}")
    r = run_cli("validate", "--data", str(f), "--tokenizer", str(tok_dir), "--chat-template", str(t))
    assert r.returncode == 64, r.stderr
    assert "does not render any message content" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_a_jinja_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    t = tmp_path / "broken.jinja"
    line = "  {{ message['role'] }}{% if x %}{{ message['content'] }"
    t.write_text("{% for message in messages %}\n" + line + "\n{% endfor %}")
    assert main(["validate", "--data", str(f), "--chat-template", str(t)]) == 64
    err = capsys.readouterr().err
    assert f"Jinja syntax error at {t}:2:{len(line)}: unexpected '}}'" in err  # the lone } ends the line


# ---- small ones -------------------------------------------------------------------------------------

def test_preview_limit_zero_is_a_usage_error_not_one_example(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    assert main(["preview", "--data", str(f), "--tokenizer", str(tok_dir), "--limit", "0"]) == 64
    out, err = capsys.readouterr()
    assert out == "" and "--limit 0" in err


def test_a_tokenizer_that_cannot_load_is_explained_in_full(tmp_path, tok_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["validate", "--data", str(f), "--tokenizer", str(d)]) == 66
    err = capsys.readouterr().err
    assert "cannot load a tokenizer" in err and "sentencepiece or tiktoken" in err  # not cut after its first line


def test_a_hub_id_is_not_called_a_missing_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(OK) + "\n")
    assert main(["validate", "--data", str(f), "--model", "Qwen/Qwen2.5-0.5B-Instruct"]) == 66
    err = capsys.readouterr().err
    assert "hub id" in err and "HF_HUB_OFFLINE" in err and "not a directory" not in err


def test_prepare_with_tokenizer_workers_lists_unreadable_json_array_elements_as_bad_rows(tmp_path, tok_dir):
    """A .json array's unreadable element travels to the forked tokenizer workers as a row problem; it could
    not be unpickled there (exit 1, a traceback in the worker) before RowIssue learned to cross."""
    f = tmp_path / "rows.json"
    dup = '{"messages": [{"role": "user", "content": "q", "role": "user"}, {"role": "assistant", "content": "a"}]}'
    lone = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udc00"}]}'
    f.write_text("[\n" + ",\n".join([json.dumps(OK)] * 40 + [dup, lone] + [json.dumps(OK)] * 40) + "\n]")
    out = run_cli("prepare", "--data", str(f), "--model", str(tok_dir), "--cache-dir", str(tmp_path / "c"),
                  "--num-proc", "2")
    assert out.returncode == 65, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert "2 bad row(s)" in out.stderr
    assert f"{f}:42: messages[0]: duplicate key 'role'" in out.stderr
    assert f"{f}:43: messages[1].content: invalid Unicode: a lone surrogate (\\udc00)" in out.stderr
