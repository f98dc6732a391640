"""How a RunSpec is loaded: a YAML file, then SFTJOB_* variables, then flags (each field's flag name is
defined with the fields, in job/spec.py), validated once with every problem named; also the YAML and JSON
schema a spec is written as. Apart from job/spec.py so the knobs read as one list."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from job import redact
from job.errors import ConfigError
from job.spec import (
    ALL_FLAGS,
    ALL_FLAGS_UNDERSCORED,
    FLAGS_BY_PATH,
    SECTIONS,
    DataSource,
    RunSpec,
    leaf_paths,
)


def leaf_field(path: str):
    return dict(leaf_paths())[path]


def _set(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        node = tree.get(p)
        if isinstance(node, str) or isinstance(node, list):  # shorthand section given earlier
            node = {SECTIONS[p].primary: node}
        tree[p] = node = dict(node or {})
        tree = node
    tree[parts[-1]] = value


def parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """SFTJOB_<FLAG_NAME> (upper snake) for every flag; values parsed as YAML scalars/lists."""
    return {path: value for path, (_, value) in env_layer(environ).items()}


def env_layer(environ: dict[str, str] | None = None) -> dict[str, tuple[str, Any]]:
    """dotted path → (the SFTJOB_* variable it came from, its value): the one naming rule, which errors
    also quote. SFTJOB_CACHE_DIR is taken as given (a path, never YAML)."""
    environ = os.environ if environ is None else environ
    out = {}
    for flag, path in ALL_FLAGS.items():
        key = "SFTJOB_" + flag.replace("-", "_").upper()
        if key in environ and key != "SFTJOB_CACHE_DIR":
            out[path] = (key, parse_env_value(environ[key]))
    if "SFTJOB_CACHE_DIR" in environ:
        out["cache_dir"] = ("SFTJOB_CACHE_DIR", environ["SFTJOB_CACHE_DIR"])
    return out


def read_yaml_mapping(path: str | Path, *, missing: str = "config file not found",
                      missing_hint: str = "check the --config path",
                      not_mapping: str = "the run spec must be a YAML mapping") -> dict:
    """A YAML file that must hold a mapping; errors name the file (and line) and say how to fix it."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{missing}: {p}", hint=missing_hint)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}",
                          hint="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: {not_mapping}", hint="see `sftjob schema`")
    return data


def load_yaml(path: str | Path) -> dict:
    data = read_yaml_mapping(path)
    # Helm values files carry the spec under `run:`; their other keys are the chart's (pods, image, ...)
    if "run" in data and "run" not in RunSpec.model_fields:
        run = data["run"]
        if run is not None and not isinstance(run, dict):
            raise ConfigError(f"{path}: `run:` must be a mapping (the run spec)", hint="see `sftjob schema`")
        data = run or {}
    return data


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = RunSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return []
        ann = f.annotation
        model = SECTIONS.get(part, ann if isinstance(ann, type) else None)
        if part == "sources":
            model = DataSource
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _explain(err: ValidationError, source: str, origin: dict[str, str] | None = None) -> ConfigError:
    """One line per problem, naming the key, what was wrong, and where the value came from when it was
    not the config file (a flag or an SFTJOB_* variable)."""
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid + list(ALL_FLAGS_UNDERSCORED), n=1, cutoff=0.6)
            tip = f" — did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{key}'{tip}")
        elif not loc and e["type"] == "value_error":  # a whole-spec check: its message names the knob(s)
            lines.append(str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"])
        else:
            got = "" if not loc else f" (got {redact.text(repr(e.get('input')))})"  # top level: the whole config
            came = (origin or {}).get(".".join(str(x) for x in loc[:2])) or (origin or {}).get(key)
            lines.append(f"{key}: {e['msg']}{got}" + (f" from {came}" if came else ""))
    return ConfigError(f"invalid run spec ({source}):\n  " + "\n  ".join(lines),
                       hint="see `sftjob schema` for every key, its type and default")


def _relocate_bare_keys(tree: dict) -> dict:
    """Accept flat keys (``learning_rate: 1e-4`` at top level) for fields whose flag is bare."""
    out: dict = {}
    for k, v in tree.items():
        path = ALL_FLAGS.get(str(k).replace("_", "-"))
        if k not in RunSpec.model_fields and path and "." in path:
            _set(out, path, v)
        else:
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


def build(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
          environ: dict[str, str] | None = None, *, tree: dict | None = None, source: str | None = None) -> RunSpec:
    """defaults < YAML (a file, or an already loaded tree) < env < flags (overrides: dotted path → value)."""
    if tree is None:
        tree = load_yaml(config) if config else {}
    tree = _relocate_bare_keys(tree)
    layer = env_layer(environ)
    env = {p: value for p, (_, value) in layer.items()}
    origin = {**{p: var for p, (var, _) in layer.items()}, **{p: "--" + FLAGS_BY_PATH.get(p, p) for p in overrides or {}}}
    layers = [str(config)] if config else []
    layers += ["environment"] if env else []
    layers += ["flags"] if overrides else []
    source = source or (", ".join(layers) or "flags")
    for path, value in {**env, **(overrides or {})}.items():
        _set(tree, path, value)
    try:
        return RunSpec.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source, origin) from None


def json_schema() -> dict:
    return RunSpec.model_json_schema()


def to_yaml(spec: RunSpec) -> str:
    """run.yaml as published: credentials in URLs masked."""
    return yaml.safe_dump(redact.data(spec.public_dict()), sort_keys=False)
