"""Evaluation pieces without training: scoring, schema checks, prompts, the gate, the report, and the
config checks that stop an impossible eval section before any training starts."""
import json
from pathlib import Path

import pytest

from job import cli, evalreport, evaluate, spec, tiny
from job.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "catalog" / "schema.json"
GOOD = '{"nombre": "taza", "categoria": "cocina", "color": "gris", "precio": 8.5}'


@pytest.fixture(scope="module")
def tok():
    t = tiny.build_tokenizer()
    return t


def test_scores_count_valid_json_schema_valid_exact_and_normalised_matches():
    schema = evalreport.load_schema(str(SCHEMA))
    answers = [GOOD, '{"color": "gris", "precio": 8.5, "nombre": "taza", "categoria": "cocina"}',
               '{"nombre": "taza", "categoria": "juguetes", "color": "gris", "precio": 8.5}', '{"nombre": "taza"',
               "```json\n" + GOOD + "\n```"]
    m = evalreport.score(answers, [GOOD] * 5, schema)
    assert m["n"] == 5
    assert m["json_valid"] == 4 / 5  # the truncated one is not JSON; one ```json fence is tolerated
    assert m["schema_valid"] == 3 / 5  # "juguetes" is not a category
    assert m["exact_match"] == 1 / 5
    assert m["normalized_match"] == 3 / 5  # key order and the fence do not matter; values do


def test_normalised_match_ignores_case_punctuation_and_spacing_but_not_words():
    assert evalreport.normalise("  La capital es MADRID. ") == evalreport.normalise("la capital es madrid")
    assert evalreport.normalise("Madrid") != evalreport.normalise("Roma")
    assert evalreport.normalise('{"a": 1, "b": [2]}') == evalreport.normalise('{"b":[2],"a":1}')


def test_answers_without_reference_still_get_json_scores():
    m = evalreport.score(["{}", "no"], [None, None], None)
    assert m["json_valid"] == 0.5 and "exact_match" not in m and "schema_valid" not in m


def test_schema_checker_reports_what_is_wrong_and_where():
    schema = evalreport.load_schema(str(SCHEMA))
    errs = evalreport.schema_errors({"nombre": "", "categoria": "ropa", "precio": -1, "talla": "M"}, schema)
    text = " | ".join(errs)
    for what in ("color", "talla", "precio", "nombre"):
        assert what in text, errs
    assert evalreport.schema_errors(json.loads(GOOD), schema) == []
    assert evalreport.schema_errors(True, {"type": "integer"}) and not evalreport.schema_errors(3, {"type": "number"})


def test_a_schema_that_is_not_json_or_not_a_json_schema_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        evalreport.load_schema(str(bad))
    bad.write_text(json.dumps({"type": "object", "required": "a"}))
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        evalreport.load_schema(str(bad))


def test_full_json_schema_keywords_are_checked():
    schema = {"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
    assert evalreport.schema_errors({"a": 1}, schema) == []
    assert evalreport.schema_errors({"a": 1, "b": 2}, schema)


@pytest.mark.parametrize("eval_section, data, match", [
    ({"num_prompts": 4}, {}, "no.*eval split|there is none"),
    ({"max_loss": 1.0}, {}, "no eval split"),
    ({"min_json_valid": 0.9}, {"eval_split": 0.1}, "no prompts"),
    ({"json_schema": str(SCHEMA)}, {"eval_split": 0.1}, "no prompts"),
])
def test_eval_section_that_can_never_be_met_is_rejected_before_training(eval_section, data, match):
    s = spec.RunSpec.model_validate({"eval": eval_section, "data": {"path": "x.jsonl", **data}})
    with pytest.raises(ConfigError, match=match):
        evaluate.check(s)


def test_run_with_an_impossible_gate_exits_64_before_fetching_anything(tmp_path, capsys):
    rc = cli.main(["run", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                   "--output", str(tmp_path / "out"), "--min-json-valid", "0.9"])
    assert rc == 64
    assert "min_json_valid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prompts_file_rows_render_with_the_generation_prompt_and_keep_references(tok, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Capital de Perú?"},
                      {"role": "assistant", "content": "Lima."}]},
        {"prompt": "¿Cuánto es 2 más 2?", "completion": "4"},
        {"prompt": "Hola"},
    ]) + "\n")
    s = spec.RunSpec.model_validate({"eval": {"prompts": str(f)}, "cache_dir": str(tmp_path / "cache")})
    ps = evaluate.prompts_from_file(s, tok)
    assert [p.reference for p in ps] == ["Lima.", "4", None]
    assert all(p.text.endswith("<|im_start|>assistant\n") for p in ps)
    assert "Lima" not in ps[0].text and "<|im_start|>system\nSé breve." in ps[0].text
    assert tok.decode(ps[1].ids) == ps[1].text


def test_eval_split_prompts_are_cut_before_the_last_trained_answer(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "buenas"},
            {"role": "user", "content": "¿Capital de Perú?"}, {"role": "assistant", "content": "Lima."}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prefix = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
    first = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    n_first = len(tok(first, add_special_tokens=False)["input_ids"])
    labels = [-100] * len(ids)
    for i in list(range(n_first, n_first + 2)) + list(range(n_prefix, len(ids) - 1)):  # two trained spans
        labels[i] = ids[i]
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"input_ids": [ids], "labels": [labels], "position_ids": [list(range(len(ids)))]}), path)
    (p,) = evaluate.prompts_from_eval_split(path, tok, 5)
    assert p.text == prefix and p.ids == ids[:n_prefix]
    assert p.reference == "Lima."


def test_gate_uses_schema_valid_answers_when_a_schema_is_set_and_needs_a_measured_loss():
    s = spec.RunSpec.model_validate({"eval": {"min_json_valid": 0.9, "max_loss": 1.0, "num_prompts": 4},
                                     "data": {"eval_split": 0.1}})
    report = {"generation": {"after": {"json_valid": 1.0, "schema_valid": 0.5}}, "loss": None}
    fails = evaluate.gate(s, report)
    assert fails[0].startswith("schema_valid 50.0% < eval.min_json_valid 90.0%")
    assert "no eval loss was measured" in fails[1]
    report = {"generation": {"after": {"json_valid": 0.95}}, "loss": {"eval_loss": 0.7}}
    assert evaluate.gate(s, report) == []


def test_report_table_shows_base_and_adapter_side_by_side():
    report = {"loss": {"eval_loss": 0.5, "perplexity": 1.6487},
              "generation": {"prompts": 2, "source": "p.jsonl", "max_new_tokens": 8,
                             "before": {"json_valid": 0.0, "exact_match": 0.0},
                             "after": {"json_valid": 1.0, "exact_match": 0.5},
                             "samples": [{"prompt": "P", "reference": "R", "before": "B", "after": "````A"}]},
              "gate": {"checked": True, "passed": False, "failures": ["json_valid low"]}}
    md = evalreport.markdown(report)
    assert "| valid JSON | 0.0% | 100.0% | +100.0 pts |" in md and "| exact match | 0.0% | 50.0% | +50.0 pts |" in md
    assert "| perplexity | — | 1.649 | — |" in md and "Gate: **failed**: json_valid low" in md
    assert md.count("````text") == 4  # samples fenced, a fence inside an answer cannot break out
    assert evalreport.summary(report) == {"eval_loss": 0.5, "perplexity": 1.649, "prompts": 2,
                                        "exact_match": [0.0, 0.5], "json_valid": [0.0, 1.0], "gate": "failed"}
    report["loss"].update(base_eval_loss=2.0, base_perplexity=7.389)
    md = evalreport.markdown(report)
    assert "| eval loss | 2.0000 | 0.5000 | -1.5000 |" in md and "| perplexity | 7.389 | 1.649 | -5.740 |" in md
    assert evalreport.summary(report)["base_eval_loss"] == 2.0


def test_shipped_catalog_prompts_file_limits_to_num_prompts_without_an_eval_split(tok, tmp_path):
    prompts = SCHEMA.parent / "prompts.jsonl"
    s = spec.RunSpec.model_validate({"eval": {"prompts": str(prompts), "num_prompts": 2, "json_schema": str(SCHEMA)},
                                     "cache_dir": str(tmp_path)})
    evaluate.check(s)  # num_prompts limits the file here: no eval split needed
    ps = evaluate.prompts_from_file(s, tok)
    assert len(ps) == 2 and all(json.loads(p.reference)["categoria"] for p in ps)
