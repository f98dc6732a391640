"""distributed.offload_optimizer needs DeepSpeed's cpu_adam op: where it cannot load, `validate` and `run`
exit 64 before any fetch, naming the knob; where it can (here: DeepSpeed JIT-compiles it with the machine's
C++ compiler), a 2-process ZeRO-2 CPU run with the optimizer offloaded trains and publishes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trainkit

from job.train import dsops

pytestmark = pytest.mark.slow

NO_COMPILER = {"CXX": "/nonexistent/c++"}  # what the runtime image (no compiler) looks like to DeepSpeed's JIT


@pytest.mark.parametrize("command", ["validate", "run"])
def test_offload_optimizer_without_a_loadable_cpu_adam_exits_64_before_any_fetch(tmp_path, command):
    out = tmp_path / "out"
    r = trainkit.run(command, "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
                     "--output", str(out), "--distributed", "deepspeed", "--num-processes", "2",
                     "--offload-optimizer", env=NO_COMPILER, timeout=300)
    assert r.returncode == 64, r.stderr[-3000:]
    assert "distributed.offload_optimizer (--offload-optimizer) needs DeepSpeed's cpu_adam op" in r.stderr
    assert "no C++ compiler (/nonexistent/c++)" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # nothing fetched, nothing written (a missing model/data would be 66)


def test_offload_is_not_probed_where_deepspeed_does_not_run():
    """One process (auto → single): DeepSpeed is not used, so its op is not required."""
    from job import specload

    s = specload.build(None, {"distributed.offload_optimizer": True, "distributed.num_processes": 1})
    dsops.check(s, environ={**os.environ, **NO_COMPILER})  # no raise


def test_offload_optimizer_trains_on_cpu_when_cpu_adam_can_be_built(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    out = tmp_path / "out"
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(out), "--distributed", "deepspeed", "--zero-stage", "2", "--num-processes", "2",
                     "--offload-optimizer", "--packing", "--per-device-train-batch-size", "1", "--max-steps", "3",
                     "--logging-steps", "1", "--max-length", "256", timeout=900)
    if not compiler:  # no compiler on this machine: the refusal is the behaviour (tested above as well)
        assert r.returncode == 64 and "cpu_adam" in r.stderr, r.stderr[-3000:]
        return
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (out / "_SUCCESS").exists()
    ds = json.loads((out / "launch" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # the ranks built (or found) the op: accelerate swaps in DeepSpeedCPUAdam, which exits 1 without it
    assert list((Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "cpu_adam").glob("*.so"))
    # the packed CPU run reports its attention path (sdpa, dense mask) and its version
    status = json.loads((out / "status.json").read_text())
    assert status["fast_path"] == {"attention": "sdpa, packed rows: dense block-diagonal mask", "use_liger_kernel": False}
    from job import version

    assert status["version"] == version()
    assert json.loads((out / "manifest.json").read_text())["versions"]["sftjob"] == version()
