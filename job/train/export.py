"""Verify the adapter before anything is published; optionally write merged weights.

LoRA under ZeRO-3 can save empty tensors (TRL #4416, peft #2892) and a broken gather can save zeros:
both are caught here, before publish, by checking every tensor against the base model's shapes and
loading the adapter on the base for a forward pass.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from job.errors import VerificationError

log = logging.getLogger("sftjob.export")
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _module_shapes(base_dir: str, trust_remote_code: bool, vocab: int = 0) -> dict[str, tuple[int, int]]:
    import torch

    from job.loader import empty_model

    model = empty_model(base_dir, vocab=vocab, trust_remote_code=trust_remote_code)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            w = mod.weight
            out[name] = (w.shape[1], w.shape[0]) if isinstance(mod, torch.nn.Linear) else (w.shape[0], w.shape[1])
        else:  # known, shape unchecked (GPT-2's Conv1D): an adapter's module the base lacks is a mismatch
            out[name] = (None, None)
    return out


def verify_adapter(adapter_dir: Path, base_dir: str, *, forward: bool = True,
                   trust_remote_code: bool = False) -> dict:
    """Raise VerificationError unless every LoRA tensor is non-empty, shaped right and lora_B moved."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file() or p.stat().st_size == 0:
            raise VerificationError(f"adapter file missing or empty: {p}", hint="training did not save an adapter")
    try:
        cfg = json.loads(cfg_path.read_text())
        r = int(cfg.get("r", 0))
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - files that do not parse are no adapter (a continued one is user input)
        raise VerificationError(f"adapter in {adapter_dir} does not read: {type(e).__name__}: {e}",
                                hint="nothing was published; check the training log") from None
    if not tensors:
        raise VerificationError(f"{weights} holds no tensors")
    shapes = _module_shapes(base_dir, trust_remote_code, _vocab(adapter_dir, trust_remote_code))
    problems, zero_b, n_lora = [], [], 0
    for key, t in tensors.items():
        if t.numel() == 0:
            problems.append(f"{key}: empty tensor {tuple(t.shape)}")
            continue
        m = _LORA.match(key)
        if not m:
            continue
        n_lora += 1
        module = m.group("module")
        if module not in shapes:
            problems.append(f"{key}: the base model has no module {module}")
            continue
        in_f, out_f = shapes[module]
        want = (r, in_f) if m.group("ab") == "A" else (out_f, r)
        if in_f is not None and tuple(t.shape) != want:
            problems.append(f"{key}: shape {tuple(t.shape)}, expected {want}")
        if m.group("ab") == "B" and not bool(t.abs().sum() > 0):
            zero_b.append(key)
    if zero_b:
        problems.append(f"{len(zero_b)} lora_B tensors are all zero (untrained), e.g. {zero_b[0]}")
    if cfg.get("peft_type", "LORA") == "LORA" and n_lora == 0:
        problems.append("no lora_A/lora_B tensors found")
    _refuse("adapter", problems, untrained=bool(zero_b))
    if forward:
        _load_and_forward(adapter_dir, base_dir, trust_remote_code)
    return {"tensors": len(tensors), "lora_tensors": n_lora, "rank": r, "forward_checked": forward}


def verify_full(model_dir: Path, base_dir: str, *, trust_remote_code: bool = False) -> dict:
    """A full fine-tune: every saved tensor non-empty and finite, the weights moved away from the base
    (the ZeRO-3 empty-save trap and a no-op run look the same from outside), loads, finite forward pass."""
    import torch
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise VerificationError(f"no model weights (*.safetensors) in {model_dir}", hint="training did not save the model")
    base = {}  # key → an open base shard (shard layouts differ between the base and the saved model)
    for bf in sorted(Path(base_dir).glob("*.safetensors")) if Path(base_dir).is_dir() else []:
        h = safe_open(str(bf), "pt")
        base.update(dict.fromkeys(h.keys(), h))
    problems, n, moved, compared = [], 0, 0, 0
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                n += 1
                if t.numel() == 0:
                    problems.append(f"{key}: empty tensor {tuple(t.shape)}")
                elif not torch.isfinite(t.float()).all():
                    problems.append(f"{key}: non-finite values")
                elif key in base:
                    b = base[key].get_tensor(key)
                    if b.shape == t.shape:
                        compared += 1
                        moved += not torch.equal(b.to(t.dtype), t)
    untrained = bool(compared and not moved)
    if untrained:
        problems.append(f"all {compared} weights equal the base model's (untrained)")
    _refuse("model", problems, untrained=untrained)
    def load():
        from job.loader import load_weights

        return load_weights(model_dir, dtype="float32", trust_remote_code=trust_remote_code)

    _forward_check(load, "model", "the fine-tuned model does not load")
    return {"tensors": n, "compared_with_base": compared, "changed": moved, "forward_checked": True}


def _vocab(adapter_dir: Path, trust_remote_code: bool) -> int:
    """Rows the embeddings need for the tokenizer saved with the adapter (0: none saved)."""
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return 0
    from job.loader import load_tokenizer

    return len(load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code))


def load_base_for(adapter_dir: Path, base_dir: str, dtype: str, trust_remote_code: bool = False):
    """The base model (unquantized: verified and merged in full precision), with the embeddings grown as
    training grew them when the adapter's tokenizer added special tokens."""
    from job.loader import load_weights

    return load_weights(base_dir, dtype=dtype, vocab=_vocab(adapter_dir, trust_remote_code),
                        trust_remote_code=trust_remote_code)


def _load_and_forward(adapter_dir: Path, base_dir: str, trust_remote_code: bool) -> None:
    from peft import PeftModel

    def load():
        return PeftModel.from_pretrained(load_base_for(adapter_dir, base_dir, "float32", trust_remote_code),
                                         str(adapter_dir))

    _forward_check(load, "adapter", "adapter does not load on the base model")


class UntrainedError(VerificationError):
    """Verification failed and the weights did not move from the base (nothing was learned)."""


def _refuse(what: str, problems: list[str], *, untrained: bool) -> None:
    if problems:
        raise (UntrainedError if untrained else VerificationError)(
            f"{what} verification failed:\n  " + "\n  ".join(problems[:20]),
            hint="nothing was published; check the training log (ZeRO-3 save, steps > 0)")


def _forward_check(load, what: str, unloadable: str) -> None:
    """load() the model and run four tokens through it: any failure, or a non-finite logit, refuses it."""
    import torch

    try:
        model = load()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3, 4]]) % model.config.vocab_size).logits
    except Exception as e:  # noqa: BLE001 - any load failure means the model is not usable
        raise VerificationError(f"{unloadable}: {type(e).__name__}: {e}") from None
    if not torch.isfinite(logits).all():
        raise VerificationError(f"{what} forward pass produced non-finite logits")


def merge(adapter_dir: Path, base_dir: str, dest: Path, *, trust_remote_code: bool = False) -> Path:
    """Merged full weights (sharded safetensors) for runtimes that don't load adapters."""
    from peft import PeftModel

    base = load_base_for(adapter_dir, base_dir, "bfloat16", trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(dest, max_shard_size="2GB")
    return dest
