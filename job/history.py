"""The run's metrics history travels inside its checkpoints (issue 26): a retry is a new pod with an empty
disk, so the history up to a checkpoint is saved in it (covered by its COMPLETE marker) and restored from
the checkpoint the launcher resumes from. Read back as untrusted: line by line, nothing past the step.
TensorBoard's event files (`--report-to tensorboard`) travel the same way, as files: copied back only onto
a disk that has none, only regular event files, each confined to the work directory's tensorboard/."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("sftjob.checkpoints")


#: the run's metrics.jsonl up to the checkpoint's step, inside the checkpoint (covered by COMPLETE)
HISTORY_FILE = "sftjob_metrics.jsonl"
#: the TensorBoard event files so far (TensorBoardCallback flushes at every log), inside the checkpoint
TENSORBOARD_DIR = "sftjob_tensorboard"
EVENT_PREFIX = "events.out.tfevents."


def carry_history(metrics: Path, ckpt: Path) -> None:
    """Rank 0 at every save, before the mirror lists the files: a retry is a new pod whose disk has none
    of the history, so it travels with the checkpoint. Every line so far is at most this step (logged
    before the save; a resume trims what it restores), so a plain copy is the history up to the step."""
    if not Path(ckpt).is_dir():
        return
    dest = Path(ckpt) / HISTORY_FILE
    if Path(metrics).is_file():
        shutil.copyfile(metrics, dest)
    else:  # nothing logged yet: an empty history, not a missing one
        dest.write_bytes(b"")


def _history_key(rec) -> tuple[int, int] | None:
    """(step, 0 train | 1 eval) of a line this job writes; None for anything else."""
    number = lambda v: type(v) in (int, float)  # noqa: E731 - bool is no loss
    if not isinstance(rec, dict) or type(rec.get("step")) is not int or rec["step"] < 0:
        return None
    if number(rec.get("loss")):
        return rec["step"], 0
    if "loss" not in rec and number(rec.get("eval_loss")):
        return rec["step"], 1
    return None


def _read_history(path: Path, upto: int) -> tuple[dict, int, int]:
    """(key → record, lines not what this job writes, lines after `upto`); a later line for a key wins."""
    records, bad, later = {}, 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                key = _history_key(rec := json.loads(line))
            except (ValueError, RecursionError):
                key = None
            if key is None:
                bad += 1
            elif key[0] > upto:
                later += 1
            else:
                records[key] = rec
    return records, bad, later


def restore_history(found, metrics: Path) -> None:
    """On resume: metrics.jsonl becomes the checkpoint's history, each line checked (it was read back from
    the store: a torn or hostile line is skipped, never fatal), plus what this disk has for steps it lacks
    (a checkpoint from an older job); nothing after the checkpoint's step, which is trained and logged again."""
    metrics = Path(metrics)
    carried: dict = {}
    try:
        carried, bad, later = _read_history(found.path / HISTORY_FILE, found.step)
    except FileNotFoundError:
        log.warning("checkpoint step-%d carries no metrics history (made by an older sftjob); metrics.jsonl "
                    "and loss.png keep only what this node logged", found.step)
    except OSError as e:
        log.warning("checkpoint step-%d: its metrics history cannot be read (%s); skipped", found.step, e)
    else:
        if bad or later:
            log.warning("checkpoint step-%d: %d line(s) of its metrics history are not what this job writes; "
                        "skipped (metrics.jsonl and loss.png miss them)", found.step, bad + later)
    local: dict = {}
    if metrics.is_file():
        local, _, dropped = _read_history(metrics, found.step)
        if dropped:
            log.info("metrics.jsonl: %d line(s) after step %d dropped (those steps are trained again)",
                     dropped, found.step)
    merged = {**local, **carried}
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(json.dumps(merged[k]) + "\n" for k in sorted(merged)))
    tmp.replace(metrics)
    log.info("metrics history restored from checkpoint step-%d: %d line(s)", found.step, len(merged))


def carry_tensorboard(tensorboard: Path, ckpt: Path) -> None:
    """Rank 0 at every save, beside carry_history: the event files written so far go into the checkpoint."""
    tensorboard, ckpt = Path(tensorboard), Path(ckpt)
    if not ckpt.is_dir() or not tensorboard.is_dir():
        return
    for src in _event_files(tensorboard):
        dest = ckpt / TENSORBOARD_DIR / src.relative_to(tensorboard)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def restore_tensorboard(found, tensorboard: Path) -> None:
    """On resume onto a disk without event files (a new pod): the checkpoint's come back. A disk that has its
    own (the same pod) keeps them: they already hold at least what the checkpoint carried."""
    from job.errors import DataError
    from job.storage.paths import local_child

    tensorboard, carried = Path(tensorboard), found.path / TENSORBOARD_DIR
    if not carried.is_dir() or (tensorboard.is_dir() and _event_files(tensorboard)):
        return
    restored = 0
    for src in _event_files(carried):
        try:
            dest = local_child(tensorboard, src.relative_to(carried).as_posix(), f"checkpoint step-{found.step}")
        except DataError as e:
            log.warning("tensorboard: %s; that file is skipped", e)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        restored += 1
    if restored:
        log.info("tensorboard: %d event file(s) restored from checkpoint step-%d", restored, found.step)


def _event_files(root: Path) -> list[Path]:
    """Regular event files under `root`, none through a link (what is read back from the store is not trusted)."""
    def linked(p: Path) -> bool:  # the file, or a folder between root and it (relative parents end with ".")
        return p.is_symlink() or any((root / q).is_symlink() for q in list(p.relative_to(root).parents)[:-1])

    return sorted(p for p in root.rglob(EVENT_PREFIX + "*") if p.is_file() and not linked(p))
