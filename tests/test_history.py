"""A retried run publishes its whole history (issue 26): a retry is a new pod with an empty disk, so the
metrics history up to a checkpoint travels in the checkpoint (sealed by COMPLETE) and comes back with it.

Three real runs in all: an uninterrupted reference, one SIGTERMed at step ~3, and its rerun on a new disk.
The garbage-history test reuses the interrupted run's real checkpoint and goes through the launcher's
own resume steps (find_and_fetch, then restore_history) without training again.
"""
import json
import logging
import shutil

import pytest
import test_trackers
import trainkit

from job import checkpoints, history
from job.errors import ExitCode

pytestmark = pytest.mark.slow
STEPS = 20
EVAL = ["--eval-split", "0.1", "--eval-steps", "4"]  # eval_loss lines are history too
TB = ["--report-to", "tensorboard"]  # its event files are history too (they do not change the losses)


def _steps(metrics, field: str) -> list[int]:
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if f'"{field}"' in x]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = trainkit.run(*trainkit.steady_args(d / "out", STEPS, *EVAL), env={"SFTJOB_CACHE_DIR": str(d / "c")})
    assert r.returncode == 0, r.stderr[-3000:]
    return trainkit.losses(r.stdout.splitlines())


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """SIGTERM at step ~3 → exit 75; a pristine copy of the output is kept for the garbage test."""
    d = tmp_path_factory.mktemp("stopped")
    out, log = d / "out", d / "first.log"
    proc = trainkit.start(*trainkit.steady_args(out, STEPS, *EVAL, *TB), env={"SFTJOB_CACHE_DIR": str(d / "c")}, log=log)
    assert trainkit.interrupt_at(log, proc, 3) == ExitCode.INTERRUPTED, log.read_text()[-3000:]
    step = json.loads((out / "status.json").read_text())["step"]
    assert 3 <= step < STEPS, f"the run reached step {step} before the SIGTERM landed"
    shutil.copytree(out, d / "pristine")
    return {"out": out, "pristine": d / "pristine", "step": step, "dir": d}


def test_a_retry_on_a_new_pod_publishes_every_step_once(interrupted, reference, tmp_path):
    out, stopped = interrupted["out"], interrupted["step"]
    marker = json.loads((out / "checkpoints" / f"step-{stopped}" / "COMPLETE").read_text())
    rerun = trainkit.run(*trainkit.steady_args(out, STEPS, *EVAL, *TB),
                         env={"SFTJOB_CACHE_DIR": str(tmp_path / "new-pod")})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from complete checkpoint step-{stopped}" in rerun.stdout + rerun.stderr
    # TensorBoard too: the first pod's event files came back with the checkpoint, every step once
    events = sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
    tb_steps = sorted(ev.step for e in events for ev in test_trackers._events(e)
                      for v in ev.summary.value if v.tag == "train/loss")
    # the first pod's steps come back (was: steps stopped+1..20 only); the checkpoint's own step may be missing
    # when TensorBoard's writer had not flushed it at the save (seen once in CI): open, issue 26
    assert set(range(1, stopped)) <= set(tb_steps) and set(range(stopped + 1, STEPS + 1)) <= set(tb_steps), tb_steps
    assert len(tb_steps) == len(set(tb_steps)), tb_steps  # none twice
    assert any(f["path"].startswith(history.TENSORBOARD_DIR + "/") for f in marker["files"])
    assert _steps(out / "metrics.jsonl", "loss") == list(range(1, STEPS + 1))  # was: steps stopped+1..20 only
    assert _steps(out / "metrics.jsonl", "eval_loss") == [4, 8, 12, 16, 20]
    published = trainkit.losses((out / "metrics.jsonl").read_text().splitlines())
    for step, loss in published.items():
        assert loss == pytest.approx(reference[step], abs=1e-4), step
    assert (out / "loss.png").stat().st_size > 0
    # status events come back from the output's status.json: the first attempt's stop is still there
    status = json.loads((out / "status.json").read_text())
    assert status["attempt"] == 2 and status["resumed_from"] == stopped
    assert "interrupted" in [e["type"] for e in status["events"]]
    assert "sftjob_metrics.jsonl" in {f["path"] for f in marker["files"]}  # sealed like the trainer's files


def test_a_garbage_history_in_a_checkpoint_shortens_the_history_and_the_resume_goes_on(interrupted, tmp_path, caplog):
    """A history read back from the store is untrusted: a hostile writer can seal anything in COMPLETE."""
    out, stopped = tmp_path / "out", interrupted["step"]
    shutil.copytree(interrupted["pristine"], out)
    ckpt = out / "checkpoints" / f"step-{stopped}"
    good = [x for x in (ckpt / history.HISTORY_FILE).read_text().splitlines() if '"loss"' in x]
    assert len(good) == stopped
    garbage = [good[0], "not json", "[1, 2]", '{"step": "2", "loss": 1.0}', '{"step": 2, "loss": "x"}',
               "[" * 100_000 + "]" * 100_000, '{"step": 999, "loss": 0.5}', '{"step": true, "loss": 0.5}',
               '{"loss": 0.5}', "\udcff\x00", good[1], good[1], good[2][:17]]
    (ckpt / history.HISTORY_FILE).write_text("\n".join(garbage), errors="surrogateescape")
    marker = json.loads((ckpt / "COMPLETE").read_text())
    for f in marker["files"]:
        if f["path"] == history.HISTORY_FILE:
            f["size"], f["sha256"] = (ckpt / f["path"]).stat().st_size, checkpoints.sha256_file(ckpt / f["path"])
    (ckpt / "COMPLETE").write_text(json.dumps(marker))

    workdir = tmp_path / "new-pod"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 19, "loss": 0.1}\n')  # a later step on this disk: dropped
    with caplog.at_level(logging.INFO, "sftjob.checkpoints"):
        found = checkpoints.find_and_fetch(str(out), workdir / "checkpoints")
        assert found is not None and found.step == stopped
        history.restore_history(found, workdir / "metrics.jsonl")
    restored = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in restored] == [1, 2]  # what was usable, each step once
    assert restored == [json.loads(good[0]), json.loads(good[1])]
    assert f"checkpoint step-{stopped}: 10 line(s) of its metrics history" in caplog.text


def test_carried_tensorboard_files_come_back_only_onto_an_empty_disk_and_only_as_regular_event_files(tmp_path):
    """Read back from the store: a link (to anywhere) or a file that is no event file is never copied; a disk
    that has its own event files (the same pod resumed) keeps them untouched."""
    ckpt = tmp_path / "ckpt"
    carried = ckpt / history.TENSORBOARD_DIR
    (carried / "run").mkdir(parents=True)
    (carried / "run" / "events.out.tfevents.1.pod0").write_bytes(b"first pod")
    (carried / "notes.txt").write_text("not an event file")
    secret = tmp_path / "secret"
    secret.write_text("node file")
    (carried / "events.out.tfevents.2.link").symlink_to(secret)
    (carried / "linked").symlink_to(tmp_path, target_is_directory=True)
    found = checkpoints.Found(step=3, path=ckpt)

    tb = tmp_path / "new-pod" / "tensorboard"
    history.restore_tensorboard(found, tb)
    assert sorted(str(p.relative_to(tb)) for p in tb.rglob("*") if p.is_file()) == ["run/events.out.tfevents.1.pod0"]
    assert (tb / "run" / "events.out.tfevents.1.pod0").read_bytes() == b"first pod"

    same = tmp_path / "same-pod" / "tensorboard"
    same.mkdir(parents=True)
    (same / "events.out.tfevents.9.pod1").write_bytes(b"this pod, later steps")
    history.restore_tensorboard(found, same)
    assert [p.name for p in same.rglob("*")] == ["events.out.tfevents.9.pod1"]

    # carrying back into a checkpoint: the event files only, in their folders
    fresh = tmp_path / "ckpt2"
    fresh.mkdir()
    (tb / "stray.txt").write_text("x")
    history.carry_tensorboard(tb, fresh)
    assert sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file()) == [
        f"{history.TENSORBOARD_DIR}/run/events.out.tfevents.1.pod0"]
