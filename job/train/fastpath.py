"""The fast path: which attention kernel and how packed rows are masked, and whether Liger kernels are on.

Packed bins carry restarting position_ids and no attention_mask. transformers turns that into a
document mask: a dense block-diagonal (rows x rows) mask for sdpa/eager, a block-sparse BlockMask for
flex_attention (blocks across documents are skipped), and for flash_attention_2 the collator flattens the
batch into one row that the varlen kernel splits at position 0 (no mask at all). On CUDA the job picks the
cheapest one installed and says so (plan, log, status.json); where a kernel is missing it falls back, with
a message. On CPU it is sdpa: FlexAttention has no backward on CPU (torch 2.13) and flash-attn needs CUDA.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Attention:
    implementation: str  # passed to from_pretrained(attn_implementation=...)
    packing: str | None  # varlen | flex | dense; None when rows are not packed
    flatten: bool  # the collator concatenates a packed batch into one row (flash varlen)
    note: str | None = None  # why the request or the fast path was not taken

    def describe(self) -> str:
        how = {"varlen": "varlen (FlashAttention, no mask)", "flex": "flex document masking (block-sparse)",
               "dense": "dense block-diagonal mask", None: "not packed"}[self.packing]
        return f"{self.implementation}, packed rows: {how}" + (f" — {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return asdict(self)


# What the image installs (requirements-cuda13.lock / -cuda12.lock): the plan of a GPU run made off-cluster.
IMAGE_KERNELS = {"flash_attn": False, "flex": True, "liger_kernel": True}


def kernels() -> dict[str, bool]:
    """What this Python can load: flash_attn (a separate CUDA wheel) and torch's FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401

        flex = True
    except ImportError:
        flex = False
    return {"flash_attn": importlib.util.find_spec("flash_attn") is not None, "flex": flex,
            "liger_kernel": importlib.util.find_spec("liger_kernel") is not None}


def choose_attention(requested: str, *, cuda: bool, packed: bool, flash_attn: bool, flex: bool) -> Attention:
    """requested: spec.model.attn_implementation. Availability is passed in so the choice is testable anywhere."""
    def pick(impl: str, note: str | None = None) -> Attention:
        packing = None if not packed else {"flash_attention_2": "varlen", "flex_attention": "flex"}.get(impl, "dense")
        return Attention(impl, packing, packed and impl == "flash_attention_2", note)

    if requested in ("sdpa", "eager"):
        return pick(requested)
    if not cuda:
        note = None if requested == "auto" else (
            f"{requested} needs a CUDA GPU (FlexAttention has no backward on CPU); using sdpa")
        return pick("sdpa", note)
    if requested in ("auto", "flash_attention_2") and flash_attn:
        return pick("flash_attention_2")
    if requested == "flash_attention_2":  # asked for, not installed: the next best
        return pick("flex_attention" if packed and flex else "sdpa",
                    "flash_attention_2 requested but flash_attn is not installed (pip install flash-attn)")
    if requested == "flex_attention" and not flex:
        return pick("sdpa", "flex_attention requested but this torch has no FlexAttention")
    if requested == "flex_attention" or (packed and flex):
        return pick("flex_attention")
    if packed:
        return pick("sdpa", "neither flash_attn nor FlexAttention is available")
    return pick("sdpa")


def choose_liger(requested: bool | None, *, cuda: bool, installed: bool) -> tuple[bool, str | None]:
    """train.use_liger_kernel: None = on where it applies (CUDA and liger-kernel installed, as in the image)."""
    if not cuda:
        return False, None if requested is not True else "use_liger_kernel needs a CUDA GPU (Triton); off"
    if not installed:
        return False, None if requested is not True else (
            "use_liger_kernel: liger-kernel is not installed (requirements-cuda13.lock, in the image); off")
    return requested is not False, None


def resolve(spec, cuda: bool, available: dict | None = None) -> dict:
    """The fast-path decisions a run records in its launch plan and status.json."""
    if available is None:  # off CUDA no kernel is used (sdpa, no Liger): torch is not imported to find out
        available = kernels() if cuda else {"flash_attn": False, "flex": False, "liger_kernel": False}
    k = available
    attn = choose_attention(spec.model.attn_implementation, cuda=cuda, packed=spec.data.packing,
                            flash_attn=k["flash_attn"], flex=k["flex"])
    liger, liger_note = choose_liger(spec.train.use_liger_kernel, cuda=cuda, installed=k["liger_kernel"])
    return {"attention": attn.as_dict(), "attention_summary": attn.describe(),
            "use_liger_kernel": liger, "liger_note": liger_note}
