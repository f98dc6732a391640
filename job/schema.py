"""The chart's values.schema.json: RunSpec under `run:` plus the chart's own keys, self-contained."""
from __future__ import annotations

from job import spec as specmod


def helm_values_schema() -> dict:
    """Chart keys come from charts/sftjob/chart-values.schema.json (hand-written, chart-only knobs)."""
    import json
    from pathlib import Path

    run = specmod.json_schema()
    defs = run.pop("$defs", {})
    chart_keys_file = Path(__file__).resolve().parent.parent / "charts" / "sftjob" / "chart-values.schema.json"
    chart = json.loads(chart_keys_file.read_text()) if chart_keys_file.exists() else {"properties": {}}
    props = dict(chart.get("properties", {}))
    props["run"] = run
    defs.update(chart.get("$defs", {}))
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "sftjob chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "$defs": defs,
    }
