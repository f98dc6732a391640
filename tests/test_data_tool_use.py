"""Tool-use rows (function calling): the assistant's tool calls are rendered by the chat template from
structured fields, tool results are context. Checked against verbatim templates that support tools."""
from __future__ import annotations

import json

import pytest
from test_data_real_templates import FAMILIES, template, tokenizer_for
from test_data_templates import encode, split_examples, trained_runs

from job import specload
from job.data import formats, readers
from job.data.formats import BadRow, Row
from job.data.masks import fold_system

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call0001a", "type": "function",  # Mistral's template insists on 9 alphanumerics
        "function": {"name": "get_weather", "arguments": {"city": "Madrid"}}}
CONV = [
    {"role": "system", "content": "Eres un asistente con herramientas."},
    {"role": "user", "content": "¿Qué tiempo hace en Madrid?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp_c": 21, "sky": "despejado"}', "name": "get_weather", "tool_call_id": "call0001a"},
    {"role": "assistant", "content": "En Madrid hace 21 °C y está despejado."},
    {"role": "user", "content": "Gracias"},
    {"role": "assistant", "content": "¡De nada!"},
]
# templates that render tool_calls from the structured field
TOOL_FAMILIES = ["qwen2_5", "qwen3", "llama3_1", "llama3_2", "mistral_small3_2", "mistral_nemo"]
# Mistral puts [AVAILABLE_TOOLS] before the LAST user message: a later user turn moves it, so only
# conversations with one user turn keep each assistant turn's prompt a prefix of the whole
PREFIX_UNSTABLE = {"mistral_small3_2", "mistral_nemo"}


@pytest.fixture(scope="module")
def base_tokenizer():
    from job import tiny

    return tiny.build_tokenizer()


def reference(tok, family, conv, tools):
    plain = [{k: v for k, v in m.items() if k != "train"} for m in conv]
    out = tok.apply_chat_template(plain, chat_template=template(family), tools=tools, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_tool_rows(base_tokenizer, family, convs):
    tok = tokenizer_for(base_tokenizer, family)
    chat, enc, _ = encode(tok, family, template(family), [CONV[1:2] + CONV[4:5]])
    return tok, chat, enc.encode([Row(f"mem:{k}", c, tools=[WEATHER]) for k, c in enumerate(convs, 1)], keep_text=True)


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tool_calls_are_trained_tool_results_and_prompts_are_not(base_tokenizer, family):
    convs = [CONV[:5], CONV]
    tok, chat, out = encode_tool_rows(base_tokenizer, family, convs)
    if family in PREFIX_UNSTABLE:  # reported with the reason, never masked wrongly
        assert [b.where for b in out.bad] == ["mem:2"] and "cannot delimit assistant message" in out.bad[0].problem
        convs = convs[:1]
    else:
        assert not out.bad, out.bad
    _, end = FAMILIES[family][2]
    for (ids, labels), conv in zip(split_examples(out), convs, strict=True):
        shown = fold_system(conv) if chat.system == "folded" else conv  # Mistral Nemo: system into user
        assert ids == reference(tok, family, shown, [WEATHER])  # exactly what inference-time rendering gives
        runs = trained_runs(tok, ids, labels)
        assert len(runs) == sum(m["role"] == "assistant" for m in conv), runs
        assert "get_weather" in runs[0] and "Madrid" in runs[0]  # the call the model must learn to emit
        assert runs[1].strip().startswith("En Madrid hace 21")
        assert all(r.rstrip().endswith(end) for r in runs)
        trained = "".join(runs)
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] not in trained  # system, user and tool results are context only
        assert "Current weather in a city" not in trained  # the tool schema is prompt


def test_a_template_that_ignores_tool_calls_is_a_bad_row_not_an_empty_trained_turn(base_tokenizer):
    # Granite 3.3 renders only the content: an assistant turn with tool_calls would become an empty turn
    _, _, out = encode_tool_rows(base_tokenizer, "granite3_3", [CONV[:5]])
    assert [b.where for b in out.bad] == ["mem:1"] and "does not render the tool_calls" in out.bad[0].problem


def test_tool_rows_are_read_from_openai_and_sharegpt_style_files(tmp_path):
    p = tmp_path / "tools.jsonl"
    openai = {"tools": json.dumps([WEATHER]), "messages": [
        {"role": "user", "content": "Tiempo en Madrid"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Madrid"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"temp_c": 21}},
        {"role": "assistant", "content": "21 °C"}]}
    bad_args = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (openai, bad_args)) + "\n")
    spec = specload.build(overrides={"data.path": str(p)})
    row, bad = formats.read_rows(readers.expand(str(p), tmp_path), spec.data, spec.model)
    assert isinstance(row, Row), row
    assert row.tools == [WEATHER]
    assert row.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Madrid"}}}]}
    assert row.messages[2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "c1"}
    assert isinstance(bad, BadRow) and bad.field == "messages[1].tool_calls[0].function.arguments"
    assert "not valid JSON" in bad.problem

    # OpenAI omits content on a turn that only calls tools: the calls are kept (they were dropped, and the
    # turn trained as empty), and calls that are not a list are a bad row
    no_content = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL]}]}
    not_a_list = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "oops"}]}
    p.write_text("\n".join(json.dumps(r) for r in (no_content, not_a_list)) + "\n")
    row, bad = formats.read_rows(readers.expand(str(p), tmp_path), spec.data, spec.model)
    assert isinstance(row, Row) and row.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert isinstance(bad, BadRow) and bad.field == "messages[1].tool_calls" and "list" in bad.problem

    g = tmp_path / "glaive.jsonl"  # ShareGPT exports of function-calling sets: function_call / observation
    g.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "Tiempo en Madrid"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Madrid"}}'},
        {"from": "observation", "value": '{"temp_c": 21}'},
        {"from": "gpt", "value": "21 °C"}], "tools": json.dumps([WEATHER])}) + "\n")
    [row] = formats.read_rows(readers.expand(str(g), tmp_path), spec.data, spec.model)
    assert [m["role"] for m in row.messages] == ["user", "assistant", "tool", "assistant"]
    assert row.tools == [WEATHER]


def test_a_template_without_tool_support_or_prefix_stability_is_a_bad_row_not_a_crash(base_tokenizer):
    from job.data.templates import BUILTINS

    tok = tokenizer_for(base_tokenizer, "qwen2_5")
    # Mistral v0.1's built-in raises on the tool role: the row is reported, the batch goes on
    _, enc, _ = encode(tok, "mistral", BUILTINS["mistral"][0], [CONV[1:3]])
    out = enc.encode([Row("mem:7", CONV[1:], tools=[WEATHER]),
                      Row("mem:8", [CONV[1], {"role": "assistant", "content": "hola"}])])
    assert [b.where for b in out.bad] == ["mem:7"] and "rejects" in out.bad[0].problem
    assert len(out.lengths) == 1
