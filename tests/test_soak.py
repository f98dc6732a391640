"""The randomized fault soak (bench/soak.py, issue 26) in its short mode: a seeded handful of faults — kill -9
of the whole tree, SIGTERM, kill -9 of one rank, the store frozen — at phases chosen by the seed, on a real
2-process DDP run against a real SeaweedFS, every restart on an empty disk. The harness itself checks what a
soak must prove (one _SUCCESS per run, the published files verify, every step once with the uninterrupted
run's loss, the documented exit codes, steps lost, nothing outside the outputs, no process left)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_a_short_seeded_soak_survives_every_fault_and_proves_the_run(tmp_path):
    r = subprocess.run([sys.executable, str(SOAK), "--seed", "11", "--faults", "3", "--steps", "16",
                        "--kinds", "kill_tree,sigterm,kill_rank,freeze", "--workdir", str(tmp_path / "soak")],
                       capture_output=True, text=True, timeout=1200)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and summary["passed"], (summary["problems"], r.stderr[-4000:])
    assert summary["faults_injected"] == 3 and summary["max_loss_diff"] <= 1e-4
    assert all(e["rc"] in (0, -9, 69, 71, 72, 75) for e in summary["events"])


def test_a_soak_of_store_and_checkpoint_faults_on_a_changing_process_count_proves_the_run(tmp_path):
    """The store restarted and slow, a torn upload and a tampered Trainer file under a sealed marker, and every
    restart on 1 or 2 processes (--vary-world, as Kueue re-admits elsewhere): the harness checks the same
    proofs, plus that a damaged checkpoint is skipped with a log line and never resumed from."""
    r = subprocess.run([sys.executable, str(SOAK), "--seed", "21", "--faults", "4", "--steps", "16", "--vary-world",
                        "--kinds", "restart_store,slow_store,torn,tamper", "--workdir", str(tmp_path / "soak")],
                       capture_output=True, text=True, timeout=1200)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and summary["passed"], (summary["problems"], r.stderr[-4000:])
    assert summary["faults_injected"] == 4 and summary["max_loss_diff"] <= 1e-4
    damaged = [e for e in summary["events"] if e.get("corrupted")]
    assert damaged and all(e["resumed_at"] < e["corrupted_step"] for e in damaged)
    assert {e["processes"] for e in summary["events"]} == {1, 2}


def test_the_soak_phase_reader_names_the_phase_of_a_log():
    sys.path.insert(0, str(SOAK.parent))
    import soak

    assert soak.phase_of("") == "start"
    log = 'x prepared data y\nlaunching 2 process(es)\n{"event": "progress", "step": 3}\ncheckpoint step-4 mirrored'
    assert soak.phase_of(log) == "checkpoint"
    assert soak.phase_of(log + "\nadapter verified: {}") == "verify"
    assert [p["step"] for p in soak.progress(log)] == [3]


@pytest.mark.slow
def test_a_run_writes_no_library_cache_under_home(tmp_path):
    """Found by the soak: the ranks' Arrow copy of the prepared data (datasets) and matplotlib's font cache
    went to $HOME/.cache — outside the job's cache dir, a second copy of the training data among them."""
    import trainkit

    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        env[var] = ""  # unset below: as a bare `sftjob run` (docker run, Argo, CI) has them
    r = subprocess.run(trainkit.sftjob_cmd(*trainkit.steady_args(tmp_path / "out", 2, "--eval-split", "0.1")),
                       capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in {**__import__("os").environ, **env}.items() if v != ""})
    assert r.returncode == 0, r.stderr[-3000:]
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert written == [], written[:10]
    assert list((tmp_path / "c" / "hf-datasets").rglob("*.arrow"))  # the Arrow copy is in the job's cache
