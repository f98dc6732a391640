"""The chart's values.schema.json: RunSpec under `run:` plus the chart's own keys, self-contained.

Written by `make schema` (`sftjob schema --helm`); a test fails when the file drifts from this output.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from job import spec as specmod
from job import specload

# Package data (pyproject's package-data), so an installed wheel writes the same schema as a checkout.
CHART_KEYS = resources.files("job") / "chart_values.schema.json"


def _accept_shorthand(run: dict, defs: dict) -> None:
    """The loader also takes `output: s3://…` (a section's primary field) and `sources: [s3://…]`."""
    for name, section in specmod.SECTIONS.items():
        if section.primary:
            ref = run["properties"][name]
            primary = defs[section.__name__]["properties"][section.primary]
            short = next((a for a in primary.get("anyOf", []) if a.get("type") != "null"), primary)
            short = {k: v for k, v in short.items() if k not in ("default", "title")}
            short["description"] = f"Shorthand for {name}.{section.primary}: {primary.get('description', '')}"
            run["properties"][name] = {"anyOf": [ref, short]}
    source = defs["DataSpec"]["properties"]["sources"]
    source["items"] = {"anyOf": [source["items"], {"type": "string", "description": "path (weight 1.0)"}]}


#: What `sftjob run` refuses to start without (job/pipeline.py: `spec.require` and `data_sources`; a test checks
#: that each one missing stops the run): the chart requires them, as a section's shorthand string or in its mapping.
RUN_INPUTS = ("model.path", "output.uri", "data.path")
#: a key that stands in for one of RUN_INPUTS when it is a non-empty list (RunSpec refuses both at once)
RUN_INPUT_ALTERNATIVES = {"data.path": "sources"}


def _require_run_inputs(run: dict, defs: dict) -> None:
    """run.model/output/data required; a mapping needs its primary key (data: path or sources, not both)."""
    run["required"] = [key.split(".")[0] for key in RUN_INPUTS]
    for key in RUN_INPUTS:
        section, leaf = key.split(".")
        short = run["properties"][section]["anyOf"][1]  # _accept_shorthand: [{$ref: the section}, the string]
        short["minLength"] = 1
        d = defs[specmod.SECTIONS[section].__name__]
        given = {"required": [leaf], "properties": {leaf: {"type": "string", "minLength": 1}}}
        alt = RUN_INPUT_ALTERNATIVES.get(key)
        if alt:
            d["oneOf"] = [given, {"required": [alt], "properties": {alt: {"minItems": 1}}}]
        else:
            d["required"] = given["required"]
            d["properties"][leaf] = {**d["properties"][leaf], **given["properties"][leaf]}
            d["properties"][leaf].pop("anyOf", None)  # the optional (null) form: required here
            d["properties"][leaf].pop("default", None)


NUMERIC_STRING = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
NONNEGATIVE_STRING = r"^\+?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
POSITIVE_STRING = r"^\+?([0-9]*[1-9][0-9]*\.?[0-9]*|[0-9]*\.[0-9]*[1-9][0-9]*)([eE][-+]?[0-9]+)?$"  # a non-zero digit


def _numeric_string(number: dict) -> dict:
    """The string form of a number keeps the sign its lower bound allows (-1.0 for a learning rate fails here, not in
    the pod); the bound itself, and any upper bound, only the loader checks."""
    low, strict = number.get("exclusiveMinimum"), True
    if low is None:
        low, strict = number.get("minimum"), False
    pattern = (NUMERIC_STRING if low is None or low < 0 else
               NONNEGATIVE_STRING if low == 0 and not strict else POSITIVE_STRING)
    return {"type": "string", "pattern": pattern}


def _accept_numeric_strings(node):
    """`helm --set run.train.learning_rate=1e-4` passes a string; the loader (pydantic) reads it as a float."""
    if isinstance(node, list):
        return [_accept_numeric_strings(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _accept_numeric_strings(v) for k, v in node.items()}
    if node.get("type") == "number":
        outer = {k: node.pop(k) for k in ("title", "description", "default") if k in node}
        return {**outer, "anyOf": [node, _numeric_string(node)]}
    return node


def helm_values_schema() -> dict:
    """Chart-only keys come from job/chart_values.schema.json (hand-written, strict, shipped in the wheel)."""
    run = specload.json_schema()
    defs = run.pop("$defs", {})
    _accept_shorthand(run, defs)
    _require_run_inputs(run, defs)
    run, defs = _accept_numeric_strings(run), _accept_numeric_strings(defs)
    chart = json.loads(CHART_KEYS.read_text())  # missing = a broken install: fail, never drop the chart keys
    props = {"run": run, **chart.get("properties", {})}
    for name, d in chart.get("$defs", {}).items():
        if name in defs:
            raise ValueError(f"{CHART_KEYS}: $defs/{name} clashes with a RunSpec model name")
        defs[name] = d
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "sftjob chart values",
        "description": "Generated by `make schema` from job/spec.py (run) and job/chart_values.schema.json; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "required": ["run"],
        "properties": props,
        "$defs": defs,
    }


def knobs_markdown() -> str:
    """docs/knobs.md: every RunSpec field with its flag, env var, type, default and help."""
    rows = ["# Run spec knobs", "",
            "Generated by `make schema` (`sftjob schema --markdown`) from `job/spec.py`; do not edit.", "",
            "| key | flag | env | type | default | what it does |", "|---|---|---|---|---|---|"]
    props = specload.json_schema()
    defs = props.get("$defs", {})
    for path, flag in specmod.FLAGS_BY_PATH.items():
        f = specload.leaf_field(path)
        section, _, leaf = path.rpartition(".")
        node = defs[specmod.SECTIONS[section].__name__]["properties"][leaf] if section else props["properties"][leaf]
        alts = [node] if "type" in node else node.get("anyOf", [node])  # a typed field's anyOf narrows its values
        kinds = [a.get("type") or ("enum" if "enum" in a else a.get("$ref", "").rsplit("/", 1)[-1]) for a in alts]
        typ = " \\| ".join(("/".join(map(str, a["enum"])) if "enum" in a else k) for a, k in zip(alts, kinds, strict=True))
        default = f.get_default(call_default_factory=True)
        desc = (f.description or "").replace("|", "\\|")  # a literal | inside a Markdown table cell
        rows.append(f"| `{path}` | `--{flag}` | `SFTJOB_{flag.replace('-', '_').upper()}` | {typ} | "
                    f"`{json.dumps(default)}` | {desc} |")
    return "\n".join(rows) + "\n"


CHART_DIR = Path(__file__).resolve().parent.parent / "charts" / "sftjob"  # a checkout: `make schema` only


def _values_comments(text: str) -> dict[str, str]:
    """`# -- help` comment blocks of values.yaml (the helm-docs convention) → dotted key → help text."""
    import re

    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if not m:
            pending = None
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if pending is not None:
            out[".".join(k for _, k in stack)] = " ".join(pending)
        pending = None
    return out


def chart_readme() -> str:
    """charts/sftjob/README.md: how to install, then every chart value (type, default, help) from the chart's
    schema, values.yaml and its `# --` comments. A test fails when the file drifts from this output."""
    import yaml

    schema = json.loads(CHART_KEYS.read_text())
    text = (CHART_DIR / "values.yaml").read_text()
    values, helps = yaml.safe_load(text), _values_comments(text)
    rows: list[str] = []

    def typ(node: dict) -> str:
        if "$ref" in node:
            return node["$ref"].rsplit("/", 1)[-1]
        if "enum" in node:
            return "/".join(map(str, node["enum"]))
        if "anyOf" in node:
            return " \\| ".join(typ(a) for a in node["anyOf"])
        return str(node.get("type", "any"))

    def walk(props: dict, defaults, prefix: str) -> None:
        for key, node in props.items():
            path = f"{prefix}{key}"
            default = defaults.get(key) if isinstance(defaults, dict) else None
            children = node.get("properties") if node.get("type") == "object" else None
            if children and not (path in helps and not isinstance(default, dict)):
                if path in helps:
                    rows.append(f"| `{path}` | object | | {helps[path]} |")
                walk(children, default or {}, path + ".")
                continue
            desc = (helps.get(path) or node.get("description") or "").replace("|", "\\|")
            rows.append(f"| `{path}` | {typ(node)} | `{json.dumps(default)}` | {desc} |")

    walk(schema.get("properties", {}), values, "")
    head = [
        "# sftjob chart", "",
        "One `helm install` = one fine-tuning run: an Indexed Job of `nodes` pods (a headless Service for the",
        "rendezvous when `nodes` > 1), a ConfigMap holding the run spec, a ServiceAccount, a NetworkPolicy.",
        "", "```",
        "helm install run-42 charts/sftjob -f my-run.yaml          # my-run.yaml: run: {model, data, output, ...}",
        "sftjob status run-42 --watch                               # Job, Kueue, pods + <output>/status.json",
        "sftjob logs run-42                                         # or: kubectl logs -f job/run-42",
        "```", "",
        "`run:` is the RunSpec, the same YAML `sftjob run --config` reads: its keys are in",
        "[docs/knobs.md](../../docs/knobs.md). The chart's own values follow. Generated by `make schema`",
        "(`sftjob schema --chart-readme`) from `job/chart_values.schema.json` and `values.yaml`; do not edit.", "",
        "| value | type | default | what it does |", "|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"
