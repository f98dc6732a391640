"""Forked workers that a SIGTERM, an error or a dead worker always stops: preparation's tokenizer processes.

Not ``multiprocessing.Pool``, for two measured reasons:

- ``Pool.terminate()`` hangs when a worker is stopped while it sends a large result: the queue's lock,
  shared by every worker, stays held by the dead one (12 hangs in 60 terminates with 8 MB results,
  Python 3.11). Our results are token arrays of several MB, so a SIGTERM during prepare could hang the pod
  until SIGKILL.
- A worker killed by the OOM killer loses its task, and ``get()`` on it waits forever.

Here each worker has a pipe of its own: stopping is SIGKILL and close (nothing shared is left locked), and a
dead worker is an end-of-file on its pipe, reported with its pid and signal.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait

from job.errors import RankDiedError, SftjobError

log = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Workers:
    """``num`` forked processes running ``fn``; ``imap`` gives results in input order with at most ``depth``
    tasks per worker in flight, so the input is read only a little ahead. A context manager: a normal end
    lets the workers exit, any exception (SIGTERM's Interrupted included) kills them."""

    def __init__(self, num: int, fn: Callable, initializer: Callable | None = None, initargs: tuple = (),
                 depth: int = 2, name: str = "worker"):
        self.depth, self.name = depth, name
        self._procs: list = []
        self._conns: list = []
        self._in_flight = 0  # tasks sent whose results were not handed out: close() then kills at once
        ctx = multiprocessing.get_context("fork")
        try:
            # No SIGTERM handler may run between a fork and the child's reset of it: the child would raise
            # the run's Interrupted. The mask is inherited; the child unblocks once its handlers are set.
            with _blocked(_STOP_SIGNALS):
                for i in range(num):
                    mine, theirs = ctx.Pipe(duplex=True)
                    p = ctx.Process(target=_serve, name=f"sftjob-{name}-{i}", daemon=True,
                                    args=(theirs, list(self._conns), fn, initializer, initargs))
                    p.start()
                    theirs.close()  # the worker holds the only other end: its death is our end-of-file
                    self._procs.append(p)
                    self._conns.append(mine)
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.kill()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def imap(self, items: Iterable) -> Iterator:
        """``fn(item)`` for each item, in order. Each task goes to the least-loaded worker; a worker's error is
        raised here, a dead worker is a RankDiedError naming it."""
        items = iter(items)
        owner = {c: w for w, c in enumerate(self._conns)}
        queued = [deque() for _ in self._conns]  # per worker: sequence numbers sent, oldest first
        done: dict = {}
        sent = given = 0
        more = True
        while True:
            while more:
                w = min(range(len(queued)), key=lambda k: len(queued[k]))
                if len(queued[w]) >= self.depth:
                    break
                try:
                    item = next(items)
                except StopIteration:
                    more = False
                    break
                try:  # never blocks for long: the worker's reader thread drains its pipe while it computes
                    self._conns[w].send(item)
                except OSError:
                    raise self._died(w) from None
                queued[w].append(sent)
                sent += 1
                self._in_flight += 1
            if given == sent:
                return
            while given not in done:
                for conn in wait([self._conns[w] for w in range(len(queued)) if queued[w]]):
                    w = owner[conn]
                    try:
                        ok, value = conn.recv()
                    except (EOFError, OSError):
                        raise self._died(w) from None
                    if not ok:
                        raise value
                    done[queued[w].popleft()] = value
            self._in_flight -= 1
            yield done.pop(given)
            given += 1

    def close(self, timeout: float = 30) -> None:
        """The normal end: each worker gets the stop sentinel and exits; one that does not is killed. Left
        with tasks in flight (a caller that stopped reading early), the workers are killed at once: a worker
        would finish its task and block sending a result nobody reads."""
        if self._in_flight:
            self._in_flight = 0
            self.kill()
            return
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every worker still alive and reap it. Nothing the parent waits on is shared with them, so
        this cannot hang whatever they were doing."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def _died(self, w: int) -> RankDiedError:
        p = self._procs[w]
        p.join(5)
        code = p.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            how = f"killed by {sig}" + (" (the OOM killer sends SIGKILL: out of memory?)" if sig == "SIGKILL" else "")
        else:
            how = f"exited with code {code}"
        return RankDiedError(f"{self.name} process {p.pid} died: {how}; the run stopped",
                             hint="rerun (the job retries); if it recurs, lower data.num_proc or raise the "
                                  "pod's memory limit")


@contextmanager
def _blocked(signals: set):
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerError(RuntimeError):
    """An exception a worker raised that cannot travel back pickled: its type, message and traceback."""


def _serve(conn, siblings: list, fn: Callable, initializer: Callable | None, initargs: tuple) -> None:
    """One worker: a reader thread keeps the pipe drained (the parent's send never waits for a computation),
    the main thread computes and answers ``(True, result)`` or ``(False, exception)`` in order."""
    # The parent's SIGTERM handler (raise Interrupted) must not run here: a worker just dies, and SIGINT
    # (Ctrl-C reaches the whole process group) is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for other in siblings:  # the other workers' pipes, inherited through fork: not ours to hold open
        other.close()
    if initializer is not None:
        initializer(*initargs)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while (item := conn.recv()) is not None:
                inbox.put((True, item))
        except (EOFError, OSError):  # the parent is gone
            pass
        except BaseException as e:  # noqa: BLE001 - a task that cannot be unpickled: answered as an error
            inbox.put((False, e))
        inbox.put(None)

    threading.Thread(target=read, name="inbox", daemon=True).start()
    while (task := inbox.get()) is not None:
        ok, item = task
        try:
            answer = (True, fn(item)) if ok else (False, _portable(item))
        except BaseException as e:  # noqa: BLE001 - the parent re-raises it
            answer = (False, _portable(e))
        try:
            conn.send(answer)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as e:  # noqa: BLE001 - a result that cannot be pickled is an error of the task
            conn.send((False, _portable(e)))


def _portable(e: BaseException) -> BaseException:
    """The exception as the parent will see it: its own type when it survives pickling (our errors carry a
    message and a fix), else a WorkerError with its text; a bug's worker traceback rides along as a note."""
    if not isinstance(e, SftjobError):
        e.add_note("in the worker:\n" + "".join(traceback.format_exception(e)).rstrip())
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return WorkerError("".join(traceback.format_exception(e)).rstrip())
