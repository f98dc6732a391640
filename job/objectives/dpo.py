"""Direct preference optimisation: prompt/chosen/rejected pairs under the same template and masks, TRL's
DPOTrainer on the prepared pairs (job/train/dpo.py); evaluated by reward accuracy on the eval pairs."""
from __future__ import annotations

from job.errors import ConfigError
from job.objectives import Objective, PlanPart

#: read only by a DPO run: set on another objective's run they would be ignored (64)
KNOBS = ("train.beta", "train.loss_type", "train.label_smoothing", "train.precompute_ref_log_probs",
         "eval.min_reward_accuracy")


def prepare(spec, tokenizer_dir=None, sharing=None):
    from job.data.preference import prepare

    return prepare(spec, tokenizer_dir, sharing)


def recipe(spec, plan: dict, tok):
    from job.train import dpo

    return dpo.recipe(spec, plan, tok)


def evaluate(spec, prepared, model_dir: str, adapter_dir: str, workdir):
    from job import evaluate_dpo

    return evaluate_dpo.evaluate(spec, prepared, model_dir, adapter_dir, workdir)


def validate(spec) -> int:
    from job.data.pairs_cli import validate_pairs

    return validate_pairs(spec)


def preview(spec, limit: int, as_json: bool) -> int:
    from job.data.pairs_cli import preview_pairs

    return preview_pairs(spec, limit, as_json)


def check(spec) -> None:
    """DPO settings that could never train, and the SFT eval it has no counterpart for."""
    from job import evaluate
    from job.train import dpo

    dpo.check(spec)
    e = spec.eval
    if e.prompts or e.num_prompts or e.min_json_valid is not None or e.json_schema:
        raise ConfigError("objective dpo: the generation eval (eval.prompts, num_prompts, json_schema, min_json_valid) "
                          "is not available; DPO is evaluated by reward accuracy on the eval pairs",
                          hint="drop those eval settings; use data.eval_split and eval.min_reward_accuracy")
    if e.min_reward_accuracy is not None and not evaluate.has_eval_split(spec):
        raise ConfigError("eval.min_reward_accuracy gates on reward accuracy over eval pairs: it needs "
                          "objective dpo and an eval split", hint="set data.eval_split (or data.eval_data)")


def plan(spec, weights: float) -> PlanPart:
    """The reference the loss compares against, and its cost: memory for a full fine-tune's frozen copy, a
    no-grad forward per step (about a third of a forward + backward) unless its log-probs are precomputed."""
    t = spec.train
    ref = weights if t.method == "full" and not t.precompute_ref_log_probs else 0.0
    note = ("precomputed log-probs (one pass before training)" if t.precompute_ref_log_probs
            else "base with the adapter disabled (no extra weights)" if t.method != "full"
            else "frozen copy of the base")
    return PlanPart(memory={"reference": ref}, notes={"reference": note},
                    step_cost=1.0 if t.precompute_ref_log_probs else 4 / 3)


OBJECTIVE = Objective(name="dpo", title="DPO", prepare=prepare, recipe=recipe, evaluate=evaluate,
                      validate=validate, preview=preview, check=check, knobs=KNOBS, sequences_per_row=2,
                      row_name="pairs", plan=plan)
