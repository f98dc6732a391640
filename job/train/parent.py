"""Continue from a published adapter (`model.adapter`): "train more", and the SFT → DPO chain.

The parent is a local adapter directory or the output prefix of a published run. A published run is trusted
only when sealed: `_SUCCESS`, a manifest it seals and every file's sha256 (publish.verify_published). Its
adapter must fit the base (every LoRA tensor's shape against the base's modules) before any GPU work: a
mismatch is a config mistake (64), never a crash in the ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from job import publish, redact, storage
from job.errors import ConfigError, NotFoundError, VerificationError

log = logging.getLogger("sftjob.parent")
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Parent:
    path: Path  # local directory holding adapter_config.json + adapter_model.safetensors
    info: dict  # what the manifest records: uri (redacted), sha256 of the weights, run_id


def check(spec) -> None:
    """Settings a parent adapter cannot be combined with (exit 64 before anything is fetched)."""
    if not spec.model.adapter:
        return
    if spec.train.method == "full":
        raise ConfigError("model.adapter with train.method: full: a full fine-tune has no adapter to continue",
                          hint="use method: lora (or qlora) to continue an adapter, or drop --adapter")
    from job.train.launch import zero3

    if zero3(spec):
        raise ConfigError("model.adapter under ZeRO-3: the adapter's weights cannot be loaded into partitioned "
                          "parameters here", hint="use zero_stage: 2 or ddp to continue an adapter")


def fetch(spec, model_dir: str) -> Parent | None:
    uri = spec.model.adapter
    if not uri:
        return None
    uri = str(uri).rstrip("/")
    run_id = None
    if storage.exists(storage.join(uri, publish.MANIFEST)):
        try:
            manifest = publish.verify_published(uri)
        except VerificationError as e:
            raise ConfigError(f"model.adapter {redact.text(uri)} is not a sound published run: {e.message}",
                              hint="point --adapter at a finished run's output prefix (with _SUCCESS)") from None
        if manifest.get("partial"):
            raise ConfigError(f"model.adapter {redact.text(uri)} is a partial publish (max_runtime cut it short)",
                              hint="rerun that run to completion first, or point at another adapter")
        listed = {f["path"] for f in manifest.get("files", [])}
        missing = [f for f in FILES if f not in listed]
        if missing:
            raise ConfigError(f"model.adapter {redact.text(uri)} publishes no {', '.join(missing)} "
                              "(a full fine-tune or a merged model?)", hint="continue from a LoRA run's output")
        run_id = manifest.get("run_id")
        dest = spec.cache_root() / "adapters" / hashlib.sha256(
            f"{uri}\n{json.dumps(manifest.get('files'), sort_keys=True)}".encode()).hexdigest()[:16]
        for name in FILES:
            storage.download_file(storage.join(uri, name), dest / name)
    elif not storage.is_remote(uri) and Path(uri).is_dir():
        dest = Path(uri)
        if not (dest / FILES[0]).is_file():
            raise ConfigError(f"model.adapter {uri} has no adapter_config.json",
                              hint="give a directory written by save_pretrained of a PEFT model, or a published run")
    else:
        raise NotFoundError(f"model.adapter {redact.text(uri)}: neither a published run (no manifest.json) nor "
                            "a local adapter directory", hint="give a run's output prefix or an adapter directory")
    from job.train.export import verify_adapter

    try:
        verify_adapter(dest, model_dir, forward=False, trust_remote_code=spec.model.trust_remote_code)
    except VerificationError as e:  # its own fix is about an output (the training log): this one is the input's
        raise ConfigError(f"model.adapter {redact.text(uri)} does not fit the base model {spec.model.path}: {e.message}",
                          hint="point --adapter at an adapter trained on this same base (same architecture, sizes "
                               "and module names): a finished LoRA run's output or a save_pretrained directory") from None
    cfg = json.loads((dest / FILES[0]).read_text())
    t = spec.train
    if (cfg.get("r"), cfg.get("lora_alpha")) != (t.lora_r, t.lora_alpha):
        log.warning("continuing adapter %s: its r=%s/alpha=%s are kept (the spec's lora_r=%s/lora_alpha=%s "
                    "apply to new adapters only)", redact.text(uri), cfg.get("r"), cfg.get("lora_alpha"),
                    t.lora_r, t.lora_alpha)
    sha = hashlib.sha256((dest / FILES[1]).read_bytes()).hexdigest()
    return Parent(dest, {"uri": redact.text(uri), "sha256": sha, "run_id": run_id})
