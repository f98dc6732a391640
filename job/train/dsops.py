"""DeepSpeed ops that spec knobs need, checked before any fetch (`validate` and `run` exit 64, naming the knob).

`distributed.offload_optimizer` runs the optimizer on the CPU with DeepSpeed's cpu_adam op. The image
prebuilds it for the CUDA accelerator (Dockerfile: DS_BUILD_CPU_ADAM=1); anywhere else DeepSpeed JIT-compiles it
on first use, which needs a C++ compiler. Without either, every rank dies with "DeepSpeedCPUAdam requires the
cpu_adam op" (exit 1, retried as a crash): a config problem, so it is refused up front instead.
The probe runs in a child process and takes one optimizer step: DeepSpeed compiles the op with -march=native,
so an image built on a newer CPU than the node's dies with SIGILL there, not in every rank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from job.errors import ConfigError

_PROBE = r"""
import json, os, shutil
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import accelerator_name, installed_ops

acc = get_accelerator()
b = acc.create_op_builder("CPUAdamBuilder")
if b is None:
    out = {"ok": False, "why": f"the {acc._name} accelerator has no cpu_adam op"}
elif installed_ops.get("cpu_adam") and accelerator_name == acc._name:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = torch.nn.Parameter(torch.zeros(64))
    p.grad = torch.ones(64)
    DeepSpeedCPUAdam([p]).step()  # one real step: an op built for a newer CPU (-march=native) dies here
    out = {"ok": True, "how": "prebuilt"}
elif not b.is_compatible(False):
    out = {"ok": False, "why": "DeepSpeed reports it incompatible here: " + " ".join(b.error_log or [])}
else:
    cxx = os.environ.get("CXX", "c++")
    out = ({"ok": True, "how": "jit"} if shutil.which(cxx) else
           {"ok": False, "why": f"it is not prebuilt for the {acc._name} accelerator and there is no C++ "
                                f"compiler ({cxx}) to build it"})
print("SFTJOB_PROBE " + json.dumps(out))
"""


def probe_cpu_adam(timeout: float = 180) -> dict:
    """{"ok": bool, "how": prebuilt|jit} or {"ok": False, "why": ...}; never compiles anything."""
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"ok": False, "why": f"probing it took over {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("SFTJOB_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    if p.returncode < 0:
        return {"ok": False, "why": f"running it killed the probe (signal {-p.returncode}; built for another CPU?)"}
    last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return {"ok": False, "why": f"loading it failed ({last})"}


def check(spec, environ: dict[str, str] | None = None) -> None:
    """Raise ConfigError (64) when a DeepSpeed run asks for an op that cannot load here."""
    if not spec.distributed.offload_optimizer:
        return
    from job.train.launch import resolved

    try:
        if resolved(spec, environ).strategy != "deepspeed":
            return  # offload is a DeepSpeed setting; the other strategies ignore it
    except ConfigError:
        return  # the run reports a bad topology itself
    result = probe_cpu_adam()
    if not result["ok"]:
        raise ConfigError(
            f"distributed.offload_optimizer (--offload-optimizer) needs DeepSpeed's cpu_adam op, which cannot "
            f"load here: {result['why']}",
            hint="set offload_optimizer: false (--no-offload-optimizer), run in the sftjob image (cpu_adam is "
                 "prebuilt for CUDA), or install a C++ compiler so DeepSpeed can build it")
