"""The objectives a run can train (``train.objective``): one object each, owning what differs between them.

The pipeline, launcher, rank, plan, eval gate and the data commands call an :class:`Objective`; none of them
branches on an objective's name. What every objective shares (fetch, the chat template and masks, the prepared
cache, the one training rank with its stop flag, checkpoint mirror and resume, publish) stays where it is.

Adding one is a module defining ``OBJECTIVE = Objective(...)`` and its line in :data:`BUILTIN` (docs/objectives.md).
An objective kept outside this tree registers through ``SFTJOB_OBJECTIVE_MODULES=name=package.module[,…]``: the
variable reaches every rank (they inherit the launcher's environment), so the ranks find the same object.
Modules are imported by name only when asked for, so ``--help`` and ``validate`` pay only for the one in use.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from job.errors import ConfigError

#: name → module defining OBJECTIVE
BUILTIN = {
    "sft": "job.objectives.sft",
    "dpo": "job.objectives.dpo",
}
PLUGINS_ENV = "SFTJOB_OBJECTIVE_MODULES"


@dataclass(frozen=True)
class PlanPart:
    """What an objective adds to `sftjob plan`: memory terms (bytes per GPU, added to the total), lines, step cost."""

    memory: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    step_cost: float = 1.0  # relative to a forward + backward of its sequences (DPO's reference pass: 4/3)


@dataclass(frozen=True)
class Objective:
    """One objective. Callables take the run spec first; heavy imports happen inside them, not here."""

    name: str
    title: str  # in messages: "DPO"
    prepare: Callable[..., Any]  # (spec, tokenizer_dir=None, sharing=None) → job.data.prepared.Prepared
    recipe: Callable[..., Any]  # (spec, plan, tok) → job.train.recipe.Recipe: the rank's collator, trainer, args
    evaluate: Callable[..., Any]  # (spec, prepared, model_dir, adapter_dir, workdir) → job.evalkit.Evaluation
    validate: Callable[..., int]  # `sftjob validate`: (spec) → exit code
    preview: Callable[..., int]  # `sftjob preview`: (spec, limit, as_json) → exit code
    check: Callable[..., None] = lambda spec: None  # settings that could never train: ConfigError (64) before fetch
    knobs: tuple[str, ...] = ()  # "section.field" read only by this objective: set on another one's run → 64
    sequences_per_row: int = 1  # sequences a row trains on (DPO: chosen and rejected)
    row_name: str = "sequences"  # what a row is called in the plan's batch line
    plan: Callable[..., PlanPart] = lambda spec, weights: PlanPart()  # (spec, weight bytes per GPU) → PlanPart


def _modules() -> dict[str, str]:
    found = dict(BUILTIN)
    for item in filter(None, (p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, sep, module = item.partition("=")
        if not sep or not name.strip() or not module.strip():
            raise ConfigError(f"{PLUGINS_ENV}: {item!r} is not name=package.module",
                              hint=f"set {PLUGINS_ENV}=myobjective=mypackage.objective")
        found[name.strip()] = module.strip()
    return found


def names() -> list[str]:
    return list(_modules())


def get(name_or_spec) -> Objective:
    """The objective by name (or a run spec's train.objective); unknown → 64 naming the known ones."""
    name = name_or_spec if isinstance(name_or_spec, str) else name_or_spec.train.objective
    modules = _modules()
    if name not in modules:
        raise ConfigError(f"train.objective {name!r} is not an objective (known: {', '.join(modules)})",
                          hint=f"set --objective to one of {', '.join(modules)}, or register yours in {PLUGINS_ENV}")
    try:
        obj = importlib.import_module(modules[name]).OBJECTIVE
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"objective {name!r}: {modules[name]} does not define OBJECTIVE ({e})",
                          hint=f"check {PLUGINS_ENV} and PYTHONPATH") from None
    if not isinstance(obj, Objective) or obj.name != name:
        raise ConfigError(f"objective {name!r}: {modules[name]}.OBJECTIVE is not an Objective named {name!r}",
                          hint="define OBJECTIVE = job.objectives.Objective(name=..., ...) in that module")
    return obj


def check(spec) -> Objective:
    """Before fetch: the objective exists, no other objective's knob is set on this run, its own settings can
    train. A knob counts only away from its default: set to its default it changes nothing."""
    obj = get(spec)
    for other in (get(n) for n in names() if n != obj.name):
        knobs = [p for p in other.knobs if p not in obj.knobs and _changed(spec, p)]
        if knobs:
            from job.spec import FLAGS_BY_PATH

            flags = ", ".join(f"--{FLAGS_BY_PATH[p]}" for p in knobs)
            one = len(knobs) == 1
            raise ConfigError(f"{', '.join(knobs)} {'is a' if one else 'are'} {other.title} setting{'' if one else 's'}, "
                              f"but train.objective is {obj.name}: {'it' if one else 'they'} would be ignored",
                              hint=f"set --objective {other.name}, or drop {flags}")
    obj.check(spec)
    return obj


def _changed(spec, path: str) -> bool:
    section, name = path.split(".")
    sec = getattr(spec, section)
    return getattr(sec, name) != type(sec).model_fields[name].default
