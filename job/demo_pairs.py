"""Spanish preference pairs, generated deterministically: the chosen answer, and the same words reversed as
the rejected one (a preference a tiny model can learn in a minute, with no labeller)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from job.demo_data import _turn


def pairs(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q, a = _turn(rng)
        bad = " ".join(reversed(a.split()))
        if bad != a:
            out.append({"prompt": [{"role": "user", "content": q}],
                        "chosen": [{"role": "assistant", "content": a}],
                        "rejected": [{"role": "assistant", "content": bad}]})
    return out


def write_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs(n, seed)))
    return path
