"""Helpers (no tests) for test_image_pins.py: resolve the image's pin set for its Python and platform with pip.

`python tests/imagepins.py` prints the wheel sizes per variant (the image size estimate).
DeepSpeed is an sdist (built in the image), so it is left out of the resolution.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "3.12"  # Ubuntu 24.04's python3, the image's
# a single --platform accepts only that exact tag, so list every manylinux tag a glibc 2.39 x86_64 accepts
PLATFORMS = ([f"manylinux_2_{i}_x86_64" for i in range(5, 40)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
VARIANTS = {"cu130": "requirements-cuda13.lock", "cu126": "requirements-cuda12.lock"}
SDIST_ONLY = {"deepspeed"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name → version of every `name==version` line (comments and pip options skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, _, ver = line.partition("==")
            out[norm(name)] = ver.strip()
    return out


def requirement_lines(*paths: Path, drop: set[str] = frozenset()) -> list[str]:
    return [f"{n}=={v}" for p in paths for n, v in pins(p).items() if n not in drop]


def resolve(requirements: list[str], *, no_deps: bool = False, timeout: int = 900) -> dict:
    """pip's --dry-run report for installing `requirements` into a Python 3.12 manylinux x86_64 target."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.txt"
        req.write_text("\n".join(requirements) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(Path(tmp) / "t"), "--only-binary=:all:", "--python-version", PYTHON,
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
               "--report", "-", "-r", str(req)] + (["--no-deps"] if no_deps else [])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if p.returncode != 0:
        errors = [ln for ln in p.stderr.splitlines() if "is ignored" not in ln]
        raise AssertionError("the image's pins do not resolve for Python 3.12 manylinux x86_64:\n"
                             + "\n".join(errors[-30:]))
    return json.loads(p.stdout)


def installed(report: dict) -> dict[str, str]:
    return {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def _size(url: str) -> int:
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(url[len("file://"):])).stat().st_size
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
        return int(r.headers["Content-Length"])


def wheel_bytes(report: dict) -> dict[str, int]:
    """name → wheel size (HEAD of each wheel the report picked; a local index file's size)."""
    from concurrent.futures import ThreadPoolExecutor

    items = [(norm(i["metadata"]["name"]), i["download_info"]["url"]) for i in report["install"]]
    with ThreadPoolExecutor(8) as pool:
        return dict(zip([n for n, _ in items], pool.map(_size, [u for _, u in items]), strict=True))


if __name__ == "__main__":
    runtime = ROOT / "requirements.lock"
    for variant, lock in VARIANTS.items():
        drop = SDIST_ONLY | ({"torch"} if variant == "cu126" else set())  # torch+cu126: PyTorch's index only
        reqs = requirement_lines(runtime, ROOT / lock, drop=drop)
        report = resolve(reqs, no_deps=variant == "cu126")
        sizes = wheel_bytes(report)
        big = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
        print(f"{variant}: {len(sizes)} wheels, {sum(sizes.values()) / 2**30:.2f} GiB "
              f"(largest: {', '.join(f'{n} {s / 2**20:.0f} MiB' for n, s in big)})")
