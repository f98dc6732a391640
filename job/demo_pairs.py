"""Spanish preference pairs, generated deterministically: the chosen answer, and the same words reversed as
the rejected one (a preference a tiny model can learn in a minute, with no labeller)."""
from __future__ import annotations

import random
from pathlib import Path

from job.demo_data import chat_turn, write_rows


def pairs(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q, a = chat_turn(rng)
        bad = " ".join(reversed(a.split()))
        if bad != a:
            out.append({"prompt": [{"role": "user", "content": q}],
                        "chosen": [{"role": "assistant", "content": a}],
                        "rejected": [{"role": "assistant", "content": bad}]})
    return out


def write_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    return write_rows(path, pairs(n, seed))
