"""What the launcher asks of its host: the GPUs it has (without importing torch where there is no GPU driver),
and the imports the entrypoint will need after training, done while the ranks train."""
from __future__ import annotations

import os
import threading


def no_gpu_driver() -> bool:
    """No NVIDIA (or ROCm) kernel driver on this host, so torch could find no GPU: answered without importing
    torch, which costs every CPU run 1.3 s before its ranks start. A GPU pod always has the driver's files
    (the device plugin mounts /dev/nvidia*; /proc/driver/nvidia comes with the driver)."""
    import glob

    return not (os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/nvidia[0-9]*")
                or os.path.exists("/dev/kfd"))


def visible_gpus() -> tuple[int, bool]:
    """(CUDA devices torch sees, whether they do bf16)."""
    if no_gpu_driver():
        return 0, False
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n, n > 0 and torch.cuda.is_bf16_supported()


#: what the entrypoint imports after training (verify: torch, the model classes, peft; plots: matplotlib)
WARM = ("torch", "safetensors.torch", "transformers", "transformers.models.auto.modeling_auto", "peft")


def warm_imports() -> threading.Thread:
    """Import what the entrypoint needs after training while the ranks train: 3.5 s of imports (measured with
    -X importtime on a 2-step CPU run) that every run paid serially between its last step and its publish.
    A daemon thread: an import that fails here fails again, with its message, where it is used."""
    def run() -> None:
        import importlib

        for name in WARM:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported where the module is really used
                return
        try:
            import matplotlib

            matplotlib.use("Agg")  # as job/train/plots.py does, before pyplot
            importlib.import_module("matplotlib.pyplot")
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=run, name="sftjob-warm-imports", daemon=True)
    t.start()
    return t
