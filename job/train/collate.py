"""The SFT batch: how prepared examples (job/data/prepare.py, packed or not) become the trainer's tensors.
Shared by the rank (job/train/sft.py), the evaluator's loss and the GPU benchmarks."""
from __future__ import annotations


class Collator:
    """Pads examples; packed bins go padding-free: per-example position_ids and no attention_mask.

    Transformers builds a block-diagonal mask from restarting position_ids when no attention_mask is
    given, so attention never crosses examples. With flash-attention (varlen) a batch becomes one long
    row; with sdpa/eager rows stay separate (mask cost grows with the row, not the batch) and a short
    bin is padded with its own position-0 segment, which no real token attends to. Counts tokens.
    """

    def __init__(self, pad_id: int, packed: bool, flatten: bool = False):
        self.pad_id, self.packed, self.flatten = pad_id, packed, flatten
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        for r in rows:
            self.tokens += len(r["input_ids"])
            self.trained_tokens += sum(1 for x in r["labels"] if x != -100)
        if self.packed and self.flatten:
            cat = lambda k: torch.tensor([x for r in rows for x in r[k]], dtype=torch.long)[None]  # noqa: E731
            return {"input_ids": cat("input_ids"), "labels": cat("labels"), "position_ids": cat("position_ids")}
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(width - n)
            mask[i, :n] = 1
        if self.packed:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
