"""Dockerfile: hadolint/checkov clean, installs exactly what `make setup` installs, runs as the chart's uid."""
from __future__ import annotations

import json
import re

import yaml
from test_chart_helpers import CHART, ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_hadolint_reports_nothing():
    p = run(tool("hadolint"), "--format", "json", str(DOCKERFILE), check=False)
    assert json.loads(p.stdout or "[]") == [], p.stdout


def test_checkov_dockerfile_checks_pass():
    p = run(tool("checkov"), "--skip-download", "--framework", "dockerfile", "-f", str(DOCKERFILE),
            "-o", "json", "--quiet", check=False)
    report = json.loads(p.stdout)
    assert report["results"]["failed_checks"] == [], [c["check_id"] for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] > 50


def test_image_installs_the_lockfile_the_way_make_does():
    ins = instructions()
    runs = " ".join(a for op, a in ins if op == "RUN")
    make = (ROOT / "Makefile").read_text()
    # torch first from its lockfile line, then the whole lockfile without compiling DeepSpeed ops
    assert "grep -E '^torch==' requirements.lock" in make and "grep -E '^torch==' requirements.lock" in runs
    assert "DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements.lock" in make
    assert re.search(r"DS_BUILD_OPS=0 \S*pip install --no-build-isolation -r requirements\.lock "
                     r"-r requirements-cuda\.lock", runs)
    assert runs.index("^torch==") < runs.index("-r requirements.lock")
    # nothing else comes from an index: every pip install is the torch line or the lockfiles
    for cmd in re.findall(r"pip install ([^&]*)", runs):
        assert "requirements.lock" in cmd, f"unpinned install: pip install {cmd}"
    assert ("COPY", "requirements.lock requirements-cuda.lock ./") in ins


def test_gpu_only_pins_are_exact_and_agree_with_pyproject():
    lines = [ln.strip() for ln in (ROOT / "requirements-cuda.lock").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^\s]*", ln) for ln in lines), lines
    main = {ln.split("==")[0].lower() for ln in (ROOT / "requirements.lock").read_text().splitlines() if "==" in ln}
    assert not {ln.split("==")[0].lower() for ln in lines} & main  # one pin per package across both files
    assert set(lines) <= set(re.findall(r'"([^"]+==[^"]+)"', (ROOT / "pyproject.toml").read_text()))


def test_base_image_is_pinned_by_digest_and_app_code_is_the_last_layer():
    ins = instructions()
    froms = [a for op, a in ins if op == "FROM"]
    assert re.match(r"nvidia/cuda:12\.\S+-cudnn-runtime-ubuntu\S+@sha256:[0-9a-f]{64} AS base$", froms[0])
    assert all(f.startswith("base AS ") for f in froms[1:]) and len(froms) >= 3
    copies = [(i, a) for i, (op, a) in enumerate(ins) if op == "COPY"]
    last_copy_i, last_copy = copies[-1]
    assert last_copy.startswith("job/ ")
    assert all(op in ("USER", "HEALTHCHECK", "ENTRYPOINT", "CMD") for op, _ in ins[last_copy_i + 1:])


def test_image_user_entrypoint_and_labels_match_the_chart():
    ins = instructions()
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["uid"]
    users = [a for op, a in ins if op == "USER"]
    assert users == [f"{uid}:{uid}"]
    assert ("ENTRYPOINT", '["sftjob"]') in ins and ("HEALTHCHECK", "NONE") in ins
    labels = " ".join(a for op, a in ins if op == "LABEL")
    for key in ("title", "description", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert f"--uid {uid}" in runs
    # the cache dir the chart mounts is where the image expects it
    env = " ".join(a for op, a in ins if op == "ENV")
    chart_cache = yaml.safe_load((CHART / "values.yaml").read_text())["cache"]["mountPath"]
    assert f"SFTJOB_CACHE_DIR={chart_cache}" in env


def test_dockerignore_sends_only_the_lockfiles_and_the_package():
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    assert {"!requirements.lock", "!requirements-cuda.lock", "!job/"} <= set(lines)
    sources = {s for op, a in instructions() if op == "COPY" and "--from" not in a for s in a.split()[:-1]}
    assert sources == {"requirements.lock", "requirements-cuda.lock", "job/"}
