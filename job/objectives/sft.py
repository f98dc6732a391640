"""Supervised fine-tuning: chat rows rendered by the template, loss on the assistant's tokens, TRL's SFTTrainer;
evaluated by eval loss and by generation (base vs adapter on the same prompts)."""
from __future__ import annotations

from job.objectives import Objective


def prepare(spec, tokenizer_dir=None, sharing=None):
    from job.data.prepare import prepare

    return prepare(spec, tokenizer_dir, sharing)


def recipe(spec, plan: dict, tok):
    from job.train.sft import sft_recipe

    return sft_recipe(spec, plan, tok)


def evaluate(spec, prepared, model_dir: str, adapter_dir: str, workdir):
    from job import evaluate

    return evaluate.evaluate(spec, prepared, model_dir, adapter_dir, workdir)


def validate(spec) -> int:
    from job.data.commands import validate_command

    return validate_command(spec)


def preview(spec, limit: int, as_json: bool) -> int:
    from job.data.commands import preview_command

    return preview_command(spec, limit, as_json)


OBJECTIVE = Objective(name="sft", title="SFT", prepare=prepare, recipe=recipe, evaluate=evaluate,
                      validate=validate, preview=preview)
