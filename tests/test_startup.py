"""Start-up pays only for what a command uses (issue 25): `--help` and `validate` never import torch, a
launcher on a host without a GPU driver spawns its ranks without importing torch (1.3 s it paid before),
and a single-process LoRA run imports neither DeepSpeed nor MLflow in any process.

Timings are in bench/startup.py; these tests assert which modules load, which is what decides them."""
import json
import subprocess
import sys

import pytest
import trainkit

HEAVY = ("torch", "transformers", "deepspeed", "mlflow", "peft", "trl", "matplotlib")


def _loaded(code: str) -> dict:
    """Run code in a fresh interpreter; which HEAVY modules it left imported."""
    probe = code + f"\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    loaded = _loaded("from job.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not any(loaded.values()), loaded


def test_validate_imports_the_tokenizer_library_only():
    loaded = _loaded(f"from job.cli import main\nassert main(['validate', '--data', {str(trainkit.chat_data())!r}, "
                     f"'--tokenizer', {str(trainkit.tiny_model())!r}]) == 0")
    assert loaded["transformers"]  # the tokenizer: what validate measures tokens with
    assert not any(loaded[m] for m in ("torch", "deepspeed", "mlflow", "peft", "trl", "matplotlib")), loaded


def test_the_launcher_resolves_its_topology_and_kernels_without_torch_on_a_host_without_a_gpu_driver():
    from job.train import host

    if not host.no_gpu_driver():
        pytest.skip("this host has a GPU driver: torch is how the launcher counts the GPUs")
    loaded = _loaded("from job.specload import build\nfrom job.train import fastpath, launch\n"
                     "s = build(overrides={'train.method': 'lora'}, environ={})\n"
                     "t = launch.topology(s)\nassert not t.cuda and t.strategy == 'single'\n"
                     "assert fastpath.resolve(s, t.cuda)['attention']['implementation'] == 'sdpa'")
    assert not loaded["torch"], loaded


@pytest.mark.slow
def test_a_single_process_lora_run_imports_neither_deepspeed_nor_mlflow_in_any_process(tmp_path):
    """PYTHONPROFILEIMPORTTIME reaches every interpreter of the run (entrypoint, rank, verify): one line per
    module imported anywhere."""
    r = trainkit.run(*trainkit.steady_args(tmp_path / "out", 1),
                     env={"PYTHONPROFILEIMPORTTIME": "1", "SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-3000:]
    top = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "trl" in top and "torch" in top  # the probe sees the rank's imports
    assert "deepspeed" not in top and "mlflow" not in top, sorted(m for m in top if m in ("deepspeed", "mlflow"))
    assert (tmp_path / "out" / "_SUCCESS").exists()
