"""DeepSpeed's just-in-time ops (job/train/jitops.py): built once by the launcher, in the job's directory, and a
build lock left by a killed build never hangs a later run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import trainkit

from job.specload import build
from job.train import jitops


def test_the_extensions_directory_is_the_jobs(tmp_path):
    spec = build(overrides={"cache_dir": str(tmp_path / "cache")}, environ={})
    ext = jitops.extensions_dir(spec, environ={})
    assert ext.is_relative_to(tmp_path / "cache" / "torch_extensions") and "torch" in ext.name
    assert jitops.extensions_dir(spec, environ={"TORCH_EXTENSIONS_DIR": "/x/y"}) == Path("/x/y")
    assert jitops.jit_ops("deepspeed", cuda=False) == ["ShareMemCommBuilder"]
    assert jitops.jit_ops("deepspeed", cuda=True) == [] and jitops.jit_ops("ddp", cuda=False) == []
    assert jitops.jit_ops("deepspeed", cuda=False, offload_optimizer=True) == ["ShareMemCommBuilder", "CPUAdamBuilder"]
    assert jitops.jit_ops("deepspeed", cuda=True, offload_optimizer=True) == []  # prebuilt in the image


def test_a_stale_build_lock_is_cleared_and_nothing_else(tmp_path):
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").write_text("")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_text("built")
    assert jitops.clear_stale_locks(tmp_path) == [tmp_path / "deepspeed_shm_comm" / "lock"]
    assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
    assert jitops.clear_stale_locks(tmp_path) == []


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_deepspeed_run(tmp_path):
    """Was: every later 2-process run waited in torch's file_baton.wait (no log line) until the stall
    watchdog's 3 x 1800 s. The lock is the one torch's FileBaton leaves when its build is killed."""
    ext = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # the session's (tests/conftest.py), built or not
    (ext / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    (ext / "deepspeed_shm_comm" / "lock").write_text("")
    out = tmp_path / "out"
    r = trainkit.run(*trainkit.steady_args(out, 2), "--distributed", "deepspeed", "--num-processes", "2", timeout=420)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "removed a stale build lock" in log and (out / "_SUCCESS").exists()
    assert not (ext / "deepspeed_shm_comm" / "lock").exists()
    assert list((ext / "deepspeed_shm_comm").glob("*.so"))
