"""Evaluation on a real (tiny) training run: a JSON-output fine-tune must beat its base model, and an
under-trained adapter must be rejected by the gate (exit 78, kept under rejected/, no _SUCCESS)."""
import json
import random
from pathlib import Path

import pytest
import trainkit

pytestmark = pytest.mark.slow
SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "catalog" / "schema.json"
PRODUCTS = {"camiseta": "ropa", "chaqueta": "ropa", "zapatos": "ropa", "lámpara": "hogar", "silla": "hogar",
            "mesa": "hogar", "balón": "deporte", "raqueta": "deporte", "sartén": "cocina", "taza": "cocina"}
COLORS = ["azul", "rojo", "verde", "negro", "blanco", "gris"]
PHRASES = ["Producto: {n}, color {c}, {p} euros.", "Vendemos {n} de color {c} por {p} euros.", "{n} {c}, precio {p} euros."]


def catalog_rows(n: int, seed: int = 0) -> list[dict]:
    """Product descriptions in, one catalog JSON object out (the catalog-json recipe's shape)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, cat = rng.choice(sorted(PRODUCTS.items()))
        color, price = rng.choice(COLORS), rng.choice([9, 19, 29, 49])
        answer = json.dumps({"nombre": name, "categoria": cat, "color": color, "precio": price}, ensure_ascii=False)
        rows.append({"messages": [{"role": "user", "content": rng.choice(PHRASES).format(n=name, c=color, p=price)},
                                  {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("catalog") / "train.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in catalog_rows(300)))
    return p


def _run(catalog: Path, out: Path, *flags: str, env: dict | None = None):
    return trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(catalog), "--output", str(out),
                        "--eval-split", "0.1", "--json-schema", str(SCHEMA), "--learning-rate", "5e-3",
                        "--modules-to-save", "[embed_tokens, lm_head]", *flags, env=env)


@pytest.fixture(scope="module")
def trained(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("json-run") / "out"
    cache = out.parent / "cache"
    r = _run(catalog, out, "--max-steps", "120", "--logging-steps", "40", "--eval-steps", "60",
             "--num-prompts", "16", "--max-new-tokens", "40", "--min-json-valid", "0.8",
             env={"SFTJOB_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, cache


def test_json_finetune_raises_valid_json_rate_from_base_to_adapter(trained):
    out, _, _ = trained
    ev = json.loads((out / "eval.json").read_text())
    before, after = ev["generation"]["before"], ev["generation"]["after"]
    print("\nJSON eval before → after:", json.dumps({k: [before[k], after[k]] for k in before if k in after}))
    assert ev["generation"]["prompts"] == 16
    assert before["json_valid"] <= 0.1 and after["json_valid"] >= 0.8
    assert after["schema_valid"] > before["schema_valid"]
    assert after["normalized_match"] >= before["normalized_match"]
    assert ev["gate"] == {"min_json_valid": 0.8, "max_loss": None, "checked": True, "passed": True, "failures": []}
    assert ev["loss"]["eval_loss"] > 0 and ev["loss"]["perplexity"] == pytest.approx(2.718281828 ** ev["loss"]["eval_loss"], rel=1e-6)
    print("eval loss base → adapter:", ev["loss"]["base_eval_loss"], "→", ev["loss"]["eval_loss"])
    assert ev["loss"]["base_eval_loss"] > ev["loss"]["eval_loss"] + 1.0  # the base has never seen this format
    sample = ev["generation"]["samples"][0]
    assert sample["prompt"].endswith("<|im_start|>assistant\n") and sample["reference"].startswith('{"nombre"')


def test_eval_report_is_published_and_summarised_in_status_and_final_line(trained):
    out, r, _ = trained
    assert (out / "_SUCCESS").exists()
    manifest = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {"eval.json", "eval.md", "adapter_model.safetensors"} <= manifest
    md = (out / "eval.md").read_text()
    assert "| valid JSON | 0.0% |" in md and "Gate: **passed**" in md
    evals = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    assert evals == [60, 120]  # eval_steps 60; the final evaluation is that of step 120, not run twice
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["eval"]["gate"] == "passed"
    assert status["eval"]["json_valid"][1] > status["eval"]["json_valid"][0]  # [before, after]
    assert "evaluating" in [e["type"] for e in status["events"]]
    done = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"event": "done"')]
    assert done[0]["eval"] == status["eval"]


def test_under_trained_adapter_misses_the_gate_exits_78_and_is_kept_under_rejected(catalog, tmp_path):
    out = tmp_path / "out"
    r = _run(catalog, out, "--max-steps", "3", "--num-prompts", "4", "--max-new-tokens", "12",
             "--min-json-valid", "0.9")
    assert r.returncode == 78, r.stderr[-3000:]
    assert "missed the evaluation gate" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    for name in ("adapter_model.safetensors", "adapter_config.json", "eval.json", "eval.md", "run.yaml"):
        assert (out / "rejected" / name).exists(), name
    ev = json.loads((out / "rejected" / "eval.json").read_text())
    assert ev["gate"]["passed"] is False and "schema_valid" in ev["gate"]["failures"][0]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"]["exit_code"] == 78 and status["error"]["kind"] == "eval_gate"
    assert status["eval"]["gate"] == "failed"


def test_the_evaluators_loss_is_the_trainers_so_base_and_adapter_compare_like_for_like(trained):
    import yaml

    from job import evalkit, evaluate
    from job.data.prepare import Prepared
    from job.spec import RunSpec

    out, _, cache = trained
    ev = json.loads((out / "eval.json").read_text())
    spec = RunSpec.model_validate(yaml.safe_load((out / "run.yaml").read_text()))
    [prepared_dir] = [d for d in (cache / "prepared").iterdir() if (d / "meta.json").exists()]
    prepared = Prepared.load(prepared_dir)
    base = evalkit.load_base(spec, str(trainkit.tiny_model()), 0)
    assert evaluate.eval_loss(base, prepared.eval_path, spec) == pytest.approx(ev["loss"]["base_eval_loss"], rel=1e-5)
    adapter = evalkit.with_adapter(spec, base, str(out))
    assert evaluate.eval_loss(adapter, prepared.eval_path, spec) == pytest.approx(ev["loss"]["eval_loss"], rel=1e-4)
    md = (out / "eval.md").read_text()
    assert f"| eval loss | {ev['loss']['base_eval_loss']:.4f} | {ev['loss']['eval_loss']:.4f} |" in md
