"""The ops DeepSpeed compiles just in time, built once by the launcher before any rank starts.

On CPU every DeepSpeed process group loads a shared-memory collective op (deepspeed_shm_comm) that is
compiled on first use: over 2 minutes on 2 cores, with no log line, into ~/.cache/torch_extensions. A run
killed while compiling left torch's build lock there, and every later multi-process run of that user waited
on it (file_baton.wait) until the stall watchdog's 3 x 1800 s; a second run started during the build failed
with "cannot open shared object file" (71). Now the directory is the job's (TORCH_EXTENSIONS_DIR, else under
the job cache per torch and DeepSpeed version), the build happens here under an flock and is logged, and a
lock left by a killed build is cleared. CUDA ops come prebuilt in the image (Dockerfile).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: JIT-built ops per (strategy, accelerator) this job runs: on CPU every DeepSpeed process group loads the
#: shared-memory collective op (deepspeed/comm/torch.py build_shm_op); CUDA ops come prebuilt in the image
_BUILD = r"""
import sys
from deepspeed.accelerator import get_accelerator
for name in sys.argv[1:]:
    builder = get_accelerator().create_op_builder(name)
    if builder is not None:
        builder.load()
"""


def extensions_dir(spec, environ: dict[str, str] | None = None) -> Path:
    """Where torch puts the ops DeepSpeed compiles: TORCH_EXTENSIONS_DIR when set (the chart sets it), else
    under the job's cache, per torch and DeepSpeed version (never ~/.cache/torch_extensions, which a
    killed build left locked for every later run of that user)."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = f"torch{version('torch')}-deepspeed{version('deepspeed')}"
    except PackageNotFoundError:
        tag = "default"
    return spec.cache_root() / "torch_extensions" / tag


def jit_ops(strategy: str, cuda: bool, offload_optimizer: bool = False) -> list[str]:
    """On CPU: the shared-memory collective, and cpu_adam when the optimizer is offloaded (two ranks that
    compiled it at once, outside this module's lock, failed with 'cpu_adam op failed to build/load' when the
    suite ran beside another DeepSpeed run). The image prebuilds cpu_adam for CUDA (Dockerfile)."""
    if strategy != "deepspeed" or cuda:
        return []
    return ["ShareMemCommBuilder", *(["CPUAdamBuilder"] if offload_optimizer else [])]


def clear_stale_locks(ext: Path) -> list[Path]:
    """torch's build lock (`<op>/lock`, created by FileBaton, never released by a killed build) makes every
    later load wait forever, built or not. Called with the job's own build lock held, so no build of ours
    is running: any such lock is stale. Returns those removed."""
    removed = []
    for lock in sorted(ext.glob("*/lock")):
        try:
            lock.unlink()
            removed.append(lock)
        except FileNotFoundError:
            pass
    return removed


def build_ops(spec, strategy: str, cuda: bool, *, environ: dict[str, str] | None = None,
              timeout: float = 1800) -> dict[str, str]:
    """Build the ops this run's ranks would JIT-compile, once, here, before they start (logged: minutes on
    CPU, silent before), under an flock in the extensions directory that also makes a stale torch lock
    safe to clear. Returns the environment the ranks get (TORCH_EXTENSIONS_DIR)."""
    import fcntl
    import logging
    import time

    log = logging.getLogger("sftjob.launch")
    ext = extensions_dir(spec, environ)
    ext.mkdir(parents=True, exist_ok=True)
    env = {"TORCH_EXTENSIONS_DIR": str(ext)}
    ops = jit_ops(strategy, cuda, bool(spec.distributed.offload_optimizer))
    if not ops:
        return env
    with open(ext / ".sftjob-build.lock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run on this node to finish building DeepSpeed ops in %s", ext)
            fcntl.flock(held, fcntl.LOCK_EX)
        for lock in clear_stale_locks(ext):
            log.warning("removed a stale build lock %s (a build of it was killed); building it again", lock)
        names = {"ShareMemCommBuilder": "deepspeed_shm_comm", "CPUAdamBuilder": "cpu_adam"}
        missing = [op for op in ops if not list((ext / names.get(op, op)).glob("*.so"))]
        if missing:
            log.info("building DeepSpeed op(s) %s just in time into %s (once per node and version; minutes on CPU)",
                     ", ".join(names.get(op, op) for op in missing), ext)
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, "-c", _BUILD, *ops], capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, **env, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            log.warning("building DeepSpeed op(s) took over %.0f s; the ranks will try themselves", timeout)
            clear_stale_locks(ext)
            return env
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            log.warning("building DeepSpeed op(s) %s failed (%s); the ranks will try themselves", ", ".join(ops), last)
            clear_stale_locks(ext)  # a failed build must not leave its lock for the ranks to wait on
        elif missing:
            log.info("DeepSpeed op(s) built in %.0f s", time.time() - t0)
    return env
