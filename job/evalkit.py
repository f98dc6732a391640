"""What every objective's evaluation shares (job/evaluate.py for SFT, job/evaluate_dpo.py for DPO): the
base model and the adapter loaded as training loaded them, the tokenizer, and the ending (eval.json,
eval.md, the gate's verdict). Below both, so neither imports the other's private helpers."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sftjob.eval")
FORMAT = "sftjob.eval/1"


@dataclass
class Evaluation:
    report: dict
    summary: dict
    failures: list[str] = field(default_factory=list)


def load_base(spec, model_dir: str, vocab: int):
    """The base model as training loaded it (job.loader: dtype, attention, QLoRA quantization, added tokens)."""
    import torch

    from job.loader import load_model, local_settings

    precision, attn = local_settings(spec)
    model = load_model(model_dir, spec, precision=precision, attn=attn, vocab=vocab)
    if torch.cuda.is_available() and spec.train.method != "qlora":  # a quantized model is already on the GPU
        model.to("cuda")
    return model.eval()


def with_adapter(spec, base, adapter_dir: str):
    if spec.train.method == "full":
        from job.loader import load_weights

        device, dtype = next(base.parameters()).device, next(base.parameters()).dtype
        attn = base.config._attn_implementation
        del base
        return load_weights(adapter_dir, dtype=str(dtype).replace("torch.", ""), attn=attn,
                            trust_remote_code=spec.model.trust_remote_code).to(device).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()


def written(workdir: Path, report: dict, failures: list[str], t0: float, markdown, summary, **thresholds) -> Evaluation:
    """The ending every objective shares: the gate's verdict in the report, eval.json + eval.md, the log line."""
    report["gate"] = {**thresholds, "checked": any(v is not None for v in thresholds.values()),
                      "passed": not failures, "failures": failures}
    report["seconds"] = round(time.time() - t0, 1)
    (workdir / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (workdir / "eval.md").write_text(markdown(report))
    ev = Evaluation(report, summary(report), failures)
    log.info("evaluation: %s", json.dumps(ev.summary))
    return ev


def tokenizer(spec, prepared, model_dir: str, adapter_dir: str):
    """The adapter's tokenizer (saved by training), else the one prepare used; with the run's added tokens."""
    from job.data.templates import locate_tokenizer
    from job.loader import load_tokenizer

    saved = (Path(adapter_dir) / "tokenizer_config.json").exists()
    tok = load_tokenizer(adapter_dir if saved else locate_tokenizer(spec, model_dir),
                         add_special_tokens=spec.model.add_special_tokens,
                         trust_remote_code=spec.model.trust_remote_code)
    tok.chat_template = prepared.chat_template
    return tok


def free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
