"""Turn a RunSpec into processes: topology from spec + Kubernetes env, generated accelerate/DeepSpeed
configs, and the spawn of the training ranks — with the SIGTERM story owned here, not by the launcher.

`accelerate launch` exits 1 with a traceback when it is signalled, whatever the ranks did, and SIGKILLs
ranks 30 s after forwarding SIGTERM; so we set TORCH_ELASTIC_SHUTDOWN_TIMEOUT from the grace period and
read the outcome from the marker rank 0 writes (stopped.json).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from job import redact
from job.errors import ConfigError
from job.loader import mixed_precision
from job.train import host, jitops, watchdog

log = logging.getLogger("sftjob.launch")


@dataclass
class Topology:
    strategy: str  # single | ddp | deepspeed | fsdp
    num_processes: int  # total, all nodes
    per_node: int
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    mixed_precision: str  # bf16 | fp16 | no
    cuda: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_rank(spec, environ: dict[str, str] | None = None) -> int:
    """This node's rank: the spec, else the Indexed Job's JOB_COMPLETION_INDEX, else what an operator sets
    (Kubeflow's PET_NODE_RANK, torchrun-style NODE_RANK), else 0."""
    env = os.environ if environ is None else environ
    if spec.distributed.node_rank is not None:
        return spec.distributed.node_rank
    return int(env.get("JOB_COMPLETION_INDEX") or env.get("PET_NODE_RANK") or env.get("NODE_RANK") or 0)


def _env_count(env: dict, name: str, cuda_devices: int) -> int | None:
    """A node or process count from an operator's env (Kubeflow Trainer's torch runtime sets PET_NNODES and
    PET_NPROC_PER_NODE): an integer, a fixed torchrun range "N:N", or auto/gpu/cpu for the process count."""
    raw = str(env.get(name) or "").strip()
    if not raw:
        return None
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    lo, sep, hi = raw.partition(":")
    if sep and lo.isdigit() and lo == hi and int(lo) > 0:
        return int(lo)
    if name == "PET_NPROC_PER_NODE" and raw in ("auto", "gpu", "cpu"):
        return max(cuda_devices, 1) if raw != "cpu" else 1
    raise ConfigError(f"{name}={raw!r} is not a fixed positive count",
                      hint="elastic ranges are not supported: set a fixed numNodes / numProcPerNode in the TrainJob")


def topology(spec, environ: dict[str, str] | None = None, cuda_devices: int | None = None,
             bf16_ok: bool | None = None) -> Topology:
    """Processes and rendezvous from the spec, then the env an Indexed Job / operator sets."""
    env = os.environ if environ is None else environ
    d = spec.distributed
    if cuda_devices is None:
        cuda_devices, bf16_ok = host.visible_gpus()
    # the spec wins where it was set; else what Kubeflow Trainer's torch runtime injects; else defaults
    machines = (d.num_machines if "num_machines" in d.model_fields_set else None) \
        or _env_count(env, "PET_NNODES", cuda_devices) or d.num_machines
    per_node = d.gpus_per_node or (d.num_processes // machines if d.num_processes else None) \
        or _env_count(env, "PET_NPROC_PER_NODE", cuda_devices) or max(cuda_devices, 1)
    total = d.num_processes or per_node * machines
    if total % machines:
        raise ConfigError(f"num_processes={total} is not a multiple of num_machines={machines}",
                          hint="set gpus_per_node instead, or a num_processes divisible by the node count")
    per_node = total // machines
    strategy = d.strategy
    if strategy == "auto":
        strategy = "deepspeed" if total > 1 else "single"
    if strategy == "single" and total > 1:
        raise ConfigError("distributed=single with more than one process", hint="use ddp, deepspeed or fsdp")
    if spec.train.method == "qlora" and strategy == "deepspeed" and d.zero_stage == 3:
        raise ConfigError("QLoRA with DeepSpeed ZeRO-3 is not supported here", hint="use zero_stage: 2 or ddp")
    rank = node_rank(spec, env)
    if rank >= machines:
        raise ConfigError(f"node rank {rank} >= num_machines {machines}",
                          hint="set num_machines to the number of pods (the chart sets SFTJOB_NUM_MACHINES)")
    ip = d.main_process_ip or env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR")
    if machines > 1 and not ip:
        raise ConfigError("multi-node run without a rank-0 address",
                          hint="set MASTER_ADDR (the chart sets <release>-0.<headless service>) or main_process_ip")
    ip = ip or "127.0.0.1"
    port = d.main_process_port or int(env.get("MASTER_PORT") or env.get("PET_MASTER_PORT") or 0) or (29500 if machines > 1 else _free_port())
    mp = mixed_precision(d.mixed_precision, cuda_devices > 0, bool(bf16_ok))
    return Topology(strategy, total, per_node, machines, rank, ip, port, mp, cuda_devices > 0)


def resolved(spec, environ: dict[str, str] | None = None) -> Topology:
    """The topology a check before fetch must read: the default strategy `auto` is DeepSpeed with more than
    one process, so a rule on distributed.strategy itself misses it. validate/plan run off-cluster, where no
    rank-0 address exists yet: a stand-in, as only the strategy, counts and precision matter here."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("MASTER_ADDR", "rank-0.planned")
    return topology(spec, environ=env)


def zero3(spec, environ: dict[str, str] | None = None) -> bool:
    """ZeRO-3 as the run resolves it: zero_stage 3 means something only where the strategy is DeepSpeed."""
    return spec.distributed.zero_stage == 3 and resolved(spec, environ).strategy == "deepspeed"


def deepspeed_config(spec, topo: Topology, hidden_size: int | None = None) -> dict:
    d = spec.distributed
    zero: dict = {"stage": d.zero_stage, "overlap_comm": topo.cuda, "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": topo.cuda}
    if d.zero_stage == 3:
        # Tiny models keep every param "persistent" under the default threshold; 0 really shards them.
        small = hidden_size is not None and hidden_size < 1024
        zero.update({"stage3_param_persistence_threshold": 0 if small else "auto",
                     "stage3_prefetch_bucket_size": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": topo.cuda}
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def accelerate_config(spec, topo: Topology, ds_path: Path | None) -> dict:
    base = {
        "compute_environment": "LOCAL_MACHINE", "num_processes": topo.num_processes,
        "num_machines": topo.num_machines, "machine_rank": topo.machine_rank,
        "main_process_ip": topo.main_process_ip, "main_process_port": topo.main_process_port,
        "mixed_precision": topo.mixed_precision, "rdzv_backend": "static", "same_network": True,
        "main_training_function": "main", "downcast_bf16": "no", "use_cpu": False,
    }
    if topo.strategy == "deepspeed":
        base["distributed_type"] = "DEEPSPEED"
        base["deepspeed_config"] = {"deepspeed_config_file": str(ds_path),
                                    "zero3_init_flag": spec.distributed.zero_stage == 3}
        base.pop("mixed_precision")  # comes from the DeepSpeed file ("auto" ← TrainingArguments)
    elif topo.strategy == "fsdp":
        base["distributed_type"] = "FSDP"
        base["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": spec.distributed.offload_params, "fsdp_reshard_after_forward": True,
        }
    else:
        base["distributed_type"] = "MULTI_GPU"
    return base


def write_configs(spec, topo: Topology, workdir: Path, hidden_size: int | None) -> dict:
    """Generated launch configs, kept beside the run's outputs for reproducibility."""
    cfg_dir = workdir / "launch"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    out = {"topology": cfg_dir / "topology.json"}
    out["topology"].write_text(json.dumps(asdict(topo), indent=1))
    ds_path = None
    if topo.strategy == "deepspeed":
        ds_path = cfg_dir / "deepspeed.json"
        ds_path.write_text(json.dumps(deepspeed_config(spec, topo, hidden_size), indent=1))
        out["deepspeed"] = ds_path
    if topo.strategy != "single":
        out["accelerate"] = cfg_dir / "accelerate.yaml"
        out["accelerate"].write_text(yaml.safe_dump(accelerate_config(spec, topo, ds_path), sort_keys=False))
    return out


def nccl_env() -> dict[str, str | None]:
    """NCCL notices a dead peer or a hung collective without waiting for ddp_timeout (unless the user said otherwise)."""
    want = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "300"}
    return {k: v for k, v in want.items() if k not in os.environ}


def command(topo: Topology, configs: dict, plan_path: Path) -> list[str]:
    if topo.strategy == "single":
        return [sys.executable, "-m", "job.train.sft", str(plan_path)]
    # under job.logsetup: the launcher's own library notices follow --debug like the ranks' (README "Logs")
    return [sys.executable, "-m", "job.logsetup", "accelerate.commands.launch",
            "--config_file", str(configs["accelerate"]), "--module", "job.train.sft", str(plan_path)]


def spawn(cmd: list[str], *, grace_seconds: int, env: dict | None = None, watch=None) -> tuple[int, bool]:
    """Run the ranks; on SIGTERM forward it and wait up to the grace period. → (returncode, signalled).

    The launcher dies with us (PR_SET_PDEATHSIG), and so do the ranks (they set it themselves);
    `watch` (watchdog.Watch) ends the tree when a rank dies or stalls."""
    child_env = {**os.environ, **(env or {}), **(watch.env() if watch else {})}
    child_env = {k: v for k, v in child_env.items() if v is not None}
    child_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(grace_seconds - 5, 5))
    proc = subprocess.Popen(cmd, env=child_env, start_new_session=True, preexec_fn=watchdog.child_of(os.getpid()),
                            stderr=subprocess.PIPE if watch else None)
    if watch:
        watch.attach(proc)
    signalled = {"at": None}

    def forward(signum, frame):
        if signalled["at"] is None:
            signalled["at"] = time.time()
            log.warning("SIGTERM: asking the training processes to checkpoint and stop (grace %ss)", grace_seconds)
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if watch:
                    watch.tick(signalled["at"] is not None)
                if signalled["at"] and time.time() - signalled["at"] > grace_seconds - 3:
                    log.error("ranks did not stop within the grace period; killing them")
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        signal.signal(signal.SIGTERM, old)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # no orphaned ranks, whatever happened
        except (ProcessLookupError, PermissionError):
            pass
        if watch:
            watch.kill()
    return rc, signalled["at"] is not None


@dataclass
class Outcome:
    adapter_dir: str
    step: int
    stopped: str | None  # None | sigterm | deadline
    mirrored: bool
    resumed_from: int | None
    node_rank: int
    final_metrics: dict


def _fast_path(spec, cuda: bool) -> dict:
    """Attention kernel / packed-row masking and Liger (job/train/fastpath.py), logged with any fallback."""
    from job.train import fastpath

    fp = fastpath.resolve(spec, cuda)
    log.info("attention: %s", fp["attention_summary"])
    if fp["liger_note"]:
        log.warning("%s", fp["liger_note"])
    return fp


def check_bitsandbytes(spec) -> None:
    """QLoRA and the 8-bit/paged optimizers need CUDA and bitsandbytes (requirements-cuda13.lock, in the
    image; left out of the CPU venv): say so before any process starts, not as an ImportError per rank."""
    needs = ("method: qlora" if spec.train.method == "qlora" else
             f"optim: {spec.train.optim}" if re.search(r"8bit|bnb|paged", spec.train.optim) else None)
    if needs is None:
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{needs} needs a CUDA GPU (bitsandbytes); none is visible",
                          hint="use method: lora / optim: adamw_torch on CPU, or run on a GPU node")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{needs} needs bitsandbytes, which is not installed",
                          hint="use the sftjob image, or pip install -r requirements-cuda13.lock")


def train(spec, prepared, model_dir: str, workdir: Path, status, *, started: float, fresh: bool = False,
          adapter_path: str | None = None, run_identity: dict | None = None) -> Outcome:
    """Resume from the newest complete checkpoint (when it was made by this run: job/identity.py), spawn
    the ranks, read back what they did."""
    from job import checkpoints, ckptcontent, history, identity

    check_bitsandbytes(spec)  # also for callers that skip the pipeline's early check
    topo = topology(spec)
    hidden = None
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file():
        hidden = json.loads(cfg.read_text()).get("hidden_size")
    configs = write_configs(spec, topo, workdir, hidden)
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    found = checkpoints.find_and_fetch(spec.output.uri, ckpt_dir, check=ckptcontent.problem) if spec.resilience.resume and not fresh else None
    if found and run_identity is not None:
        where = f"checkpoint {checkpoints.remote_prefix(spec.output.uri, found.step)}"
        lines = identity.check(found.identity, run_identity, found.step, where)
        if lines and identity.start_over(spec, spec.output.uri, lines, found.step, where, node_rank=topo.machine_rank):
            found = None
    for old in ckpt_dir.glob("checkpoint-*"):
        if not found or old != found.path:
            shutil.rmtree(old, ignore_errors=True)
    adapter_dir = workdir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    (workdir / "stopped.json").unlink(missing_ok=True)
    if found:  # the history up to the checkpoint comes with it: a retry's new pod has no earlier metrics.jsonl
        history.restore_history(found, workdir / "metrics.jsonl")
        history.restore_tensorboard(found, workdir / "tensorboard")
    else:
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
    if not found:  # a fresh start publishes only its own TensorBoard events
        shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
    if found:
        status.update(resumed_from=found.step, step=found.step, event=("resume", f"resuming from checkpoint step-{found.step}"))
    from job.train import reshard

    resume = reshard.plan_resume(found.path if found else None, spec, topo)  # may change the batch split
    (workdir / reshard.REFUSED_FILE).unlink(missing_ok=True)
    spec = resume.spec
    if resume.message:
        log.warning("%s", resume.message)
        status.update(event=("world_size", resume.message))
    deadline = started + spec.resilience.max_runtime if spec.resilience.max_runtime else None
    fast = _fast_path(spec, topo.cuda)
    plan = {
        "spec": spec.public_dict(), "workdir": str(workdir), "model_dir": str(model_dir),
        "train_path": str(prepared.train_path), "eval_path": str(prepared.eval_path) if prepared.eval_path else None,
        "chat_template_path": str(prepared.dir / "chat_template.jinja"), "checkpoint_dir": str(ckpt_dir),
        "adapter_dir": str(adapter_dir), "output_uri": spec.output.uri.rstrip("/"),
        "resume_from": str(found.path) if found else None, "adapter_path": adapter_path, "grace_seconds": spec.resilience.grace_seconds,
        "deadline": deadline, "save_minutes": spec.resilience.save_minutes, "node_rank": topo.machine_rank,
        "num_machines": topo.num_machines, "mixed_precision": topo.mixed_precision,
        "attn_implementation": fast["attention"]["implementation"], "fast_path": fast,
        "deepspeed_config": str(configs["deepspeed"]) if "deepspeed" in configs else None,
        "world": resume.record, "resume_mode": resume.mode, "identity": run_identity,
    }
    plan_path = workdir / "launch" / "plan.json"
    public = redact.data(plan)  # published with the run (launch/): no credentials
    plan_path.write_text(json.dumps(public, indent=1))
    cmd = command(topo, configs, plan_path)
    log.info("launching %d process(es) on node %d/%d (%s): %s", topo.per_node, topo.machine_rank,
             topo.num_machines, topo.strategy, " ".join(cmd[1:]))
    status.phase("training", f"{topo.num_processes} process(es) on {topo.num_machines} node(s), {topo.strategy}"
                 + (f", resuming from step {found.step}" if found else ""),
                 fast_path={"attention": fast["attention_summary"], "use_liger_kernel": fast["use_liger_kernel"]})
    # CPU ranks share the cores: one all-core thread pool per rank would oversubscribe them
    threads = None if topo.cuda or "OMP_NUM_THREADS" in os.environ else str(max(1, (os.cpu_count() or 1) // topo.per_node))
    env = {"OMP_NUM_THREADS": threads, **(nccl_env() if topo.cuda else {}),
           **jitops.build_ops(spec, topo.strategy, topo.cuda)}  # JIT ops built once, here, logged
    if public["spec"]["storage"] != plan["spec"]["storage"]:  # the ranks need the endpoint plan.json masks
        env["SFTJOB_RANK_STORAGE"] = json.dumps(plan["spec"]["storage"])
    stall = spec.resilience.stall_seconds
    watch = watchdog.Watch(workdir, node=topo.machine_rank,
                           stall_seconds=watchdog.default_stall_seconds(topo.cuda) if stall is None else stall)
    host.warm_imports()
    rc, signalled = spawn(cmd, grace_seconds=spec.resilience.grace_seconds, env=env, watch=watch)
    stopped_file = workdir / "stopped.json"
    stopped = json.loads(stopped_file.read_text()) if stopped_file.exists() else {}
    metrics = _last_metrics(workdir / "metrics.jsonl")
    if signalled or stopped.get("reason") == "sigterm":
        return Outcome(str(adapter_dir), stopped.get("step", metrics.get("step", 0)), "sigterm",
                       bool(stopped.get("mirrored")), found.step if found else None, topo.machine_rank, metrics)
    if rc != 0 or watch.verdict is not None:
        if watch.verdict is None:
            reshard.raise_if_refused(workdir)  # the ranks found the checkpoint unusable: exit 70, not a crash
        err = watch.failure(rc, launcher_is_rank=topo.strategy == "single")
        status.update(**err.details)
        raise err
    return Outcome(str(adapter_dir), metrics.get("step", 0), stopped.get("reason"), bool(stopped.get("mirrored", True)),
                   found.step if found else None, topo.machine_rank, metrics)


def _last_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = [r for r in recs if r.get("loss") is not None]
    return train[-1] if train else {}
