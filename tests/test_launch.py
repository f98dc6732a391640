"""Topology and generated configs: the env an Indexed Job sets → accelerate/DeepSpeed settings.

CUDA cannot exist here: GPU counts are passed in (cuda_devices=...), which is the only stand-in.
"""
import json

import pytest
import yaml

from job.errors import ConfigError
from job.specload import build
from job.train import launch


def spec(**kw):
    return build(overrides=kw, environ={})


def test_indexed_job_env_maps_to_machine_rank_and_rank0_address():
    env = {"JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "run-42-0.run-42", "MASTER_PORT": "29501"}
    t = launch.topology(spec(**{"distributed.num_machines": 2}), environ=env, cuda_devices=8, bf16_ok=True)
    assert (t.machine_rank, t.num_machines, t.per_node, t.num_processes) == (1, 2, 8, 16)
    assert (t.main_process_ip, t.main_process_port) == ("run-42-0.run-42", 29501)
    assert t.strategy == "deepspeed" and t.mixed_precision == "bf16"


def test_spec_node_rank_and_address_win_over_env():
    env = {"JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "a"}
    s = spec(**{"distributed.num_machines": 4, "distributed.node_rank": 3, "distributed.main_process_ip": "b",
                "distributed.gpus_per_node": 2})
    t = launch.topology(s, environ=env, cuda_devices=8, bf16_ok=False)
    assert (t.machine_rank, t.main_process_ip, t.num_processes, t.mixed_precision) == (3, "b", 8, "fp16")


def test_multi_node_without_rank0_address_is_a_config_error():
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launch.topology(spec(**{"distributed.num_machines": 2}), environ={}, cuda_devices=8, bf16_ok=True)


def test_node_rank_beyond_num_machines_is_a_config_error():
    with pytest.raises(ConfigError, match="node rank 2"):
        launch.topology(spec(**{"distributed.num_machines": 2}), environ={"JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "x"},
                        cuda_devices=1, bf16_ok=True)


def test_cpu_single_process_defaults_to_single_without_mixed_precision():
    t = launch.topology(spec(), environ={}, cuda_devices=0)
    assert (t.strategy, t.num_processes, t.mixed_precision) == ("single", 1, "no")


def test_cpu_two_processes_really_ask_for_two(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs ONE process; our config must not say use_cpu."""
    s = spec(**{"distributed.strategy": "ddp", "distributed.num_processes": 2})
    t = launch.topology(s, environ={}, cuda_devices=0)
    cfgs = launch.write_configs(s, t, tmp_path, hidden_size=128)
    acc = yaml.safe_load(cfgs["accelerate"].read_text())
    assert acc["num_processes"] == 2 and acc["distributed_type"] == "MULTI_GPU" and acc["use_cpu"] is False
    cmd = launch.command(t, cfgs, tmp_path / "plan.json")
    assert "--cpu" not in cmd and "accelerate.commands.launch" in cmd


def test_deepspeed_zero3_config_shards_tiny_models_and_offloads_when_asked(tmp_path):
    s = spec(**{"distributed.strategy": "deepspeed", "distributed.zero_stage": 3, "distributed.num_processes": 2,
                "distributed.offload_optimizer": True, "distributed.offload_params": True})
    t = launch.topology(s, environ={}, cuda_devices=0)
    cfgs = launch.write_configs(s, t, tmp_path, hidden_size=64)
    ds = json.loads(cfgs["deepspeed"].read_text())
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == "auto"  # filled from max_grad_norm by the trainer
    acc = yaml.safe_load(cfgs["accelerate"].read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["deepspeed_config"]["zero3_init_flag"] is True
    big = launch.deepspeed_config(s, t, hidden_size=4096)["zero_optimization"]
    assert big["stage3_param_persistence_threshold"] == "auto"


def test_fsdp_config_is_generated(tmp_path):
    s = spec(**{"distributed.strategy": "fsdp", "distributed.num_processes": 8})
    t = launch.topology(s, environ={}, cuda_devices=8, bf16_ok=True)
    acc = yaml.safe_load(launch.write_configs(s, t, tmp_path, 4096)["accelerate"].read_text())
    assert acc["distributed_type"] == "FSDP" and acc["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_qlora_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="QLoRA"):
        launch.topology(spec(**{"train.method": "qlora", "distributed.strategy": "deepspeed",
                                "distributed.zero_stage": 3, "distributed.num_processes": 2}),
                        environ={}, cuda_devices=2, bf16_ok=True)


def test_operator_style_env_is_honoured_too():
    """Kubeflow's training operator sets PET_* (torchrun) variables instead of an Indexed Job's index."""
    env = {"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456"}
    t = launch.topology(spec(**{"distributed.num_machines": 2}), environ=env, cuda_devices=4, bf16_ok=True)
    assert (t.machine_rank, t.main_process_ip, t.main_process_port, t.num_processes) == (1, "job-master-0", 23456, 8)


@pytest.mark.parametrize("on", [True, False])
def test_trainer_arguments_carry_the_spec_without_deprecated_names(tmp_path, on):
    import warnings

    from job.train import recipe

    spec = build(overrides={"train.gradient_checkpointing": on, "train.max_steps": 7, "train.learning_rate": 3e-4})
    plan = {"checkpoint_dir": str(tmp_path / "ckpt"), "mixed_precision": "no"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 renamed gradient_checkpointing
        args = recipe.training_args(spec, plan)
    assert args.activation_checkpointing is on and args.gradient_checkpointing is on
    assert (args.activation_checkpointing_kwargs == {"use_reentrant": False}) is on
    assert args.max_steps == 7 and args.learning_rate == 3e-4 and args.report_to == []
