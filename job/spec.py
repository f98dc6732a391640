"""RunSpec: the one definition of every knob.

YAML file < env (``SFTJOB_<NAME>``) < CLI flags (``--kebab-name``) — all generated from these
models. Flags are named after the field; a section prefixes a flag only when the bare name clashes.
A section with a *primary* field also accepts a plain string (``data: s3://b/train.jsonl``) and a
flag named after the section (``--data``, ``--output``, ``--distributed``). Loading the layers, the
env naming and the schema output live in job/specload.py.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from job.errors import ConfigError


class Section(BaseModel):
    # no knob means infinity or NaN (`--learning-rate inf` and `--max-runtime inf` were accepted; a weight of inf crashed prepare)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    primary: ClassVar[str | None] = None  # field a bare string (and the section-named flag) sets

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if cls.primary and isinstance(v, (str, list)):
            return {cls.primary: v}
        return v


class DataSource(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    path: str = Field(description="File, directory or S3 prefix (jsonl, jsonl.gz, json, parquet).")
    weight: float = Field(1.0, gt=0, le=1000, description="Mixture weight: share of rows taken relative to other sources (1.0 = all rows once, 2.0 = twice).")

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v


class DataSpec(Section):
    primary = "path"
    path: str | None = Field(None, description="Training data: a file, directory or S3 prefix (shorthand for one source).")
    sources: list[DataSource] = Field(default_factory=list, description="Several training sources with mixture weights.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="Row format; auto-detected from the first rows when 'auto'.")
    columns: dict[str, str] = Field(default_factory=dict, description="Column map, e.g. {messages: dialog} or {prompt: question, completion: answer}.")
    roles: dict[str, str] = Field(default_factory=dict, description="Role map onto system/user/assistant, e.g. {human: user, bot: assistant}.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Fraction of rows held out for evaluation.")
    eval_data: str | None = Field(None, description="Separate evaluation source (file, directory or S3 prefix).")
    max_length: int = Field(2048, gt=8, description="Maximum tokens per example (and per packed bin).")
    truncation: Literal["drop", "truncate_left", "truncate_right"] = Field(
        "truncate_right", description="What to do with rows longer than max_length; counted in the data report.")
    train_on_eos: Literal["turn", "last", "none"] = Field(
        "turn", description="Train the end-of-turn token after every assistant turn, only the last, or none.")
    packing: bool = Field(False, description="Pack examples into max_length bins (best-fit decreasing); position_ids restart per example.")
    num_proc: int = Field(0, ge=0, description="Processes for tokenization (0 = number of CPU cores).")
    shuffle: bool = Field(True, description="Shuffle rows (with seed) before splitting and packing.")
    cache_uri: str | None = Field(None, description="Shared store for prepared data (e.g. s3://bucket/sftjob-cache/): kept under its content hash, so another run, pod or sweep member with the same data, template, tokenizer and knobs downloads it instead of preparing.")
    prepare_timeout: float = Field(7200, gt=0, description="Multi-node: seconds nodes other than 0 wait for node 0 to publish the prepared data before exiting 69 (retryable).")


class ModelSpec(Section):
    primary = "path"
    path: str | None = Field(None, description="Base model: a local directory, s3:// prefix or hub id (hub needs network).")
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from the model.")
    adapter: str | None = Field(None, description="Continue from this LoRA adapter: a published run's output prefix "
                                "(its _SUCCESS and sha256s are checked) or a local adapter directory; it must fit the base.")
    chat_template: str | None = Field(None, description="Chat template: unset = the tokenizer's own; a built-in name (chatml, llama3, gemma, mistral, phi3, zephyr, alpaca, ...); or a Jinja file (local or S3).")
    system_prompt: str | None = Field(None, description="Default system message.")
    add_special_tokens: list[str] = Field(default_factory=list, description="Tokens added to the tokenizer as special tokens (e.g. <|im_start|>, <|im_end|> to teach a base model ChatML); embeddings are resized — train them with modules_to_save: [embed_tokens, lm_head].")
    system_prompt_mode: Literal["default", "override", "none"] = Field(
        "default", description="default: add system_prompt where a row has none; override: replace every row's; none: never add.")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype (auto: bf16 on GPUs that support it, else fp32).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel. auto: on CUDA flash_attention_2 when flash-attn is installed (packed rows go varlen), else flex_attention for packed rows (document masking), else sdpa; sdpa on CPU. A missing kernel falls back with a message.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model repo.")


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # TRL 1.16 DPOConfig.loss_type


class TrainSpec(Section):
    method: Literal["lora", "qlora", "full"] = Field("lora", description="LoRA adapter, QLoRA (4-bit base, CUDA only) or full fine-tune.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(-1, json_schema_extra={"anyOf": [{"const": -1}, {"minimum": 1}]},  # = _steps below
                           description="Optimizer steps (-1: use num_train_epochs).")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Micro batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro batches per optimizer step.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps for LR warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = off).")
    optim: str = Field("adamw_torch", description="transformers optimizer name.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    use_liger_kernel: bool | None = Field(None, description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA. Unset: on where it applies (CUDA and liger-kernel installed, as in the image); true/false forces it (true falls back with a message where it cannot run).")
    logging_steps: int = Field(10, ge=1, description="Steps between progress lines / status updates.")
    report_to: list[str] = Field(default_factory=list, description="Trackers: tensorboard, mlflow, wandb (none by default).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field("all-linear", description="Modules that get LoRA ('all-linear' or a list of names).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained fully and saved with the adapter (e.g. embed_tokens, lm_head).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (a magnitude vector per module).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by lora_alpha/sqrt(r) instead of lora_alpha/r (stable at high ranks).")
    init_lora_weights: Literal["default", "gaussian", "orthogonal", "pissa", "olora"] = Field(
        "default", description="Adapter init: default (B=0), gaussian, orthogonal, or pissa/olora (principal directions of "
        "the base; the published adapter is converted to a rank-2r LoRA for the original base).")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B matrices learn this many times faster than A (e.g. 16).")
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune: noise on input embeddings while training (e.g. 5).")
    seed: int = Field(42, description="Seed for data order, init and dropout.")
    objective: str = Field(  # a name job/objectives knows (built in, or registered in SFTJOB_OBJECTIVE_MODULES)
        "sft", json_schema_extra={"enum": ["sft", "dpo"]}, description="sft: supervised fine-tuning on chats; dpo: preference tuning (DPO) on prompt/chosen/rejected pairs.")
    beta: float = Field(0.1, gt=0, description="DPO: how far the policy may move from the reference (higher = closer).")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="DPO loss, as TRL's DPOConfig names it (sigmoid = the DPO paper, ipo, hinge, robust, ...).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO: assumed share of flipped preference labels (loss_type robust, exo_pair, aot, aot_unpaired).")
    precompute_ref_log_probs: bool = Field(False, description="DPO: one reference pass over the data before training (no reference forward per step).")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of optimizer steps, or -1 to train num_train_epochs")
        return v

    @field_validator("optim", "lr_scheduler_type")
    @classmethod
    def _transformers_name(cls, v: str, info) -> str:
        """A typo here would pass every check and crash inside the ranks (a retryable exit 1)."""
        if v == cls.model_fields[info.field_name].default:
            return v  # the defaults need no transformers import (spec building stays fast)
        names = _transformers_names(info.field_name)
        if v not in names:
            close = difflib.get_close_matches(v, names, n=1, cutoff=0.5)
            raise ValueError(f"unknown name '{v}' — " + (f"did you mean '{close[0]}'?" if close
                                                           else f"transformers accepts: {', '.join(names)}"))
        return v


def _transformers_names(field: str) -> list[str]:
    """What transformers' TrainingArguments accepts for optim / lr_scheduler_type."""
    if field == "optim":
        from transformers.training_args import OptimizerNames as names
    else:
        from transformers.trainer_utils import SchedulerType as names
    return [n.value for n in names]


class DistributedSpec(Section):
    primary = "strategy"
    strategy: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = Field(
        "auto", description="auto: deepspeed when >1 process, else single.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="DeepSpeed: optimizer state to CPU.")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3: parameters to CPU.")
    num_processes: int | None = Field(None, ge=1, description="Total processes (default: gpus_per_node x num_machines).")
    gpus_per_node: int | None = Field(None, ge=1, description="Processes per node (default: torch.cuda.device_count(), 1 on CPU).")
    num_machines: int = Field(1, ge=1, description="Nodes (pods of the Indexed Job).")
    node_rank: int | None = Field(None, ge=0, description="This node's rank (default: $JOB_COMPLETION_INDEX, else 0).")
    main_process_ip: str | None = Field(None, description="Rank-0 address (default: $MASTER_ADDR).")
    main_process_port: int | None = Field(None, description="Rendezvous port (default: $MASTER_PORT, else 29500).")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field("auto", description="auto: bf16 where supported, fp16 on older GPUs, no on CPU.")
    ddp_timeout: int = Field(1800, ge=1, description="Collective timeout in seconds (TrainingArguments.ddp_timeout); a dead or stuck rank is caught sooner by the job's own watchdog.")


class StorageSpec(Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS).")
    addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="auto: path-style when an endpoint is set.")
    region: str | None = Field(None, description="Region (default: the boto3 chain).")
    verify: bool = Field(True, description="Verify TLS certificates.")
    ca_bundle: str | None = Field(None, description="Custom CA bundle file for TLS.")
    max_concurrency: int = Field(16, ge=1, description="Parallel transfers / multipart parts.")
    multipart_chunksize_mb: int = Field(16, ge=5, description="Multipart part size in MiB.")
    max_attempts: int = Field(5, ge=1, description="Retries (adaptive mode) before exit 69.")
    read_timeout: float = Field(120, gt=0, description="Seconds a request may wait for the store's next bytes before it is retried; a store that hangs (accepts, never answers) costs read_timeout x max_attempts per request, then exit 69.")
    connect_timeout: float = Field(10, gt=0, description="Seconds to open a connection to the store before the attempt is retried.")


class OutputSpec(Section):
    primary = "uri"
    uri: str | None = Field(None, description="Output prefix: s3://bucket/runs/<name>/ or a local directory.")
    overwrite: bool = Field(False, description="Allow publishing over an already published run.")
    merged: bool = Field(False, description="Also write merged full weights (sharded safetensors).")


class ResilienceSpec(Section):
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0 = off unless save_minutes).")
    save_minutes: float = Field(0, ge=0, description="Checkpoint every N minutes (0 = off).")
    save_total_limit: int = Field(2, ge=1, description="Complete checkpoints kept (locally and in the output).")
    resume: bool = Field(True, description="Resume from the newest complete checkpoint found.")
    portable_max_gb: float = Field(16, ge=0, description="Full fine-tunes: each checkpoint also carries portable/ (fp32 weights + Adam moments, 12 bytes a parameter, gathered in rank 0's memory) so it resumes on another process count or strategy, while that copy is at most this many GB; beyond it the checkpoint resumes only on its own (0 = never). LoRA always carries it (the adapter x3).")
    #: On SIGTERM the ranks wait for the checkpoint upload only until the reserve at the end of the grace period
    #: (job/train/sft.py SIGTERM_RESERVE_SECONDS, 25 s: teardown, the last status.json, interpreter exit); the launcher
    #: kills them 3 s before its end. 30 s (also Kubernetes' default) leaves the save at least 5 s; less left nothing.
    MIN_GRACE_SECONDS: ClassVar[int] = 30
    grace_seconds: int = Field(120, json_schema_extra={"minimum": MIN_GRACE_SECONDS},
                               description="Seconds between SIGTERM and SIGKILL (terminationGracePeriodSeconds); at least "
                               f"{MIN_GRACE_SECONDS}, the time the trainer needs to save a checkpoint and exit.")
    max_runtime: float = Field(0, ge=0, description="Stop before this many seconds with a final checkpoint (0 = off).")
    train_to_deadline: bool = Field(False, description="At max_runtime publish the adapter as final instead of partial.")
    stall_seconds: float | None = Field(None, ge=0, description="End the job (exit 72, stacks logged) when no optimizer step completes for this long; 3x before the first step and while checkpointing (default: 600 on GPUs, 1800 on CPU; 0 = off).")
    store_wait_seconds: float = Field(300, ge=1, description="How long the end of a run keeps retrying an unavailable store (last checkpoint, publish) before exit 69; the adapter stays in the local cache and a rerun publishes it without retraining. Training itself never waits for the store.")

    @field_validator("grace_seconds")
    @classmethod
    def _grace(cls, v: int) -> int:
        if v < cls.MIN_GRACE_SECONDS:
            raise ValueError(
                f"must be at least {cls.MIN_GRACE_SECONDS} seconds, or SIGKILL comes before the SIGTERM checkpoint is "
                "saved (the trainer uploads it only until the reserve it keeps at the end for its exit); raise it, and "
                f"the pod's terminationGracePeriodSeconds, to {cls.MIN_GRACE_SECONDS} or more")
        return v


class EvalSpec(Section):
    eval_steps: int = Field(0, ge=0, description="Eval loss every N steps (0 = only at the end when there is an eval split).")
    prompts: str | None = Field(None, description="Held-out prompts for generation eval (file or S3 URI).")
    num_prompts: int = Field(0, ge=0, description="Use N rows of the eval split as generation prompts (0 = off unless prompts).")
    max_new_tokens: int = Field(128, ge=1, description="Generation length for the generation eval.")
    base_loss: bool = Field(True, description="Also measure the base model's eval loss (one pass over the eval split after training), for the before column.")
    json_schema: str | None = Field(None, description="JSON Schema file the answers must satisfy (structured output).")
    min_json_valid: float | None = Field(None, ge=0, le=1, description="Gate: minimum share of the adapter's answers that are valid JSON (and valid against json_schema when set); a miss exits 78 with the adapter under rejected/.")
    max_loss: float | None = Field(None, gt=0, description="Gate: maximum final eval loss (needs an eval split); a miss exits 78 with the adapter under rejected/.")
    min_reward_accuracy: float | None = Field(None, ge=0, le=1, description="Gate (DPO): minimum share of eval pairs where the adapter's implicit reward prefers chosen over rejected; a miss exits 78 with the adapter under rejected/.")


class RunSpec(BaseModel):
    """Everything one run needs; serialised as run.yaml beside the outputs (without secrets)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str | None = Field(None, description="Run name (default: derived from the output prefix).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    resilience: ResilienceSpec = Field(default_factory=ResilienceSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    cache_dir: str | None = Field(None, description="Cache root (default: $SFTJOB_CACHE_DIR, $XDG_CACHE_HOME/sftjob, ~/.cache/sftjob).")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto", description="Log lines: text for people, json (one object per line) for Loki/CloudWatch/Elastic; "
        "auto: text on a terminal, json otherwise. Each event is printed once either way.")

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if self.data.path and self.data.sources:
            raise ValueError("set data.path or data.sources, not both")
        for name, value in self._locations():
            _check_scheme(name, value)
        return self

    def _locations(self):
        """Every knob that names a file, directory or prefix, with its dotted name."""
        for section, keys in (("model", ("path", "tokenizer", "adapter", "chat_template")),
                              ("data", ("path", "eval_data", "cache_uri")), ("output", ("uri",)),
                              ("eval", ("prompts", "json_schema"))):
            for k in keys:
                yield f"{section}.{k}", getattr(getattr(self, section), k)
        for i, src in enumerate(self.data.sources):
            yield f"data.sources.{i}.path", src.path

    # ---- derived -----------------------------------------------------------------------
    def data_sources(self) -> list[DataSource]:
        return list(self.data.sources) or ([DataSource(path=self.data.path)] if self.data.path else [])

    def cache_root(self) -> Path:
        return cache_root(self.cache_dir)

    def public_dict(self) -> dict:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.public_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def require(self, *dotted: str) -> None:
        for name in dotted:
            obj: Any = self
            for part in name.split("."):
                obj = getattr(obj, part)
            if obj in (None, ""):
                flag = FLAGS_BY_PATH.get(name, name)
                raise ConfigError(f"missing required setting '{name}'",
                                  hint=f"pass --{flag} or set it in the run spec YAML")


def cache_root(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("SFTJOB_CACHE_DIR"):
        return Path(os.environ["SFTJOB_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "sftjob"
    return Path.home() / ".cache" / "sftjob"


def _check_scheme(name: str, value: str | None) -> None:
    """s3:// and local paths (file:// too) are read; any other scheme was taken for a local path that does
    not exist ("data not found: gs://..."): say so at load time, naming the knob (job.storage owns the rule)."""
    from job.storage.paths import scheme_problem

    if not value:
        return
    if name == "output.uri" and value.startswith("/") and not value.strip("/"):
        raise ValueError("output.uri: / is the filesystem root; the run publishes (and on overwrite deletes) "
                         "files there: give a directory of its own")
    why = scheme_problem(value)
    if why:
        raise ValueError(f"{name}: {why}")


def usable_cache_root(spec: RunSpec) -> Path:
    """The cache root, created and written to once: an unusable one is a config error naming it and where it
    came from, before anything is fetched or prepared into it (it was a traceback deep in prepare)."""
    import errno
    import tempfile

    root = spec.cache_root()
    source = ("--cache-dir / SFTJOB_CACHE_DIR" if spec.cache_dir else
              "$XDG_CACHE_HOME/sftjob" if os.environ.get("XDG_CACHE_HOME") else "~/.cache/sftjob")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        if e.errno == errno.ENOSPC:  # the node's disk, not the spec: another node may have room
            from job.errors import UnavailableError

            raise UnavailableError(f"cache directory {root} ({source}): {why}",
                                   hint="free space on the node or give the pod's cache volume more room") from None
        raise ConfigError(f"cache directory {root} ({source}) is not usable: {why}",
                          hint="point SFTJOB_CACHE_DIR (or --cache-dir) at a writable directory; in the chart "
                               "it is cache.mountPath") from None
    return root


# ---- flags and env, generated from the models -----------------------------------------------

SECTIONS: dict[str, type[Section]] = {
    name: f.annotation for name, f in RunSpec.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, Section)
}


def leaf_paths() -> list[tuple[str, Any]]:
    out = []
    for name, f in RunSpec.model_fields.items():
        if name in SECTIONS:
            out += [(f"{name}.{sub}", sf) for sub, sf in SECTIONS[name].model_fields.items()]
        else:
            out.append((name, f))
    return out


def _flag_names() -> dict[str, str]:
    leaves = leaf_paths()
    counts: dict[str, int] = {}
    for path, _ in leaves:
        counts[path.split(".")[-1]] = counts.get(path.split(".")[-1], 0) + 1
    flags = {}
    for path, _ in leaves:
        section, _, bare = path.rpartition(".")
        if section and SECTIONS[section].primary == bare:
            name = section  # data.path → --data, distributed.strategy → --distributed
        elif counts[bare] == 1 and bare not in SECTIONS:
            name = bare
        else:
            name = path.replace(".", "_")
        flags[path] = name.replace("_", "-")
    return flags


FLAGS_BY_PATH: dict[str, str] = _flag_names()
#: flag name → dotted field path
ALL_FLAGS: dict[str, str] = {v: k for k, v in FLAGS_BY_PATH.items()}

ALL_FLAGS_UNDERSCORED = [p.split(".")[-1] for p in FLAGS_BY_PATH]
