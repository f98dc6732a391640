"""One log stream: each event once, JSON when not on a terminal (a pod), text on request; no progress bars
or third-party noise without --debug; `sftjob logs` renders our JSON lines as text."""
from __future__ import annotations

import json
import re

import pytest
from trainkit import chat_data, run, tiny_model

from job import logsetup

ARGS = ["--max-steps", "6", "--logging-steps", "2", "--learning-rate", "2e-3", "--per-device-train-batch-size", "8",
        "--warmup-ratio", "0", "--max-length", "256"]


def _run(tmp_path, *extra):
    p = run("run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *ARGS, *extra, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _noise(text: str) -> list[str]:
    pats = [r"\d+it/s\]", r"it/s\]", r"Loading weights", r"Setting accelerator to CPU", r"Generating train split",
            r"FutureWarning"]
    return [ln for ln in text.splitlines() if any(re.search(p, ln) for p in pats)]


@pytest.mark.slow
def test_not_on_a_terminal_every_progress_event_is_one_json_line(tmp_path):
    p = _run(tmp_path)
    progress = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"event": "progress"')]
    assert [e["step"] for e in progress] == [2, 4, 6]
    assert not re.search(r"^step \d+/\d+", p.stderr, re.M)  # no second, human copy
    logs = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert logs and all(isinstance(json.loads(ln), dict) for ln in logs), [ln for ln in logs if not ln.startswith("{")][:5]
    assert any(json.loads(ln)["message"].startswith("prepared data") for ln in logs)
    assert _noise(p.stdout + p.stderr) == []
    done = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"event": "done"')]
    assert len(done) == 1 and done[0]["steps"] == 6


@pytest.mark.slow
def test_log_format_text_prints_each_progress_event_once_as_text(tmp_path):
    p = _run(tmp_path, "--log-format", "text")
    steps = re.findall(r"^step (\d+)/6 ", p.stderr, re.M)
    assert steps == ["2", "4", "6"]
    assert '"event"' not in p.stdout
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO sftjob", p.stderr, re.M)
    assert _noise(p.stdout + p.stderr) == []
    assert re.search(r"^done: 6 steps", p.stderr, re.M)


def test_auto_is_json_without_a_terminal_and_the_choice_reaches_child_processes(monkeypatch):
    monkeypatch.delenv(logsetup.ENV, raising=False)
    assert logsetup.resolve("auto") == "json"  # pytest captures stderr: no terminal
    assert logsetup.resolve("text") == "text" and logsetup.resolve("bogus") == "json"
    import os

    assert logsetup.setup(False, "text") == "text"
    assert os.environ[logsetup.ENV] == "text"  # monkeypatch restores the environment afterwards
    monkeypatch.setenv(logsetup.ENV, "auto")


def test_json_lines_render_as_text_for_sftjob_logs():
    progress = json.dumps({"event": "progress", "step": 3, "max_steps": 9, "loss": 1.23456,
                           "tokens_per_second": 1234.5, "eta_seconds": 61.2})
    assert logsetup.as_text(progress) == "step 3/9  loss 1.2346  1234 tok/s  eta 61s"
    record = json.dumps({"time": "T", "level": "WARNING", "logger": "sftjob.status", "message": "store slow"})
    assert logsetup.as_text(record) == "T WARNING sftjob.status: store slow"
    assert logsetup.as_text('{"event": "done", "steps": 4}') == "done: steps=4"
    for other in ("plain text", "{not json", '["a list"]'):
        assert logsetup.as_text(other) == other


def test_json_log_records_are_redacted(capsys, monkeypatch):
    import logging

    monkeypatch.delenv(logsetup.ENV, raising=False)
    logsetup.setup(False, "json")
    logging.getLogger("sftjob.test").warning("endpoint http://user:hunter2secret@s3.local/ failed")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    doc = json.loads(line)
    assert doc["level"] == "WARNING" and "hunter2secret" not in line and "s3.local" in doc["message"]
    monkeypatch.setenv(logsetup.ENV, "auto")  # restored (removed) after the test


_WRITER = """
import sys
from job import logsetup
logsetup._format = "json"
for i in range(3000):
    logsetup.event("progress", "text", step=i, writer=int(sys.argv[1]), pad="x" * 200)
"""


def test_events_of_processes_sharing_one_unbuffered_log_never_split_a_line(tmp_path):
    """Under PYTHONUNBUFFERED (the image sets it) print() wrote an event and its newline separately, and
    another process's line landed between them (a CI log: a progress object with a log record glued on).
    Three real processes share one log file, as ranks and the launcher share the pod's stdout."""
    import os
    import subprocess
    import sys

    log = tmp_path / "log"
    with open(log, "w") as f:
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(k)], stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) for k in range(3)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 9000
    records = [json.loads(line) for line in lines]  # a glued or split line fails here
    assert sorted((r["writer"], r["step"]) for r in records) == [(k, i) for k in range(3) for i in range(3000)]


_NOISY = """
import logging, warnings
import torch, torch.distributed as dist
import deepspeed  # noqa: F401 - 'Setting accelerator to CPU' where it finds no GPU (the accelerate launcher imports it)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_gather_into_tensor(torch.zeros(1), torch.ones(1))  # deprecated in torch; ZeRO's gathers call it
dist.destroy_process_group()
logging.getLogger("sftjob.test").warning("our own warning")
warnings.warn("a warning of ours")
print("ran", flush=True)
"""


_RANK = "import os; from job import logsetup; logsetup.setup(os.environ.get('SFTJOB_DEBUG') == '1'); import noisy"


@pytest.mark.parametrize("debug", [False, True], ids=["normal", "debug"])
@pytest.mark.parametrize("process", [["-m", "job.logsetup", "noisy"], ["-c", _RANK]], ids=["launcher", "rank"])
def test_library_warnings_show_only_with_debug_in_the_launcher_and_the_ranks(tmp_path, process, debug):
    """A normal 2-process log had DeepSpeed's `Setting accelerator to CPU` (from the accelerate launcher, which
    had no log setup) and torch's `all_gather_into_tensor is deprecated` with its source line (from the ranks,
    once per checkpoint gather). The launcher now runs under `python -m job.logsetup`; a rank runs setup()."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    (tmp_path / "noisy.py").write_text(_NOISY)
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root]), "SFTJOB_LOG_FORMAT": "text"}
    env.pop("SFTJOB_DEBUG", None)
    if debug:
        env["SFTJOB_DEBUG"] = "1"
    p = subprocess.run([sys.executable, *process], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    log = p.stdout + p.stderr
    assert p.returncode == 0 and "ran" in p.stdout, log[-3000:]
    assert "our own warning" in log and "a warning of ours" in log  # ours stay
    if debug:
        assert "all_gather_into_tensor" in log
        assert torch.cuda.is_available() or "Setting accelerator to CPU" in log
    else:
        assert "all_gather_into_tensor" not in log and "c10d_logger.py" not in log, log
        assert "Setting accelerator to CPU" not in log, log
