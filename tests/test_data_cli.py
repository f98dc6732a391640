"""`sftjob validate` / `preview` / `prepare` contracts, as later checks call them."""
from __future__ import annotations

import gzip
import json
import os
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
