"""The `helm` side of submit/cancel: one run = one Helm release of charts/sftjob.

We shell out to the helm binary rather than re-implementing it, so a run is an ordinary release
(`helm list`, `helm get values`, `helm uninstall` keep working). The values file is checked
locally first (the RunSpec under `run:`), so a typo is exit 64 before anything touches the cluster.
Helm's errors are mapped onto the exit codes the Python client path uses (77, 69, 66, 64).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from job import specload
from job.errors import ConfigError, NotFoundError, PermissionDeniedError, SftjobError, UnavailableError

REPO = Path(__file__).resolve().parents[2]
NAME_MAX = 53  # Helm's release-name limit; the Job and its pods are named after it


def binary() -> str:
    """$SFTJOB_HELM, then the pinned tools/bin/helm (`make tools`), then PATH."""
    if os.environ.get("SFTJOB_HELM"):
        return os.environ["SFTJOB_HELM"]
    pinned = REPO / "tools" / "bin" / "helm"
    if pinned.exists():
        return str(pinned)
    if found := shutil.which("helm"):
        return found
    raise UnavailableError("helm not found (SFTJOB_HELM, tools/bin/helm, PATH)",
                           hint="run `make tools` to install the pinned helm, or set SFTJOB_HELM")


def default_chart() -> str:
    return os.environ.get("SFTJOB_CHART") or str(REPO / "charts" / "sftjob")


def load_values(path: str) -> dict:
    """A Helm values file (RunSpec under `run:`) or a bare RunSpec, wrapped under `run:`;
    the RunSpec is validated with the same rules `sftjob run` applies."""
    p = Path(path)
    data = specload.read_yaml_mapping(p, missing="values file not found", missing_hint="pass -f my-run.yaml",
                                     not_mapping="expected a mapping (Helm values with `run:`, or a run spec)")
    values = data if isinstance(data.get("run"), dict) else {"run": data}
    # the operator's SFTJOB_* env doesn't reach the pods, so it must not shape this check either
    spec = specload.build(tree=values["run"], source=f"{p}, under run:" if values is data else str(p), environ={})
    # the canonical nested form (flat keys and shorthands resolved) is what the chart's schema checks
    return {**values, "run": spec.model_dump(mode="json", exclude_unset=True)}


def output_uri(run: dict) -> str | None:
    out = (run or {}).get("output")
    return out.get("uri") if isinstance(out, dict) else out


def release_name(explicit: str | None, values: dict, path: str) -> str:
    """--name, else the spec's `name`, else the file name; a DNS-1123 label short enough for pods."""
    if explicit:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", explicit) or len(explicit) > NAME_MAX:
            raise ConfigError(f"invalid --name {explicit!r}",
                              hint=f"lower-case letters, digits and '-', at most {NAME_MAX} characters")
        return explicit
    raw = values.get("run", {}).get("name") or Path(path).name.split(".")[0]
    name = re.sub(r"[^a-z0-9-]+", "-", str(raw).lower()).strip("-")[:NAME_MAX].rstrip("-")
    if not name:
        raise ConfigError(f"cannot derive a run name from {path}", hint="pass --name")
    return name


def _fail(action: str, name: str, namespace: str, stderr: str) -> SftjobError:
    text = stderr.strip().removeprefix("Error: ")
    m = re.search(r'cannot (\w+) resource "([^"]+)" in API group "([^"]*)"', text)
    if m or " is forbidden" in text:
        what = f"{m.group(2)}{'.' + m.group(3) if m.group(3) else ''}" if m else "a resource"
        verb = m.group(1) if m else action
        return PermissionDeniedError(f'forbidden: cannot {verb} {what} in namespace "{namespace}" '
                                     f"(helm {action})\n  helm: {text}",
                                     hint=f"ask for a Role that allows '{verb}' on '{what}' in {namespace}")
    if "cannot re-use a name that is still in use" in text:
        return ConfigError(f'a release named "{name}" already exists in namespace "{namespace}"',
                           hint=f"pick another --name, or remove the old run: sftjob cancel {name}")
    if re.search(r"release: not found|Release not loaded", text):
        return NotFoundError(f'no release "{name}" in namespace "{namespace}"', hint="see `sftjob list`")
    if re.search(r"unreachable|connection refused|no such host|i/o timeout|EOF|TLS handshake", text):
        return UnavailableError(f"helm {action}: cannot reach the cluster\n  helm: {text}",
                                hint="check KUBECONFIG / the current context and `kubectl cluster-info`")
    return ConfigError(f"helm {action} {name} failed:\n  {text}", hint="see the chart's values.yaml")


def _run(args: list[str], action: str, name: str, namespace: str, context: str | None) -> str:
    cmd = [binary(), *args, "--namespace", namespace] + (["--kube-context", context] if context else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"helm {action} {name} did not finish in 10 minutes") from None
    if proc.returncode != 0:
        raise _fail(action, name, namespace, proc.stderr or proc.stdout)
    return proc.stdout


def install(name: str, values: dict, namespace: str, *, chart: str | None = None,
            context: str | None = None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{name}-values-") as f:
        yaml.safe_dump(values, f, sort_keys=False)
        f.flush()
        return _run(["install", name, chart or default_chart(), "-f", f.name], "install", name, namespace, context)


def uninstall(name: str, namespace: str, *, context: str | None = None) -> str:
    return _run(["uninstall", name], "uninstall", name, namespace, context)
