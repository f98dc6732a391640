"""Rules that depend on the strategy or process count read the topology the run resolves, not the raw knob:
the default `distributed.strategy: auto` is DeepSpeed with more than one process, so ZeRO-3 refusals must
fire for it too (exit 64 before anything is fetched), and the plan counts offload only where DeepSpeed runs."""
from __future__ import annotations

from pathlib import Path

import pytest
from trainkit import run

from job.errors import ConfigError
from job.specload import build
from job.train import launch, lora, parent
from job.train import plan as planmod

ROOT = Path(__file__).resolve().parents[1]
TWO = [{"distributed.num_processes": 2}, {"distributed.gpus_per_node": 2}]  # CPU: 2 processes either way


def spec(**kw):
    return build(overrides=kw, environ={})


@pytest.mark.parametrize("two", TWO)
def test_residual_init_under_auto_zero3_with_two_processes_is_refused(two):
    s = spec(**{"train.init_lora_weights": "olora", "distributed.zero_stage": 3, **two})
    assert s.distributed.strategy == "auto" and launch.resolved(s).strategy == "deepspeed"
    with pytest.raises(ConfigError, match="ZeRO-3"):
        lora.check(s)
    lora.check(spec(**{"train.init_lora_weights": "olora", "distributed.zero_stage": 3}))  # 1 process: single


@pytest.mark.parametrize("two", TWO)
def test_adapter_under_auto_zero3_with_two_processes_is_refused(two):
    s = spec(**{"model.adapter": "/some/adapter", "distributed.zero_stage": 3, **two})
    with pytest.raises(ConfigError, match="ZeRO-3"):
        parent.check(s)
    parent.check(spec(**{"model.adapter": "/some/adapter", "distributed.zero_stage": 3}))
    parent.check(spec(**{"model.adapter": "/some/adapter", "distributed.zero_stage": 3,
                         "distributed.strategy": "ddp", **two}))


@pytest.mark.parametrize("flags", [["--init-lora-weights", "pissa"], ["--adapter", "/no/such/adapter"]])
def test_run_refuses_auto_zero3_with_exit_64_before_any_fetch(tmp_path, flags):
    # the model and data do not exist: a fetch would exit 66, training would say "launching"
    p = run("run", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data.jsonl"),
            "--output", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache"),
            "--zero-stage", "3", "--num-processes", "2", *flags, timeout=300)
    assert p.returncode == 64, p.stderr[-2000:]
    assert "ZeRO-3" in p.stderr and "Traceback" not in p.stderr and "launching" not in p.stderr
    assert p.stderr.count("fix:") == 1


def test_plan_counts_optimizer_offload_only_where_deepspeed_runs():
    config = str(ROOT / "examples" / "configs" / "Qwen2.5-0.5B-Instruct.json")  # a full fine-tune: GBs of state

    def state(**kw):
        p = planmod.make_plan(spec(**{"train.method": "full", "train.max_steps": 10, **kw}), model_config=config)
        return p["strategy"], p["memory_gb_per_gpu"]["trainable_state"]

    off = {"distributed.offload_optimizer": True}
    assert state(**off) == state()  # auto with 1 process is single: offload_optimizer is ignored there
    two = {"distributed.num_processes": 2}
    (strategy, offloaded), (_, kept) = state(**off, **two), state(**two)
    assert strategy == "deepspeed" and offloaded < kept
