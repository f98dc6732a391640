"""Exit codes and the project's error types: the one table the chart, Argo and the CLI read."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CONFIG = 64  # bad config / usage: fix the spec, do not retry
    DATA = 65  # bad data: fix the rows, do not retry
    NOT_FOUND = 66  # input (bucket, key, file, model) not found
    VERIFY = 70  # the adapter failed verification: nothing published (retryable)
    RANK_DIED = 71  # a training process (or a tokenizer worker) died; the others were ended (retryable, resumes)
    STALLED = 72  # no optimizer step for resilience.stall_seconds; stacks logged, ranks ended (retryable, resumes)
    UNAVAILABLE = 69  # storage or service unavailable after retries (retryable)
    PUBLISHED = 73  # output already published; refused
    INTERRUPTED = 75  # SIGTERM / deadline after saving what could be saved (retryable, resumes)
    PERMISSION = 77  # credentials / permission denied
    EVAL_GATE = 78  # the adapter missed the evaluation gate; kept under rejected/


#: exit codes a Kubernetes Job must not retry (podFailurePolicy FailJob)
NON_RETRYABLE = (
    ExitCode.CONFIG,
    ExitCode.DATA,
    ExitCode.NOT_FOUND,
    ExitCode.PUBLISHED,
    ExitCode.PERMISSION,
    ExitCode.EVAL_GATE,
)

MEANING = {
    ExitCode.OK: "published",
    ExitCode.CONFIG: "bad config / usage",
    ExitCode.DATA: "bad data",
    ExitCode.NOT_FOUND: "input not found (bucket, key, file, model)",
    ExitCode.VERIFY: "adapter failed verification; nothing published",
    ExitCode.RANK_DIED: "a training process or tokenizer worker died (killed or crashed); the others were ended",
    ExitCode.STALLED: "training stalled (no optimizer step for stall_seconds); stacks in the log",
    ExitCode.UNAVAILABLE: "storage or service unavailable after retries",
    ExitCode.PUBLISHED: "output already published; refused",
    ExitCode.INTERRUPTED: "interrupted (SIGTERM/deadline) after saving what it could",
    ExitCode.PERMISSION: "credentials / permission denied",
    ExitCode.EVAL_GATE: "adapter missed the evaluation gate; kept under rejected/",
}


class SftjobError(Exception):
    """A failure the user can act on: printed as one message, mapped to an exit code."""

    exit_code: ExitCode = ExitCode.CONFIG
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(SftjobError):
    exit_code, kind = ExitCode.CONFIG, "config"


class DataError(SftjobError):
    exit_code, kind = ExitCode.DATA, "data"


class NotFoundError(SftjobError):
    exit_code, kind = ExitCode.NOT_FOUND, "not_found"


class VerificationError(SftjobError):
    exit_code, kind = ExitCode.VERIFY, "verification"


class RankDiedError(SftjobError):
    exit_code, kind = ExitCode.RANK_DIED, "rank_died"
    details: dict = {}  # for status.json: failed_rank {rank, node, host, pid, step, exit_code, signal, error}


class StalledError(SftjobError):
    exit_code, kind = ExitCode.STALLED, "stalled"
    details: dict = {}  # for status.json: stall {step, seconds, phase, node, stopped_ranks, stacks}


class UnavailableError(SftjobError):
    exit_code, kind = ExitCode.UNAVAILABLE, "unavailable"


class AlreadyPublishedError(SftjobError):
    exit_code, kind = ExitCode.PUBLISHED, "already_published"


class Interrupted(SftjobError):
    exit_code, kind = ExitCode.INTERRUPTED, "interrupted"


class PermissionDeniedError(SftjobError):
    exit_code, kind = ExitCode.PERMISSION, "permission"


class EvalGateError(SftjobError):
    exit_code, kind = ExitCode.EVAL_GATE, "eval_gate"
