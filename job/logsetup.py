"""One logging setup for the entrypoint and every training rank: one stream, each event once.

`log_format` (flag --log-format, env SFTJOB_LOG_FORMAT): ``text`` for a person, ``json`` (one object per
line) for a log pipeline (Loki, CloudWatch, Elastic); ``auto`` picks text on a terminal, JSON otherwise,
and the entrypoint hands the resolved format to the ranks. Events (progress, eval, done) are one line each:
``{"event": "progress", ...}`` on stdout in JSON, a human line on stderr in text. Progress bars only on a
terminal; third-party noise (DeepSpeed's accelerator notice, known-harmless deprecations) only with --debug.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from job import redact

# protocol and plotting chatter: WARNING and up even with --debug (our own DEBUG lines are what --debug adds)
QUIET = ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "matplotlib", "PIL", "fsspec")
# the ML libraries: WARNING and up unless --debug
NOISY = ("DeepSpeed", "torch.distributed", "accelerate", "datasets", "transformers", "peft", "trl")
HARMLESS = (  # (category, message regex): emitted inside transformers/peft/trl, not by our calls
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
    (FutureWarning, r".*use_liger_kernel=True.* is deprecated"),  # TRL 1.16; the option still works (H200-tested)
)
# deprecations raised inside the ML libraries, about their own calls to each other (torch's
# `all_gather_into_tensor is deprecated`, from DeepSpeed's ZeRO gathers at every checkpoint): nothing a run's
# owner can change. Matched by the module the warning is attributed to; a warning at a line of ours stays.
LIBRARY_MODULES = r"(torch|deepspeed|accelerate|transformers|peft|trl|datasets|huggingface_hub)(\.|$)"
ENV = "SFTJOB_LOG_FORMAT"
_format = "text"


def resolve(value: str | None = None) -> str:
    """auto → text on a terminal, json otherwise."""
    value = (value or os.environ.get(ENV) or "auto").lower()
    if value not in ("auto", "text", "json"):
        value = "auto"
    if value == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return value


class _Redacting(logging.Formatter):
    """Log lines pass the one redactor: a URL with a password or a token in a message never reaches the log."""

    def format(self, record: logging.LogRecord) -> str:
        return redact.text(super().format(record))


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact.text(json.dumps(doc, ensure_ascii=False, default=str))


def setup(debug: bool = False, fmt: str | None = None) -> str:
    """Configure logging once per process; returns the resolved format (also exported to child processes)."""
    global _format
    _format = resolve(fmt)
    os.environ[ENV] = _format  # the ranks inherit the entrypoint's decision (their stderr is no terminal)
    if not debug and not sys.stderr.isatty():
        # before transformers/datasets/hub are imported: their bars read these at import time
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_sftjob", False)]:  # ours from an earlier call only
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._sftjob = True
    handler.setFormatter(_Json() if _format == "json" else _Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not debug:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)
        # DeepSpeed sets its own level and handler when it is imported; a filter on the logger survives that
        logging.getLogger("DeepSpeed").addFilter(lambda r: r.levelno >= logging.ERROR)
        # Liger lists every optional backend it cannot import (CuTe DSL, Ascend) as a warning, once per op
        logging.getLogger("liger_kernel").setLevel(logging.ERROR)
        for category, message in HARMLESS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    return _format


def run_module(argv: list[str]) -> None:
    """`python -m job.logsetup MODULE ARGS...`: MODULE as `python -m MODULE ARGS...` runs it, under this setup.

    job.train.launch starts the accelerate launcher so: it imports DeepSpeed, and with no setup of its own its
    `Setting accelerator to CPU` reached every normal log (the ranks call setup() themselves)."""
    import runpy

    setup(os.environ.get("SFTJOB_DEBUG") == "1")
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def event(kind: str, text: str, **fields) -> None:
    """One event, printed once: a JSON object on stdout, or `text` for a person on stderr."""
    if _format == "json":
        _line(sys.stdout, redact.text(json.dumps({"event": kind, **fields}, default=str)))
    else:
        _line(sys.stderr, redact.text(text))


def _line(stream, text: str) -> None:
    """text and its newline in ONE write: under PYTHONUNBUFFERED (the image sets it) print() writes them
    separately, and another process's line on the same pod log (rank 0's mirror log, the launcher's)
    landed between them: a JSON line with a second object glued to it (seen in a CI test's log)."""
    stream.write(text + "\n")
    stream.flush()


def as_text(line: str) -> str:
    """A JSON log line (ours) as the text line a person reads; other lines unchanged. Used by `sftjob logs`."""
    s = line.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return line
    try:
        doc = json.loads(s)
    except ValueError:
        return line
    if not isinstance(doc, dict):
        return line
    if "event" in doc:
        kind = doc["event"]
        if kind == "progress":
            loss = doc.get("loss")
            return (f"step {doc.get('step')}/{doc.get('max_steps')}  loss {loss:.4f}  "
                    f"{doc.get('tokens_per_second') or 0:.0f} tok/s  eta {doc.get('eta_seconds') or 0:.0f}s"
                    if isinstance(loss, int | float) else f"step {doc.get('step')}/{doc.get('max_steps')}")
        rest = " ".join(f"{k}={v}" for k, v in doc.items() if k not in ("event", "time"))
        return f"{kind}: {rest}"
    if "message" in doc and "level" in doc:
        return f"{doc.get('time', '')} {doc['level']} {doc.get('logger', '')}: {doc['message']}".strip()
    return line


if __name__ == "__main__":
    run_module(sys.argv[1:])
