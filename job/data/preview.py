"""What the data commands of every objective share (job/data/commands.py for SFT, job/data/pairs_cli.py for
DPO): the input files they read and how a rendered example is cut into trained / untrained pieces."""
from __future__ import annotations

from job.data import readers


def input_files(spec):
    """Every training and eval file of the spec (fetched into the node cache): what validate/preview read."""
    inputs = spec.cache_root() / "inputs"
    if not spec.data_sources():
        spec.require("data.path")
    files = [f for s in spec.data_sources() for f in readers.expand(s.path, inputs)]
    if spec.data.eval_data:
        files += readers.expand(spec.data.eval_data, inputs)
    return files


def segments(text: str, offsets, trained) -> list[tuple[str, bool]]:
    """Rendered text cut into (piece, trained) runs, using the tokens' character offsets."""
    if not offsets:
        return [(text, False)]
    out: list[tuple[str, bool]] = []
    pos = offsets[0][0]
    for (a, b), t in zip(offsets, trained.tolist(), strict=False):
        a = max(a, pos)
        if b <= a:
            continue
        piece = text[pos:b]
        pos = b
        if out and out[-1][1] == t:
            out[-1] = (out[-1][0] + piece, t)
        else:
            out.append((piece, t))
    return out
