"""The recipes in examples/: each one validates as a RunSpec and plans offline from the config.json
shipped beside it (published shapes, no weights), with the topology and memory its case asks for."""
import json
from pathlib import Path

import pytest

from job import cli, evalreport, evaluate, specload

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: recipe → (shipped model config, published parameter count)
RECIPES = {
    "smol-course-es.yaml": ("SmolLM2-135M-Instruct.json", 134.5e6),
    "gemma-chatml.yaml": ("gemma-2b.json", 2.506e9),
    "llama3-8b-zero3.yaml": ("Llama-3.1-8B.json", 8.03e9),
    "qwen-7b-qlora.yaml": ("Qwen2.5-7B-Instruct.json", 7.62e9),
    "catalog-json.yaml": ("Qwen2.5-0.5B-Instruct.json", 0.494e9),
    "tools-qwen.yaml": ("Qwen2.5-0.5B-Instruct.json", 0.494e9),
    "dpo-smol-es.yaml": ("SmolLM2-135M-Instruct.json", 134.5e6),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name repo files (the catalog schema) relative to the root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)


def _plan(recipe: str, capsys) -> dict:
    config = EXAMPLES / "configs" / RECIPES[recipe][0]
    capsys.readouterr()
    assert cli.main(["plan", "--config", str(EXAMPLES / recipe), "--model-config", str(config), "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_every_yaml_in_examples_is_a_listed_recipe():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_validates_and_its_eval_section_is_satisfiable(recipe):
    s = specload.build(EXAMPLES / recipe)
    assert s.model.path and s.data_sources() and s.output.uri
    evaluate.check(s)  # raises on an eval section that could never be met
    assert evaluate.wanted(s)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_plans_offline_with_the_published_model_size(recipe, capsys):
    plan = _plan(recipe, capsys)
    assert plan["base_params"] == pytest.approx(RECIPES[recipe][1], rel=0.01)
    assert 0 < plan["trainable_params"] < plan["base_params"]
    assert plan["memory_gb_per_gpu"]["total"] > 0


def test_llama3_recipe_is_two_nodes_of_eight_gpus_with_zero3_packing_and_30_minute_checkpoints(capsys):
    s = specload.build(EXAMPLES / "llama3-8b-zero3.yaml")
    assert s.data.packing and s.resilience.save_minutes == 30 and s.train.lora_r == 16
    assert s.train.target_modules == "all-linear"
    plan = _plan("llama3-8b-zero3.yaml", capsys)
    assert (plan["nodes"], plan["gpus_per_node"], plan["processes"]) == (2, 8, 16)
    assert plan["strategy"] == "deepspeed" and plan["zero_stage"] == 3
    assert plan["memory_gb_per_gpu"]["weights"] < 1.5  # 16 GB of bf16 weights sharded 16 ways
    assert plan["memory_gb_per_gpu"]["total"] < 40


def test_qwen_qlora_recipe_fits_one_24gb_gpu(capsys):
    plan = _plan("qwen-7b-qlora.yaml", capsys)
    assert plan["method"] == "qlora" and plan["processes"] == 1
    mem = plan["memory_gb_per_gpu"]
    assert 4 < mem["weights"] < 7  # NF4 linears + bf16 embeddings/lm_head, not 15 GB of bf16
    assert mem["total"] < 22  # headroom on a 24 GB card


def test_gemma_recipe_trains_and_saves_embeddings_with_the_adapter(capsys):
    s = specload.build(EXAMPLES / "gemma-chatml.yaml")
    assert s.model.chat_template == "chatml" and set(s.train.modules_to_save) == {"embed_tokens", "lm_head"}
    plan = _plan("gemma-chatml.yaml", capsys)
    assert plan["trainable_params"] > 256000 * 2048  # the (tied) embedding matrix is trained in full


def test_catalog_recipe_gates_on_schema_valid_json_and_its_sample_rows_satisfy_the_schema():
    s = specload.build(EXAMPLES / "catalog-json.yaml")
    assert s.eval.min_json_valid == 0.95 and s.eval.json_schema
    schema = evalreport.load_schema(s.eval.json_schema)
    for line in (EXAMPLES / "catalog" / "sample.jsonl").read_text().splitlines():
        answer = json.loads(line)["messages"][-1]["content"]
        assert evalreport.schema_errors(json.loads(answer), schema) == [], answer


def test_readmes_list_every_recipe():
    for readme in (EXAMPLES / "README.md", ROOT / "README.md"):
        text = readme.read_text()
        for recipe in RECIPES:
            assert recipe in text, (readme, recipe)


def test_the_tool_use_sample_rows_train_the_calls_and_answers_with_qwens_template():
    import copy

    from test_data_real_templates import template, tokenizer_for
    from test_data_templates import encode, split_examples, trained_runs

    from job import tiny
    from job.data import formats, readers

    s = specload.build(overrides={"data.path": str(EXAMPLES / "tools" / "sample.jsonl")})
    rows = list(formats.read_rows(readers.expand(s.data.path, ROOT), s.data, s.model))
    assert all(isinstance(r, formats.Row) for r in rows), rows
    tok = tokenizer_for(copy.deepcopy(tiny.build_tokenizer()), "qwen2_5")
    _, enc, _ = encode(tok, "qwen2_5", template("qwen2_5"), [rows[2].messages])
    out = enc.encode(rows)
    assert not out.bad, out.bad
    runs = [trained_runs(tok, ids, labels) for ids, labels in split_examples(out)]
    assert [len(r) for r in runs] == [2, 2, 1]
    assert runs[1][0].count("<tool_call>") == 2 and '"amount": 50' in runs[1][0]  # both calls, one turn
    assert all(r[-1].endswith("<|im_end|>") for r in runs)


def test_dpo_recipe_plans_two_sequences_per_pair_and_a_reference_without_extra_weights(capsys):
    s = specload.build(EXAMPLES / "dpo-smol-es.yaml")
    assert s.train.objective == "dpo" and s.eval.min_reward_accuracy is not None
    plan = _plan("dpo-smol-es.yaml", capsys)
    assert plan["objective"] == "dpo" and plan["sequences_per_row"] == 2
    assert "adapter disabled" in plan["reference"] and plan["memory_gb_per_gpu"]["reference"] == 0
    config = EXAMPLES / "configs" / "SmolLM2-135M-Instruct.json"
    sft = cli.main(["plan", "--config", str(EXAMPLES / "dpo-smol-es.yaml"), "--model-config", str(config),
                    "--objective", "sft", "--json"])
    out = capsys.readouterr().out
    assert sft == 0
    sft_plan = json.loads(out[out.index("{"):])
    assert plan["memory_gb_per_gpu"]["activations"] == pytest.approx(2 * sft_plan["memory_gb_per_gpu"]["activations"], rel=0.01)
    full = cli.main(["plan", "--config", str(EXAMPLES / "dpo-smol-es.yaml"), "--model-config", str(config),
                     "--method", "full", "--json"])
    out = capsys.readouterr().out
    assert full == 0
    assert json.loads(out[out.index("{"):])["memory_gb_per_gpu"]["reference"] > 0  # a frozen copy of the base


@pytest.mark.parametrize("max_steps,ratio,expected", [(1, 0.03, 0), (2, 0.5, 1), (100, 0.03, 3), (10, 0.99, 9),
                                                       (-1, 0.03, 0.03), (50, 0.0, 0.0)])
def test_warm_up_never_takes_every_step_when_the_steps_are_known(max_steps, ratio, expected):
    from job.specload import build
    from job.train import recipe

    spec = build(overrides={"train.max_steps": max_steps, "train.warmup_ratio": ratio}, environ={})
    assert recipe.warmup(spec.train) == expected
