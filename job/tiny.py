"""The built-in tiny model: a ~0.5M-parameter Llama and a byte-level BPE tokenizer, built offline.

Tests and the demo use it so nothing is ever downloaded. Same seed → identical files.
"""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|pad|>"]


def _corpus() -> list[str]:
    from job.demo_data import conversations

    lines = []
    for row in conversations(400, seed=1):
        lines += [m["content"] for m in row["messages"]]
    lines += ["system user assistant", "The quick brown fox jumps over the lazy dog. 0123456789 {}[]\":,"]
    # structured-output answers (the catalog recipe's shape), so JSON keys and punctuation get merges
    for i, (name, cat) in enumerate([("camiseta", "ropa"), ("silla", "hogar"), ("balón", "deporte"), ("taza", "cocina")] * 30):
        lines.append(f'{{"nombre": "{name}", "categoria": "{cat}", "color": "azul", "precio": {5 + 7 * i}, "ok": true}}')
    return lines


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>", "</s>"])
    fast.chat_template = CHATML
    fast.model_max_length = 4096
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def write(dest: str | Path, seed: int = 0) -> Path:
    """Write model + tokenizer to dest; loadable with Auto* classes from_pretrained(dest)."""
    from job.errors import ConfigError

    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"cannot write the tiny model to {dest}: it is (or is under) a file, not a directory",
                          hint="give a new or existing directory") from None
    except OSError as e:
        raise ConfigError(f"cannot write the tiny model to {dest}: {e.strerror}", hint="give a writable directory") from None
    tok = build_tokenizer()
    model = build_model(tok, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest
