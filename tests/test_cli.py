"""The CLI from outside: exit codes, one clear message, no traceback."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.errors import NON_RETRYABLE, ExitCode

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def sftjob(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, cwd=cwd,
                          env={**ENV, **(env or {})}, timeout=300)


def test_unknown_config_key_exits_64_naming_it_without_traceback(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: ./m\nlearnig_rate: 0.1\n")
    r = sftjob("run", "--config", str(cfg))
    assert r.returncode == 64
    assert "learnig_rate" in r.stderr and "learning_rate" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_flag_and_missing_settings_exit_64(tmp_path):
    assert sftjob("run", "--learnin-rate", "1").returncode == 64
    r = sftjob("run", "--data", "x.jsonl", "--output", str(tmp_path / "o"))
    assert r.returncode == 64 and "model" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file_exits_64(tmp_path):
    r = sftjob("run", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 64 and "nope.yaml" in r.stderr


def test_model_not_found_exits_66(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    r = sftjob("run", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(tmp_path / "o"),
               env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 66, r.stderr
    assert "no-model" in r.stderr and "Traceback" not in r.stderr


def test_schema_prints_runspec_json_schema():
    r = sftjob("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False
    assert {"model", "data", "output", "train", "distributed"} <= set(schema["properties"])


def test_tiny_model_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for d in ("a", "b"):
        assert sftjob("tiny-model", str(tmp_path / d)).returncode == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    n = sum(p.numel() for p in model.parameters())
    assert 200_000 < n < 1_000_000
    assert model.config.model_type == "llama"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hola"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_tiny_model_seed_changes_weights(tmp_path):
    sftjob("tiny-model", str(tmp_path / "a"), "--seed", "1")
    sftjob("tiny-model", str(tmp_path / "b"), "--seed", "2")
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "b/model.safetensors").read_bytes()


def test_readme_exit_code_table_matches_errors_py():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for code in ExitCode:
        if code == ExitCode.OK:
            continue
        row = next((ln for ln in readme.splitlines() if ln.startswith(f"| {int(code)} |")), None)
        assert row, f"exit code {int(code)} missing from README"
        assert ("no (FailJob)" in row) == (code in NON_RETRYABLE), row


@pytest.mark.parametrize("cmd", ["run", "prepare", "preview", "validate", "plan"])
def test_every_spec_command_takes_every_flag(cmd):
    r = sftjob(cmd, "--help")
    assert r.returncode == 0
    for flag in ("--max-steps", "--zero-stage", "--save-steps", "--chat-template", "--data", "--model"):
        assert flag in r.stdout, (cmd, flag)


def test_flag_typo_suggests_the_closest_flag():
    r = sftjob("run", "--learnin-rate", "1")
    assert r.returncode == 64 and "did you mean --learning-rate" in r.stderr


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learnig_rate: 0.1\n")
    r = sftjob("--debug", "run", "--config", str(cfg))
    assert r.returncode == 64 and "Traceback" in r.stderr and "learning_rate" in r.stderr


def test_tiny_model_into_a_file_path_is_a_usage_error_not_a_traceback(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    for dest in (f, f / "under"):
        r = sftjob("tiny-model", str(dest))
        assert r.returncode == 64 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_unknown_sftjob_variables_are_warned_about_with_the_closest_name(capsys):
    from job.cli import warn_unknown_env

    lines = warn_unknown_env({"SFTJOB_MAX_STEP": "3", "SFTJOB_LEARNING_RATE": "1", "SFTJOB_CACHE_DIR": "/c",
                              "SFTJOB_PROGRESS": "0", "SFTJOB_TERMINATION_LOG": "/t", "SFTJOB_DEBUG": "1"})
    assert lines == ["sftjob: warning: unknown environment variable SFTJOB_MAX_STEP is ignored "
                     "(did you mean SFTJOB_MAX_STEPS?)"]
    assert "SFTJOB_MAX_STEP " in capsys.readouterr().err


def test_every_sftjob_variable_the_code_reads_is_known():
    """A variable read with os.environ is not 'unknown': grep the code for them."""
    from pathlib import Path

    from job.cli import warn_unknown_env

    root = Path(__file__).resolve().parents[1] / "job"
    read = {m for p in root.rglob("*.py") for m in re.findall(r"[\"'](SFTJOB_[A-Z0-9_]+)[\"']", p.read_text())}
    chart = root.parent / "charts" / "sftjob" / "templates"
    read |= {m for p in chart.rglob("*") if p.is_file() for m in re.findall(r"name: (SFTJOB_[A-Z0-9_]+)", p.read_text())}
    assert {"SFTJOB_PROGRESS", "SFTJOB_TERMINATION_LOG", "SFTJOB_CACHE_DIR"} <= read
    assert warn_unknown_env(dict.fromkeys(read, "1")) == []


def test_negative_numbers_are_values_with_a_space_too():
    from job.cli import build_parser

    for value in ("-1", "-1e-4", "-0.5", "-.5", "-1E3"):
        args = build_parser().parse_args(["plan", "--learning-rate", value, "--seed", "-3"])
        assert getattr(args, "train.learning_rate") == value and getattr(args, "train.seed") == "-3"
    r = sftjob("validate", "--learning-rate", "-1e-4")
    assert r.returncode == 64 and "learning_rate" in r.stderr and "expected one argument" not in r.stderr


def test_debug_gives_debug_logs(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    r = sftjob("--debug", "validate", "--data", str(data), "--log-format", "text", env={"SFTJOB_MAX_STEPS": "4"})
    assert r.returncode == 0, r.stderr
    debug = [ln for ln in r.stderr.splitlines() if " DEBUG " in ln]
    as_json = sftjob("--debug", "validate", "--data", str(data), env={"SFTJOB_MAX_STEPS": "4"})  # no terminal: JSON
    assert any('"level": "DEBUG"' in ln and "settings: " in ln for ln in as_json.stderr.splitlines())
    settings = [ln.split("settings: ", 1)[1] for ln in debug if "settings: " in ln]
    assert settings and "train.max_steps" in settings[0].split("from env")[1] and "from flags data.path" in settings[0]


def test_run_id_carries_one_timestamp():
    from job.pipeline import make_run_id

    assert make_run_id(None, "s3://b/runs/demo-20261129-195229") == "demo-20261129-195229"
    assert make_run_id("mine", "s3://b/runs/x") == "mine"
    assert re.fullmatch(r"run-42-\d{8}-\d{6}", make_run_id(None, "s3://b/runs/run-42/"))


@pytest.mark.parametrize("command", ["prepare", "run", "validate"])
def test_an_unusable_cache_directory_is_a_config_error_naming_it_not_a_traceback(tmp_path, command):
    """SFTJOB_CACHE_DIR below a regular file (as a wrong mount would give): prepare crashed with a traceback
    (exit 1, retried by Kubernetes); now 64 before anything is fetched, naming the directory and the fix."""
    from job import tiny

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    model = tiny.write(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    p = sftjob(command, "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
               env={"SFTJOB_CACHE_DIR": str(blocker / "cache")})
    assert p.returncode == ExitCode.CONFIG, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert f"cache directory {blocker / 'cache'} (--cache-dir / SFTJOB_CACHE_DIR) is not usable" in p.stderr
    assert "fix: point SFTJOB_CACHE_DIR" in p.stderr
    assert not (tmp_path / "out").exists()


def test_plan_refuses_a_model_config_that_is_not_json_and_a_rate_that_is_not_positive(tmp_path):
    """Both were found by fuzzing: a traceback (exit 1) and a negative time estimate (exit 0)."""
    from job import tiny

    model = tiny.write(tmp_path / "m")
    junk = tmp_path / "config.json"
    junk.write_text("{bad")
    p = sftjob("plan", "--model", str(model), "--model-config", str(junk), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert p.returncode == ExitCode.CONFIG and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{junk} is not valid JSON" in p.stderr
    for rate in ("-5", "inf", "0"):
        p = sftjob("plan", "--model", str(model), "--tokens-per-second", rate,
                   env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
        assert p.returncode == ExitCode.CONFIG and "must be a number above 0" in p.stderr, p.stderr[-500:]


@pytest.mark.parametrize("entry", ["python -m job", "console script"])
def test_a_sigterm_before_the_run_starts_is_exit_75_even_while_the_store_hangs(s3, tmp_path, entry):
    """Found by the soak (seed 5): SIGTERM while the CLI loaded, or while it asked a frozen store whether the
    output is taken, killed the process by the signal (-15) instead of exit 75. Sent here once the process
    holds a connection to the frozen store (the pipeline's own handler is not installed yet)."""
    import psutil
    import trainkit

    bucket = s3.bucket("early-sigterm")
    cmd = ([sys.executable, "-m", "job"] if entry == "python -m job"
           else [str(Path(sys.executable).with_name("sftjob"))])
    args = ["run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
            "--output", f"s3://{bucket}/out", "--max-steps", "2"]
    with s3.frozen():
        proc = subprocess.Popen(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "SFTJOB_CACHE_DIR": str(tmp_path / "c")})
        try:
            deadline, waiting = time.time() + 120, False
            while not waiting and time.time() < deadline and proc.poll() is None:
                try:
                    waiting = any(c.raddr and c.raddr.port == s3.port
                                  for c in psutil.Process(proc.pid).net_connections(kind="tcp"))
                except psutil.Error:
                    pass
                time.sleep(0.05)
            assert waiting, "the run never reached the store"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)  # not the read timeout × retries of the frozen call
        finally:
            proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err[-3000:]
    assert "stopped by SIGTERM before the run started" in err and "Traceback" not in err
    assert not s3.keys(bucket, "out/")  # nothing written
