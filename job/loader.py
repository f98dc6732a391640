"""The one place that loads tokenizers and models, so every stage sees the same model.

prepare, train, eval, export, plan and bench/gpu.py take from here: the tokenizer with
``model.add_special_tokens`` added, the weights dtype, the attention kernel, the 4-bit quantization of a
QLoRA base and the embedding rows for added tokens. Rules that lived in five places drifted apart (QLoRA
trained on a double-quantized base and was evaluated on a single-quantized one; prepare tokenized without
the added tokens), so they live here once.

Nothing heavy is imported at module level: prepare loads only a tokenizer (no torch from here), and
bench/gpu.py runs on a GPU machine without trl, datasets, deepspeed or boto3.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from job.errors import NotFoundError

# Packed rows carry restarting position_ids and no attention_mask; transformers turns those into a
# block-diagonal (per-example) mask only when no KV cache is passed to the forward. With use_cache=True a
# training forward builds a DynamicCache and attention silently crosses examples. TRL's compute_loss also
# passes use_cache=False today; this keeps it true for every model we train, whatever TRL does.
USE_CACHE_IN_TRAINING = False

DTYPES = ("bfloat16", "float16", "float32")


# ---- tokenizer (no torch) -------------------------------------------------------------------------

#: tokenizer_config.json classes that AutoTokenizer loads as the generic fast tokenizer itself (Llama 3 and
#: many exports name it). Such a directory is loaded directly, without AutoTokenizer's model-config machinery,
#: which imports torch (~1.5 s of every `sftjob prepare`) — but only where AutoTokenizer would make the same
#: choice: no remote code, no Mistral tekken.json, and a config.json model type that transformers does not
#: list as having an incorrect hub tokenizer class (read from its source: importing it imports torch).
GENERIC_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _generic_fast(path: Path) -> bool:
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        model = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").exists() else {}
    except (OSError, ValueError):
        return False
    if not (isinstance(cfg, dict) and isinstance(model, dict) and cfg.get("tokenizer_class") in GENERIC_FAST
            and not cfg.get("auto_map") and (path / "tokenizer.json").is_file() and not (path / "tekken.json").exists()):
        return False
    overridden = _hub_class_overridden()
    return overridden is not None and not ({model.get("model_type"), model.get("model_name")} & overridden)


@functools.cache
def _hub_class_overridden() -> frozenset | None:
    """transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS (AutoTokenizer ignores the hub class for these
    model types), read from its source; None when it cannot be found (then AutoTokenizer decides)."""
    import ast
    import importlib.util

    try:
        root = Path(importlib.util.find_spec("transformers").origin).parent
        tree = ast.parse((root / "models" / "auto" / "tokenization_auto.py").read_text(encoding="utf-8"))
    except (AttributeError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS":
            try:
                return frozenset(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def load_tokenizer(path: str | Path, *, add_special_tokens: Sequence[str] = (), trust_remote_code: bool = False):
    """AutoTokenizer from a local directory, with the run's added special tokens (ids after the base vocab)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if _generic_fast(Path(path)):
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        why = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        raise NotFoundError(f"cannot load a tokenizer from {path}: {why}",
                            hint="the directory needs tokenizer.json (or a SentencePiece model) and tokenizer_config.json") from None
    return add_tokens(tok, add_special_tokens)


def add_tokens(tok, tokens: Sequence[str]):
    """model.add_special_tokens, the same call everywhere so the ids agree; tokens already known are kept."""
    missing = [t for t in tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


# ---- settings ---------------------------------------------------------------------------------------

def attn_implementation(requested: str, cuda: bool, packed: bool = False) -> str:
    """The attention kernel, by the one rule the launcher records (job/train/fastpath.py): flash_attention_2
    where flash_attn is installed on CUDA, FlexAttention for packed rows on CUDA without it, else sdpa."""
    from job.train.fastpath import choose_attention, kernels

    k = kernels() if cuda else {"flash_attn": False, "flex": False}
    return choose_attention(requested, cuda=cuda, packed=packed, flash_attn=k["flash_attn"], flex=k["flex"]).implementation


def mixed_precision(requested: str, cuda: bool, bf16_ok: bool) -> str:
    """auto: bf16 where supported, fp16 on older GPUs, no on CPU."""
    if requested != "auto":
        return requested
    return ("bf16" if bf16_ok else "fp16") if cuda else "no"


def dtype_name(torch_dtype: str, precision: str) -> str:
    """Weights dtype: model.torch_dtype when set, else the mixed precision's (fp32 without one)."""
    if torch_dtype != "auto":
        return torch_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def quantization(method: str, dtype: str) -> dict | None:
    """The BitsAndBytesConfig arguments of a QLoRA base (None otherwise): NF4 with double quantization,
    computing in the weights dtype (bf16 when the weights are fp32: 4-bit kernels do not compute in fp32)."""
    if method != "qlora":
        return None
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype if dtype != "float32" else "bfloat16"}


def local_settings(spec) -> tuple[str, str]:
    """(mixed precision, attention) for a model loaded in this process (eval), by the launcher's rules."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    return (mixed_precision(spec.distributed.mixed_precision, cuda, bf16_ok),
            attn_implementation(spec.model.attn_implementation, cuda))


# ---- models -----------------------------------------------------------------------------------------

def load_model(path: str | Path, spec, *, precision: str, attn: str, vocab: int = 0, training: bool = False):
    """The run's model as train and eval load it: dtype, attention and QLoRA quantization from the spec,
    embeddings grown to `vocab` rows (the tokenizer with its added tokens)."""
    dtype = dtype_name(spec.model.torch_dtype, precision)
    q = quantization(spec.train.method, dtype)
    model = load_weights(path, dtype=dtype, attn=attn, quantization=q, vocab=vocab,
                         trust_remote_code=spec.model.trust_remote_code)
    return for_training(model) if training else model


def for_training(model):
    """What every model we train gets (the job's ranks and bench/gpu.py): no KV cache in its forwards."""
    model.config.use_cache = USE_CACHE_IN_TRAINING
    return model


def load_weights(path: str | Path, *, dtype: str, attn: str | None = None, quantization: dict | None = None,
                 vocab: int = 0, trust_remote_code: bool = False):
    """The one from_pretrained of the job. A quantized model is placed on this rank's GPU (bitsandbytes
    quantizes while loading); anything else loads on the CPU and the caller places it."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if attn:
        kwargs["attn_implementation"] = attn
    if quantization:
        kwargs["quantization_config"] = bnb_config(quantization)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    resize_embeddings(model, vocab)
    return model


def bnb_config(q: dict):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**{**q, "bnb_4bit_compute_dtype": getattr(torch, q["bnb_4bit_compute_dtype"])})


def resize_embeddings(model, vocab: int) -> None:
    """Grow the embeddings (and an untied lm_head) to `vocab` rows when the tokenizer has more tokens.

    New rows are the mean of the old ones, exactly: transformers' mean_resizing samples around the mean,
    so train, eval, export and merge would each start the untrained new rows from different values.
    """
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if vocab <= rows:
        return
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] == vocab:
                w = emb.weight
                w[rows:] = w[:rows].float().mean(0).to(w.dtype)


def model_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def empty_model(config: dict | str | Path, *, vocab: int = 0, trust_remote_code: bool = False):
    """The model on the meta device (no weights read) with the embedding rows load_model would give it:
    shapes for the planner and for checking an adapter."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        conf = AutoConfig.for_model(**config)
    else:
        conf = model_config(config, trust_remote_code)
    if vocab > (getattr(conf, "vocab_size", None) or vocab):
        conf.vocab_size = vocab
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves tied embeddings untied on meta: they would count twice
    return model
