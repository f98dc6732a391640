"""The entrypoint of `python -m job` and of the `sftjob` console script (the image's ENTRYPOINT).

A SIGTERM (pod deletion, preemption) can come at any moment, also before the CLI is imported (0.3 s here,
more on a loaded node) or while it loads the spec and asks the store whether the output is taken: found by
the soak (seed 5), such a run died of the signal (-15, 143 in a container) where docs/failures.md gives 75.
So the first thing the process does is take SIGTERM: nothing has started, nothing is to be saved, exit 75
(retryable: the rerun starts the run). The pipeline replaces this handler with its own once a run begins.
"""
import signal
import sys

from job.errors import ExitCode


class _SigtermBeforeStart(BaseException):
    """Raised by the early handler: a BaseException, so no `except Exception` on the way swallows it."""


def _sigterm_before_start(signum, frame):
    raise _SigtermBeforeStart


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm_before_start)
    try:
        from job.cli import main as cli_main

        return cli_main()
    except _SigtermBeforeStart:
        print("sftjob: stopped by SIGTERM before the run started; nothing to save (a rerun starts it)",
              file=sys.stderr)
        from job import outage

        outage.leave_if_stuck(int(ExitCode.INTERRUPTED))  # a call blocked on a frozen store must not hold the exit
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    raise SystemExit(main())
