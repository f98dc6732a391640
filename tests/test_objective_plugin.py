"""A third objective, defined here, trains through the same protocol SFT and DPO use (job/objectives).

`smoothed_sft` is SFT's data, template and masks with a label-smoothed token loss: a real objective of its own
(a different loss, its own evaluation section, its own validate line), registered the way an objective kept
outside the tree is (SFTJOB_OBJECTIVE_MODULES), so the ranks — other processes — find it too. Nothing in
job/ knows its name: if the pipeline, launcher, rank, plan or the data commands branched on the objective,
this run would train SFT's loss or fail.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import trainkit

from job.objectives import Objective

NAME = "smoothed_sft"
SMOOTHING = 0.1
HERE = Path(__file__).resolve().parent


def _recipe(spec, plan, tok):
    import dataclasses

    import torch.nn.functional as F

    from job.objectives import get

    base = get("sft").recipe(spec, plan, tok)

    class Smoothed(base.trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            out = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = out.logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=SMOOTHING)
            if model.training and os.environ.get("TOY_PROOF"):  # which process computed which loss
                with open(Path(os.environ["TOY_PROOF"]) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
                    f.write(json.dumps({"loss": loss.item()}) + "\n")
            return (loss, out) if return_outputs else loss

    return dataclasses.replace(base, trainer_class=Smoothed)


def _evaluate(spec, prepared, model_dir, adapter_dir, workdir):
    import time

    from job.evalkit import FORMAT, written

    loss = json.loads((Path(workdir) / "eval_loss.json").read_text()) if (Path(workdir) / "eval_loss.json").exists() else None
    report = {"format": FORMAT, NAME: {"label_smoothing": SMOOTHING, "eval_loss": loss}}
    return written(Path(workdir), report, [], time.time(), lambda r: f"# {NAME}\n", lambda r: {NAME: SMOOTHING})


def _validate(spec):
    print(f"{NAME}: label smoothing {SMOOTHING} over SFT rows")
    return OBJECTIVE_SFT().validate(spec)


def OBJECTIVE_SFT():
    from job.objectives import get

    return get("sft")


OBJECTIVE = Objective(
    name=NAME, title="smoothed SFT",
    prepare=lambda spec, tokenizer_dir=None, sharing=None: OBJECTIVE_SFT().prepare(spec, tokenizer_dir, sharing),
    recipe=_recipe, evaluate=_evaluate, validate=_validate,
    preview=lambda spec, limit, as_json: OBJECTIVE_SFT().preview(spec, limit, as_json))

ENV = {"SFTJOB_OBJECTIVE_MODULES": f"{NAME}=test_objective_plugin",
       "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_a_third_objective_trains_two_steps_evaluates_and_publishes_through_the_protocol(tmp_path):
    proof = tmp_path / "proof"
    proof.mkdir()
    out = tmp_path / "out"
    r = trainkit.run(*trainkit.steady_args(out, 2, "--objective", NAME, "--eval-split", "0.1"),
                     env={**ENV, "SFTJOB_CACHE_DIR": str(tmp_path / "c"), "TOY_PROOF": str(proof)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "_SUCCESS").exists() and (out / "adapter_model.safetensors").exists()
    computed = [json.loads(x)["loss"] for f in sorted(proof.glob("rank*.jsonl")) for x in f.read_text().splitlines()]
    assert len(computed) == 2  # one micro-batch per step, one process, 2 steps: both through the plugin's loss
    logged = trainkit.losses((out / "metrics.jsonl").read_text().splitlines())
    assert [round(logged[s], 3) for s in (1, 2)] == pytest.approx([round(x, 3) for x in computed], abs=2e-3)
    ev = json.loads((out / "eval.json").read_text())
    assert ev[NAME]["label_smoothing"] == SMOOTHING and ev["gate"]["passed"]
    run_yaml = (out / "run.yaml").read_text()
    assert f"objective: {NAME}" in run_yaml


def test_the_third_objective_answers_validate_and_plan_and_an_unknown_one_is_64(tmp_path, monkeypatch, capsys):
    from job.cli import main

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(HERE))
    data, tok = str(trainkit.chat_data()), str(trainkit.tiny_model())
    assert main(["validate", "--objective", NAME, "--data", data, "--tokenizer", tok,
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert f"{NAME}: label smoothing {SMOOTHING}" in capsys.readouterr().out
    assert main(["plan", "--objective", NAME, "--model", tok, "--data", data, "--json",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["objective"] == NAME and plan["sequences_per_row"] == 1
    assert main(["validate", "--objective", "nope", "--data", data, "--tokenizer", tok]) == 64
    err = capsys.readouterr().err
    assert "'nope' is not an objective" in err and NAME in err and "Traceback" not in err
    monkeypatch.setenv("SFTJOB_OBJECTIVE_MODULES", "broken")
    assert main(["validate", "--objective", NAME, "--data", data, "--tokenizer", tok]) == 64
    assert "not name=package.module" in capsys.readouterr().err
    assert "test_objective_plugin" in sys.modules  # the registry imported this module by its name
