"""One version: job/__init__.py → the package metadata → `sftjob --version`, manifests, status.json, the chart's
appVersion (its app.kubernetes.io/version label) and the image label; an installed wheel works on its own."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from test_chart_helpers import CHART, ROOT

import job
from job import publish
from job.status import Status


def test_chart_app_version_and_image_label_default_are_the_package_version():
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == job.__version__
    assert f"ARG VERSION={job.__version__}" in (ROOT / "Dockerfile").read_text()
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # read from job.__version__
    assert "app.kubernetes.io/version: {{ .Chart.AppVersion" in (CHART / "templates" / "_helpers.tpl").read_text()


def test_sftjob_version_prints_the_installed_version():
    exe = Path(sys.executable).with_name("sftjob")  # the console script `make setup` installs
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(rf"sftjob {re.escape(job.version())}\n", p.stdout)


def test_manifest_versions_and_status_carry_the_package_version(tmp_path):
    assert publish.versions()["sftjob"] == job.version()
    doc = Status(tmp_path, None).start(run_id="r1")
    assert doc["version"] == job.version()
    assert json.loads((tmp_path / "status.json").read_text())["version"] == job.version()


def test_an_installed_wheel_writes_the_helm_schema_and_its_version_without_the_checkout(tmp_path):
    """Build the wheel, install it alone into a target dir, run it from elsewhere: chart keys included."""
    dist, target, cwd, src = tmp_path / "dist", tmp_path / "site", tmp_path / "cwd", tmp_path / "src"
    cwd.mkdir()
    # what the image's wheel stage copies (setuptools' build/ in the checkout could carry stale modules)
    shutil.copytree(ROOT / "job", src / "job", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, timeout=300, env=env, capture_output=True)
    wheel = next(dist.glob("sftjob-*.whl"))
    assert wheel.name.startswith(f"sftjob-{job.__version__}-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, timeout=300, env=env, capture_output=True)
    env = {**env, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    probe = "import job, sys; from job.cli import main; print(job.__file__, file=sys.stderr); sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", probe, "schema", "--helm"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().startswith(str(target))
    assert json.loads(p.stdout) == json.loads((CHART / "values.schema.json").read_text())
    p = subprocess.run([sys.executable, "-c", probe, "--version"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.strip() == f"sftjob {job.__version__}"
