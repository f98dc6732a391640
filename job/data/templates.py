"""Chat templates: pick one (tokenizer's own, a built-in by name, or a Jinja file) and learn its shape.

Rendering always goes through ``tokenizer.apply_chat_template`` so the training text is byte for byte
what transformers produces at inference; the chosen template is written back onto the tokenizer (and
its sha256 into tokenizer_config.json) so the adapter ships with the template it was trained on.

Templates that cannot express a system role (they raise on it, or silently leave it out) get the
system text folded into the first user turn as ``system + "\\n\\n" + user``: a documented choice,
recorded in the data report, never a silent drop.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from job import loader, storage
from job.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

# Written out from each family's published tokenizer_config.json chat_template.
# "{eos_token}" in an end-of-turn list means "whatever the tokenizer's eos token is".
BUILTINS: dict[str, tuple[str, list[str]]] = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ["<|im_end|>"]),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ["<|eot_id|>"]),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
        ["{eos_token}"]),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
        ["{eos_token}"]),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
        ["<end_of_turn>"]),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
        ["<|end|>"]),
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
        ["{eos_token}"]),
    "alpaca": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = messages[1:] %}"
        "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
        "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        ["{eos_token}"]),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = 'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}{% set loop_messages = messages %}{% endif %}"
        "{{ system_message }}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}",
        ["{eos_token}"]),
}


def sentinel(i: int) -> str:
    """A content placeholder no template transforms (private-use code points, no whitespace)."""
    return f"\ue000{i}\ue001"


@dataclass
class ChatTemplate:
    name: str  # built-in name, "tokenizer" or the file URI
    text: str
    sha256: str
    eos_tokens: list[str]  # end-of-turn strings right after assistant content
    system: str = "native"  # native | folded (template cannot express a system role)
    notes: list[str] = field(default_factory=list)


def template_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


TOKENIZER_FILES = ("tokenizer*.json", "*.model", "*.tiktoken", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "additional_chat_templates/*", "config.json", "vocab*", "merges*.txt", "*.py")


def is_tokenizer_file(rel: str) -> bool:
    """What AutoTokenizer may read from a model directory (never the weights)."""
    return any(fnmatch.fnmatchcase(rel, pat) for pat in TOKENIZER_FILES)


def locate_tokenizer(spec, tokenizer_dir: Path | str | None = None) -> Path | None:
    """Local dir of the tokenizer: model.tokenizer, else tokenizer_dir (the fetched model dir), else model.path.

    Never downloads from the hub: an s3:// location is fetched through job.storage (node cache),
    anything else must be a local directory. None when nothing is set.
    """
    loc = spec.model.tokenizer or tokenizer_dir or spec.model.path
    if not loc:
        return None
    loc = str(loc)
    if storage.is_remote(loc):  # the tokenizer files only, into the cache the model fetch (run) completes
        local = Path(storage.fetch(loc.rstrip("/") + "/", spec.cache_root() / "inputs", only=is_tokenizer_file))
    else:
        local = Path(loc[len("file://"):] if loc.startswith("file://") else loc)
    if not local.is_dir():
        if not local.exists() and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", loc):  # org/name: a hub id
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise NotFoundError(f"tokenizer not found: '{loc}' is no local directory, and if it is a Hugging Face "
                                f"hub id: the data stage reads tokenizers only from a local directory or S3{offline}",
                                hint=f"download it first (`hf download {loc} --local-dir DIR`) and pass --model DIR "
                                     "(or --tokenizer DIR), or copy it to S3 and pass the s3:// prefix")
        what = "is a file, not a directory" if local.exists() else "does not exist"
        raise NotFoundError(f"tokenizer not found: {loc} {what}",
                            hint="pass --tokenizer DIR (or --model DIR) holding tokenizer.json / tokenizer_config.json")
    log.debug("tokenizer from %s (%s)", loc, local)
    return local


def load_tokenizer(spec, tokenizer_dir: Path | str | None = None):
    """(tokenizer, local dir), loaded by job.loader exactly as training and inference load it."""
    local = locate_tokenizer(spec, tokenizer_dir)
    if local is None:
        return None, None
    return loader.load_tokenizer(local, add_special_tokens=spec.model.add_special_tokens,
                                 trust_remote_code=spec.model.trust_remote_code), local


def tokenizer_files_sha256(local: Path) -> str:
    """Fingerprint of everything in a tokenizer dir that can change tokenization or the template (not weights)."""
    h = hashlib.sha256()
    for f in sorted(Path(local).iterdir()):  # the same files with or without the weights beside them
        if f.is_file() and is_tokenizer_file(f.name):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def prepare_inputs(spec, tokenizer_dir: Path | str | None = None) -> tuple[Path, tuple[str, str] | None]:
    """What every objective's preparation starts from: data sources, the tokenizer directory, the template source."""
    from job.errors import ConfigError

    if not spec.data_sources():
        spec.require("data.path")
    tdir = locate_tokenizer(spec, tokenizer_dir)
    if tdir is None:
        raise ConfigError("prepare needs a tokenizer", hint="pass --model DIR or --tokenizer DIR")
    return tdir, (read_template_source(spec.model.chat_template) if spec.model.chat_template else None)


def read_template_source(value: str) -> tuple[str, str]:
    """(name, jinja text) for a built-in name or a local/S3 Jinja file."""
    if value in BUILTINS:
        return value, BUILTINS[value][0]
    looks_like_path = storage.is_remote(value) or "/" in value or value.endswith((".jinja", ".j2", ".jinja2"))
    if not looks_like_path:
        raise ConfigError(f"chat_template: unknown built-in '{value}'",
                          hint=f"use one of {', '.join(sorted(BUILTINS))}, or a path to a Jinja file")
    try:
        text = storage.read_bytes(value).decode("utf-8")
    except NotFoundError:
        raise NotFoundError(f"chat_template file not found: {value}",
                            hint=f"check the path, or use a built-in: {', '.join(sorted(BUILTINS))}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"chat_template file {value} is not UTF-8 text", hint="point it at a Jinja file") from None
    if not text.strip():
        raise ConfigError(f"chat_template file {value} is empty", hint="point it at a Jinja chat template")
    return value, text


def resolve_template(spec, tokenizer) -> ChatTemplate:
    """The template this run trains with: spec.model.chat_template, else the tokenizer's own."""
    choice = spec.model.chat_template
    if choice:
        name, text = read_template_source(choice)
    else:
        text = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(text, dict):
            text = text.get("default")
        if not text:
            raise ConfigError(f"the tokenizer{_where(tokenizer)} has no chat template",
                              hint=f"set chat_template to a built-in ({', '.join(sorted(BUILTINS))}) or a Jinja file")
        name = "tokenizer"
    return describe(name, text, tokenizer)


def describe(name: str, text: str, tokenizer) -> ChatTemplate:
    """Probe a template with placeholder contents: does it render a system role, what ends a turn."""
    tok = tokenizer if tokenizer is not None else _PlainTokenizer()
    notes = []
    system = "native"
    try:
        out = render(tok, text, [_msg("system", 0), _msg("user", 1), _msg("assistant", 2)])
        if sentinel(0) not in out:
            system = "folded"
            notes.append("template leaves out the system message; system text is folded into the first user turn")
    except Exception as e:  # noqa: BLE001 - templates raise arbitrary errors via raise_exception
        system = "folded"
        notes.append(f"template rejects a system message ({_short(e)}); system text is folded into the first user turn")
    eos = _eos_for(name, text, tok)
    if not eos:
        notes.append("no end-of-turn token found after assistant turns; train_on_eos has no effect")
    return ChatTemplate(name=name, text=text, sha256=template_sha256(text), eos_tokens=eos, system=system, notes=notes)


def _eos_for(name: str, text: str, tok) -> list[str]:
    eos_token = getattr(tok, "eos_token", None)
    if name in BUILTINS:
        out = [eos_token if e == "{eos_token}" else e for e in BUILTINS[name][1]]
        return [e for e in out if e]
    try:  # the literal text right after an assistant turn, up to the next turn
        out = render(tok, text, [_msg("user", 0), _msg("assistant", 1), _msg("user", 2), _msg("assistant", 3)])
    except Exception:  # noqa: BLE001
        return [eos_token] if eos_token else []
    if sentinel(1) not in out or sentinel(3) not in out:  # no assistant content rendered: check_encoder says so
        return [eos_token] if eos_token else []
    after = out.split(sentinel(1), 1)[1].split(sentinel(2), 1)[0].lstrip()
    last = out.split(sentinel(3), 1)[1].lstrip()
    specials = sorted(set(_special_strings(tok)) | {eos_token or ""}, key=len, reverse=True)
    first = _leading_special(after, specials)
    if first is None:
        return _literal_end_of_turn(after, last)
    ends = [first]
    if eos_token and first != eos_token and after[len(first):].startswith(eos_token):
        ends.append(eos_token)  # both, back to back: Command R7B <|END_RESPONSE|><|END_OF_TURN_TOKEN|>
    final = _leading_special(last, specials)
    if final is not None and final not in ends:
        ends.append(final)  # the last turn ends differently: gpt-oss <|end|> / <|return|>, OLMo 3 <|im_end|> / eos
    return ends


def _leading_special(text: str, specials: list[str]) -> str | None:
    return next((s for s in specials if s and text.startswith(s)), None)


def _literal_end_of_turn(after_middle: str, after_last: str) -> list[str]:
    """An end-of-turn marker that is plain text, not one special token (a custom "<|END|>", a
    tokenizer without the family's specials): what the template writes after *every* assistant
    turn, the middle ones and the last one alike; trailing whitespace is not part of it."""
    marker = os.path.commonprefix([after_middle, after_last]).rstrip()
    return [marker] if marker else []


def _special_strings(tok) -> list[str]:
    out = list(getattr(tok, "all_special_tokens", []) or [])
    dec = getattr(tok, "added_tokens_decoder", None) or {}
    out += [str(t) for t in dec.values()]
    return out


def render(tokenizer, template: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


def apply_template(tokenizer, chat: ChatTemplate | str):
    """Make the tokenizer carry the training template so save_pretrained writes it (and its sha256).

    Training ranks pass ``prepared.chat_template`` (the text); the data stage passes its ChatTemplate.
    """
    text = chat if isinstance(chat, str) else chat.text
    tokenizer.chat_template = text
    tokenizer.init_kwargs["chat_template_sha256"] = template_sha256(text)
    if not isinstance(chat, str) and chat.system == "folded":
        tokenizer.init_kwargs["chat_template_system"] = "folded into the first user turn"
    return tokenizer


def syntax_error_at(name: str, text: str, e: Exception) -> str | None:
    """NAME:LINE:COLUMN of a Jinja syntax error. Jinja gives only the line; the column is where parsing of
    that line, cut short, first gives the same error (a binary search: ~log2(line length) compiles)."""
    import jinja2

    if not isinstance(e, jinja2.TemplateSyntaxError) or not e.lineno:
        return None
    try:  # the environment apply_chat_template compiles with (its extensions, trim/lstrip settings)
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template
    except ImportError:
        return f"{name}:{e.lineno}"

    lines = text.split("\n")
    if e.lineno > len(lines):
        return f"{name}:{e.lineno}"
    head, line = "".join(ln + "\n" for ln in lines[:e.lineno - 1]), lines[e.lineno - 1]

    def same(c: int) -> bool:
        try:
            _cached_compile_jinja_template(head + line[:c])
        except jinja2.TemplateSyntaxError as x:
            return x.message == e.message and x.lineno == e.lineno
        except Exception:  # noqa: BLE001
            return False
        return False

    lo, hi = 0, len(line)
    if not same(hi):
        return f"{name}:{e.lineno}"
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if same(mid) else (mid + 1, hi)
    quoted = re.findall(r"'([^']+)'", e.message or "")
    tok = quoted[-1] if quoted else ""
    col = lo - len(tok) + 1 if tok and line[:lo].endswith(tok) else max(lo, 1)
    return f"{name}:{e.lineno}:{col}"


def _msg(role: str, i: int) -> dict:
    return {"role": role, "content": sentinel(i)}


def _short(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


class _PlainTokenizer:
    """Stand-in when validate runs without a tokenizer: renders templates with generic special tokens."""

    bos_token, eos_token = "<s>", "</s>"
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}
    all_special_tokens = ["<s>", "</s>"]
    added_tokens_decoder: dict = {}

    def apply_chat_template(self, messages, chat_template: str, tokenize: bool = False, **kw):
        from transformers.utils.chat_template_utils import render_jinja_template

        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = messages if batched else [messages]
        out, _ = render_jinja_template(conversations=convs, chat_template=chat_template, bos_token=self.bos_token,
                                       eos_token=self.eos_token, tools=kw.get("tools"),
                                       add_generation_prompt=kw.get("add_generation_prompt", False))
        return out if batched else out[0]


def plain_tokenizer():
    return _PlainTokenizer()


def _where(tokenizer) -> str:
    path = getattr(tokenizer, "name_or_path", "") if tokenizer is not None else ""
    return f" in {path}" if path else ""
