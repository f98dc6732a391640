"""Chat templates of real model families: input_ids identical to apply_chat_template, assistant-only labels.

Each family's template is written out from its published tokenizer_config.json; the tokenizers are the
built-in tiny byte-level BPE (plus a SentencePiece-style Metaspace one) with that family's special tokens.
"""
from __future__ import annotations

import copy
import json
import re

import pytest

from job.data.formats import Row
from job.data.masks import IGNORE, Encoder, fold_system
from job.data.templates import BUILTINS, apply_template, describe

MISTRAL_V3 = (  # system message goes into the LAST user turn: rendering is not prefix-stable
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}{%- endfor %}"
)
PHI3_ORIGINAL = (  # starts with bos_token and silently leaves the system message out
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
)

# family: (template, bos, eos, end-of-turn, extra special tokens)
FAMILIES = {
    "chatml": (BUILTINS["chatml"][0], "<s>", "<|im_end|>", "<|im_end|>", []),
    "llama2": (BUILTINS["llama2"][0], "<s>", "</s>", "</s>", ["[INST]", "[/INST]"]),
    "llama3": (BUILTINS["llama3"][0], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": (BUILTINS["mistral"][0], "<s>", "</s>", "</s>", ["[INST]", "[/INST]"]),
    "mistral_v3": (MISTRAL_V3, "<s>", "</s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": (BUILTINS["gemma"][0], "<bos>", "<eos>", "<end_of_turn>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": (BUILTINS["phi3"][0], "<s>", "<|endoftext|>", "<|end|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi3_original": (PHI3_ORIGINAL, "<s>", "<|endoftext|>", "<|end|>", ["<|user|>", "<|assistant|>", "<|end|>"]),
    "zephyr": (BUILTINS["zephyr"][0], "<s>", "</s>", "</s>", ["<|system|>", "<|user|>", "<|assistant|>"]),
    "alpaca": (BUILTINS["alpaca"][0], "<s>", "</s>", "</s>", []),
    "vicuna": (BUILTINS["vicuna"][0], "<s>", "</s>", "</s>", []),
    "chatml_generation": (CHATML_GENERATION, "<s>", "<|im_end|>", "<|im_end|>", []),
}

CONVERSATIONS = [
    [{"role": "system", "content": "Eres un asistente breve."},
     {"role": "user", "content": "¿Cuál es la capital de Francia?  "},
     {"role": "assistant", "content": " La capital de Francia es París.\n"},
     {"role": "user", "content": "¿Y de Italia?"},
     {"role": "assistant", "content": "Roma, claro. 🇮🇹"}],
    [{"role": "user", "content": "Di 'hola' en inglés."},
     {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "y 3 + 3?"}, {"role": "assistant", "content": "6"},
     {"role": "user", "content": "¿Seguro? La respuesta es 6"}, {"role": "assistant", "content": "Sí: 6."}],
]


@pytest.fixture(scope="session")
def base_tokenizer():
    from job import tiny

    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """SentencePiece-style (Metaspace, '▁' word prefix) like Llama-2/Mistral: prefixes tokenize differently."""
    return build_metaspace_tokenizer()


def build_metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from job import tiny

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()])
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tok.train_from_iterator(tiny._corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    return fast


def family_tokenizer(base, family: str):
    template, bos, eos, _, extra = FAMILIES[family]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos,
                            "additional_special_tokens": sorted(set(extra) | {bos, eos})})
    tok.chat_template = template
    return tok


def encode(tok, template_name: str, template: str, convs, **kw):
    chat = describe(template_name, template, tok)
    enc = Encoder(tok, chat, kw.pop("max_length", 4096), kw.pop("truncation", "truncate_right"), kw.pop("train_on_eos", "turn"))
    rows = [Row(f"mem:{i + 1}", c) for i, c in enumerate(convs)]
    return chat, enc, enc.encode(rows, keep_text=True)


def split_examples(out):
    pos = 0
    for n in out.lengths.tolist():
        yield out.ids[pos:pos + n].tolist(), out.labels[pos:pos + n].tolist()
        pos += n


def trained_runs(tok, ids, labels) -> list[str]:
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=False):
        if lab != IGNORE:
            assert lab == i, "a trained label must be the token itself"
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def reference_ids(tok, template: str, messages) -> list[int]:
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_input_ids_equal_apply_chat_template_and_only_assistant_content_plus_end_of_turn_is_trained(base_tokenizer, family):
    tok = family_tokenizer(base_tokenizer, family)
    template, _, _, eot, _ = FAMILIES[family]
    chat, enc, out = encode(tok, family, template, CONVERSATIONS)
    assert not out.bad, out.bad
    assert eot in chat.eos_tokens
    assert_exact(tok, template, chat, out, eot)


def assert_exact(tok, template, chat, out, eot):
    """input_ids as apply_chat_template; trained = each assistant content + end-of-turn; nothing else."""
    for (ids, labels), conv in zip(split_examples(out), CONVERSATIONS, strict=True):
        rendered = fold_system(conv) if chat.system == "folded" else conv
        assert ids == reference_ids(tok, template, rendered)
        runs = trained_runs(tok, ids, labels)
        assistants = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(assistants)
        for run, content in zip(runs, assistants, strict=True):
            # exactly the content (as the template renders it) and the end-of-turn token; at most one
            # leading space that the tokenizer merged into the content's first token
            assert re.fullmatch(r"\s?" + re.escape(content.strip()) + r"\s*" + re.escape(eot), run), (run, content)
        for m in conv:
            if m["role"] != "assistant":
                assert not any(m["content"].strip() in r for r in runs)


@pytest.mark.parametrize("family", ["gemma", "mistral", "phi3_original", "mistral_v3"])
def test_templates_without_a_system_role_get_it_folded_into_the_first_user_turn(base_tokenizer, family):
    tok = family_tokenizer(base_tokenizer, family)
    chat, _, out = encode(tok, family, FAMILIES[family][0], CONVERSATIONS[:1])
    assert chat.system == "folded" and chat.notes
    text = out.rendered[0][0]
    assert "Eres un asistente breve.\n\n¿Cuál es la capital de Francia?" in text


def test_assistant_only_loss_masks_user_turns_for_llama3_template(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "llama3")
    _, _, out = encode(tok, "llama3", FAMILIES["llama3"][0], CONVERSATIONS[2:])
    ids, labels = next(split_examples(out))
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert trained_runs(tok, ids, labels) == ["4<|eot_id|>", "6<|eot_id|>", "Sí: 6.<|eot_id|>"]


def test_sentencepiece_style_tokenizer_masks_are_exact_for_llama2_and_mistral(metaspace_tokenizer):
    tok = metaspace_tokenizer
    for name in ("llama2", "mistral"):
        template = BUILTINS[name][0]
        chat, _, out = encode(tok, name, template, CONVERSATIONS)
        assert not out.bad
        for (ids, labels), conv in zip(split_examples(out), CONVERSATIONS, strict=True):
            rendered = fold_system(conv) if chat.system == "folded" else conv
            assert ids == reference_ids(tok, template, rendered)
            runs = trained_runs(tok, ids, labels)
            assistants = [m["content"].strip() for m in conv if m["role"] == "assistant"]
            assert [r.replace("</s>", "").strip() for r in runs] == assistants
            assert all(r.endswith("</s>") for r in runs)


def test_generation_markers_and_located_spans_agree(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "chatml_generation")
    _, enc, out = encode(tok, "custom", CHATML_GENERATION, CONVERSATIONS)
    assert enc.markers and not out.bad
    ref = tok.apply_chat_template(CONVERSATIONS[1], chat_template=CHATML_GENERATION, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, labels = next(split_examples(encode(tok, "custom", CHATML_GENERATION, CONVERSATIONS[1:2])[2]))
    assert [int(lab != IGNORE) for lab in labels] == list(ref["assistant_masks"])


def test_template_that_rejects_non_alternating_roles_reports_the_row(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "llama2")
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    _, _, out = encode(tok, "llama2", FAMILIES["llama2"][0], [CONVERSATIONS[1], conv])
    assert len(out.lengths) == 1
    assert [b.where for b in out.bad] == ["mem:2"]
    assert "must alternate" in out.bad[0].problem


def test_unknown_template_name_is_a_config_error_and_missing_file_is_not_found(tmp_path):
    from job import specload
    from job.data.templates import resolve_template
    from job.errors import ConfigError, NotFoundError

    with pytest.raises(ConfigError, match="unknown built-in"):
        resolve_template(specload.build(overrides={"model.chat_template": "chatmlx"}), None)
    with pytest.raises(NotFoundError):
        resolve_template(specload.build(overrides={"model.chat_template": str(tmp_path / "none.jinja")}), None)
    f = tmp_path / "t.jinja"
    f.write_text(BUILTINS["zephyr"][0])
    chat = resolve_template(specload.build(overrides={"model.chat_template": str(f)}), family_tokenizer_plain())
    assert chat.eos_tokens == ["</s>"] and chat.name == str(f)


def family_tokenizer_plain():
    from job.data.templates import plain_tokenizer

    return plain_tokenizer()


def test_template_and_sha256_are_saved_with_the_tokenizer(base_tokenizer, tmp_path):
    tok = copy.deepcopy(base_tokenizer)
    chat = describe("llama3", BUILTINS["llama3"][0], tok)
    apply_template(tok, chat)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == chat.text
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template_sha256"] == chat.sha256


@pytest.mark.parametrize("policy,expected", [
    ("turn", ["4<|im_end|>", "6<|im_end|>", "Sí: 6.<|im_end|>"]),
    ("last", ["4", "6", "Sí: 6.<|im_end|>"]),
    ("none", ["4", "6", "Sí: 6."]),
])
def test_train_on_eos_policies_choose_which_end_of_turn_tokens_are_trained(base_tokenizer, policy, expected):
    tok = family_tokenizer(base_tokenizer, "chatml")
    _, _, out = encode(tok, "chatml", BUILTINS["chatml"][0], CONVERSATIONS[2:], train_on_eos=policy)
    ids, labels = next(split_examples(out))
    assert trained_runs(tok, ids, labels) == expected


def test_per_message_train_false_leaves_that_assistant_turn_untrained(base_tokenizer):
    tok = family_tokenizer(base_tokenizer, "gemma")
    conv = [dict(m) for m in CONVERSATIONS[2]]
    conv[3]["train"] = False
    _, _, out = encode(tok, "gemma", BUILTINS["gemma"][0], [conv])
    ids, labels = next(split_examples(out))
    assert trained_runs(tok, ids, labels) == ["4<end_of_turn>", "Sí: 6.<end_of_turn>"]
    assert out.turns.tolist() == [2]


def test_apply_template_accepts_the_prepared_template_text(base_tokenizer):
    tok = copy.deepcopy(base_tokenizer)
    apply_template(tok, BUILTINS["phi3"][0])
    assert tok.chat_template == BUILTINS["phi3"][0]
    assert tok.init_kwargs["chat_template_sha256"] == describe("phi3", BUILTINS["phi3"][0], tok).sha256


PLAIN_TEXT_MARKERS = (  # a custom template whose end-of-turn marker is ordinary text, several BPE tokens
    "{% for message in messages %}{{ '### ' + message['role'] | upper + ':\n' + message['content'] + ' <|END|>\n\n' }}"
    "{% endfor %}"
)


@pytest.mark.parametrize("template,eot", [
    (PLAIN_TEXT_MARKERS, "<|END|>"),
    (BUILTINS["llama3"][0], "<|eot_id|>"),  # Llama 3 on a tokenizer that lacks the Llama 3 special tokens
    (BUILTINS["gemma"][0], "<end_of_turn>"),
])
def test_an_end_of_turn_marker_that_is_plain_text_is_still_trained(base_tokenizer, template, eot):
    tok = copy.deepcopy(base_tokenizer)
    assert eot not in tok.all_special_tokens and eot not in tok.get_vocab()
    chat, _, out = encode(tok, "my-template.jinja", template, CONVERSATIONS)
    assert chat.eos_tokens == [eot]
    assert not out.bad
    assert_exact(tok, template, chat, out, eot)


def test_a_template_with_no_end_of_turn_marker_trains_the_content_only(base_tokenizer):
    template = ("{% for message in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
                "{{ message['role'] + ': ' + message['content'] }}{% endfor %}")
    chat, _, out = encode(copy.deepcopy(base_tokenizer), "bare.jinja", template, CONVERSATIONS[2:])
    assert chat.eos_tokens == [] and any("no end-of-turn" in n for n in chat.notes)
    ids, labels = next(split_examples(out))
    assert [r.strip() for r in trained_runs(base_tokenizer, ids, labels)] == ["4", "6", "Sí: 6."]


def test_a_template_that_rewrites_contents_is_masked_by_rendering_not_rejected(base_tokenizer):
    # contents cannot be found verbatim (upper-cased, newlines folded), so turns are delimited by
    # diffing against a rendering where the turn is a placeholder
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{% if m['role'] == 'assistant' %}{{ m['content'] | upper | replace('\n', ' ') }}"
                "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}")
    tok = family_tokenizer(base_tokenizer, "chatml")
    conv = [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "línea uno\nlínea dos"},
            {"role": "user", "content": "¿y?"}, {"role": "assistant", "content": "fin"}]
    chat, _, out = encode(tok, "shout.jinja", template, [conv])
    assert not out.bad, out.bad
    ids, labels = next(split_examples(out))
    assert ids == reference_ids(tok, template, conv)
    assert trained_runs(tok, ids, labels) == ["LÍNEA UNO LÍNEA DOS<|im_end|>", "FIN<|im_end|>"]
