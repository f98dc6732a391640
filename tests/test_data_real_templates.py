"""Assistant-only masks against the VERBATIM chat templates of real model families (tests/templates/*.jinja).

Each file's first line is a Jinja comment naming where the text was copied from; everything after it is
the published chat_template byte for byte. The tokenizer is the tiny byte-level BPE with the family's
special tokens registered, so the markup tokenizes as it does for the real model.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_data_templates import CONVERSATIONS, encode, reference_ids, split_examples, trained_runs

from job.data.masks import fold_system

TEMPLATES = Path(__file__).parent / "templates"
CHATML = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
DEEPSEEK = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
COHERE = ["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def strip(content: str, last: bool) -> str:
    return content.strip()


def answer_only(content: str, last: bool) -> str:
    # DeepSeek-R1/V3 keep only what follows </think>, in EVERY turn: reasoning is never rendered, never trained
    return content.split("</think>")[-1]


def qwen3(content: str, last: bool) -> str:
    # Qwen3 drops the reasoning of turns before the last user message (history) and renders the final
    # turn as '<think>\n' + reasoning + '\n</think>\n\n' + answer, i.e. the content itself for our data.
    # A final turn WITHOUT reasoning gets an empty '<think>\n\n</think>\n\n' in front: template scaffolding,
    # not trained (the model at inference writes its own <think> block after '<|im_start|>assistant\n').
    return content if last or "</think>" not in content else content.split("</think>")[-1].lstrip("\n")


def glm(content: str, last: bool) -> str:
    # GLM-4.5 renders '\n<think></think>\n' + stripped answer for history turns; the final turn keeps its
    # reasoning, rewritten as '\n<think>' + reasoning.strip() + '</think>\n' + answer: trained from its <think> on
    answer = content.split("</think>")[-1].strip()
    if last and "</think>" in content:
        return "<think>" + content.split("</think>")[0].split("<think>")[-1].strip() + "</think>\n" + answer
    return answer


# family: (bos, eos, end of turn: middle turns and last turn, extra special tokens, how a content is rendered)
# Quirks, asserted below: gpt-oss ends the last turn with <|return|> (its eos) and earlier ones with <|end|>;
# OLMo 3 ends the last turn with eos_token and earlier ones with <|im_end|>; Command R7B ends every answer with
# <|END_RESPONSE|><|END_OF_TURN_TOKEN|> (eos), both trained; GLM-4.5 has no end-of-turn token at all: the
# model stops by generating the next header (<|user|> is in its generation_config eos_token_id), so that is
# trained after middle turns and nothing after the last; Mistral-Nemo drops the system message unless the
# last message is a user one, so it is folded into the first user turn.
FAMILIES = {
    "qwen2_5": (None, "<|im_end|>", ("<|im_end|>",) * 2, CHATML, None),
    "qwen3": (None, "<|im_end|>", ("<|im_end|>",) * 2, CHATML + ["<think>", "</think>"], qwen3),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", ("<|eot_id|>",) * 2, LLAMA3, strip),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", ("<|eot_id|>",) * 2, LLAMA3, strip),  # strftime_now date
    "deepseek_r1_distill": (DS_BOS, DS_EOS, (DS_EOS,) * 2, DEEPSEEK, answer_only),
    "deepseek_v3": (DS_BOS, DS_EOS, (DS_EOS,) * 2, DEEPSEEK, answer_only),
    "gemma3": ("<bos>", "<eos>", ("<end_of_turn>",) * 2, ["<start_of_turn>", "<end_of_turn>"], strip),
    "phi3_5": ("<s>", "<|endoftext|>", ("<|end|>",) * 2, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None),
    "granite3_3": ("<|end_of_text|>", "<|end_of_text|>", ("<|end_of_text|>",) * 2,
                   ["<|start_of_role|>", "<|end_of_role|>"], None),
    "mistral_nemo": ("<s>", "</s>", ("</s>",) * 2, ["[INST]", "[/INST]"], None),
    "mistral_small3_2": ("<s>", "</s>", ("</s>",) * 2, ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], None),
    "command_r": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ("<|END_OF_TURN_TOKEN|>",) * 2, COHERE, strip),
    "command_r7b": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",) * 2,
                    COHERE + ["<|START_RESPONSE|>", "<|END_RESPONSE|>"], None),
    "gpt_oss": ("<|startoftext|>", "<|return|>", ("<|end|>", "<|return|>"),
                ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>"], None),
    "lfm2": ("<|startoftext|>", "<|im_end|>", ("<|im_end|>",) * 2, CHATML, None),
    "glm4_5": (None, "<|endoftext|>", ("<|user|>", ""), ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                                                        "<|observation|>", "<think>", "</think>"], glm),
    "falcon3": (None, "<|endoftext|>", ("<|endoftext|>",) * 2, ["<|system|>", "<|user|>", "<|assistant|>"], None),
    "olmo3": (None, "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), CHATML, None),
}
EOS_TOKENS = {"command_r7b": ["<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>"], "gpt_oss": ["<|end|>", "<|return|>"],
              "olmo3": ["<|im_end|>", "<|endoftext|>"]}  # describe()'s list where it is not just the end-of-turn
FOLDED = {"mistral_nemo"}

WHITESPACE = [{"role": "system", "content": "  Sé breve.  "},
              {"role": "user", "content": "\n hola  "},
              {"role": "assistant", "content": "\n\n  ¡Hola! 👋  \n"},
              {"role": "user", "content": "adiós"},
              {"role": "assistant", "content": "  Chao.\t"}]
REASONING = [{"role": "user", "content": "¿2+2?"},
             {"role": "assistant", "content": "<think>\nsumo dos y dos\n</think>\n\nSon 4."},
             {"role": "user", "content": "¿Y 3+3?"},
             {"role": "assistant", "content": "<think>\ntres y tres\n</think>\n\nSon 6. 😀"}]


def test_every_template_file_is_covered_and_names_its_source():
    files = sorted(TEMPLATES.glob("*.jinja"))
    assert sorted(f.stem for f in files) == sorted(FAMILIES)
    assert all(f.read_text().startswith("{# source: ") for f in files)


def template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8").split("\n", 1)[1]


@pytest.fixture(scope="module")
def base_tokenizer():
    from job import tiny

    return tiny.build_tokenizer()


def tokenizer_for(base, family: str):
    bos, eos, _, extra, _ = FAMILIES[family]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {}),
                            "additional_special_tokens": sorted(set(extra) | {eos} | ({bos} if bos else set()))})
    return tok


def check(tok, family: str, convs: list[list[dict]]):
    text = template(family)
    _, _, (mid, last), _, shown = FAMILIES[family]
    chat, _, out = encode(tok, family, text, convs)
    assert not out.bad, out.bad
    assert chat.eos_tokens == EOS_TOKENS.get(family, [mid])
    assert chat.system == ("folded" if family in FOLDED else "native")
    for (ids, labels), conv in zip(split_examples(out), convs, strict=True):
        # input_ids: exactly apply_chat_template(tokenize=True) with its defaults (dates, enable_thinking)
        assert ids == reference_ids(tok, text, fold_system(conv) if family in FOLDED else conv)
        runs = trained_runs(tok, ids, labels)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert runs == [(shown(c, k == len(answers) - 1) if shown else c) + (last if k == len(answers) - 1 else mid)
                        for k, c in enumerate(answers)]
        for m in conv:
            if m["role"] != "assistant":
                assert not any(m["content"].strip() in r for r in runs), (m, runs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_each_assistant_content_and_its_end_of_turn_are_trained(base_tokenizer, family):
    check(tokenizer_for(base_tokenizer, family), family, CONVERSATIONS + [WHITESPACE])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_assistant_turns_with_reasoning_train_what_the_template_renders(base_tokenizer, family):
    check(tokenizer_for(base_tokenizer, family), family, [REASONING])


@pytest.mark.parametrize("policy,expected", [
    ("turn", ["4<|end|>", "6<|end|>", "Sí: 6.<|return|>"]),
    ("last", ["4", "6", "Sí: 6.<|return|>"]),
])
def test_gpt_oss_trains_end_on_earlier_turns_and_return_on_the_last(base_tokenizer, policy, expected):
    tok = tokenizer_for(base_tokenizer, "gpt_oss")
    _, _, out = encode(tok, "gpt_oss", template("gpt_oss"), CONVERSATIONS[2:], train_on_eos=policy)
    ids, labels = next(split_examples(out))
    assert trained_runs(tok, ids, labels) == expected
