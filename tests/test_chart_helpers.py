"""Helpers (no tests) for test_chart/test_manifests/test_dockerfile: the pinned tools from tools/bin (`make tools`)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "sftjob"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TOOLS = ROOT / "tools" / "bin"
TOOLS_PY = ROOT / "tools" / "venv" / "bin" / "python"
K8S_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"]


def tool(name: str) -> str:
    """Path of a pinned tool; fails (never skips) when it is missing."""
    p = TOOLS / name
    if not (p.exists() and os.access(p, os.X_OK)):
        pytest.fail(f"{p} is missing: run `make tools` (tools/install.sh installs the pinned helm, "
                    f"kubernetes-validate, checkov, hadolint and hera)")
    return str(p)


def tools_python() -> str:
    if not TOOLS_PY.exists():
        pytest.fail(f"{TOOLS_PY} is missing: run `make tools`")
    return str(TOOLS_PY)


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


#: The run inputs the chart requires (model, data, output: job/schema.py RUN_INPUTS), for renders about something
#: else. Given as the first values file (stdin), so the test's own -f and --set override them.
INPUTS = {"run": {"model": {"path": "s3://models/tiny/"}, "data": {"path": "s3://datasets/train.jsonl"},
                  "output": {"uri": "s3://runs/r/"}}}


def helm_template(release: str, *args: str, namespace: str = "ml", check: bool = True, inputs: bool = True):
    """`helm template`; inputs=False when the test gives model/data/output itself (or checks they are required)."""
    first = ["-f", "-"] if inputs else []
    return run(tool("helm"), "template", release, str(CHART), "--namespace", namespace, *first, *args, check=check,
               input=yaml.safe_dump(INPUTS) if inputs else None)


def render(release: str, *args: str, inputs: bool = True) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm_template(release, *args, inputs=inputs).stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def release_for(values_file: Path) -> str:
    return values_file.name.removesuffix("-values.yaml").replace("1node", "one").replace("2node", "two")
