"""The fast path's choices: attention kernel / packed-row masking, Liger, and where they are reported.

No CUDA GPU exists on the machines these tests run on, so the CUDA branches are exercised through the
choice functions with the availability passed in; the CPU branch also runs for real (a packed run's plan
and status say sdpa with a dense mask).
"""
from __future__ import annotations

import json

import pytest

from job import spec as specmod
from job import specload
from job.train import fastpath
from job.train.collate import Collator
from job.train.fastpath import choose_attention, choose_liger


@pytest.mark.parametrize("flash,flex,want", [
    (True, True, ("flash_attention_2", "varlen", True)),
    (False, True, ("flex_attention", "flex", False)),
    (False, False, ("sdpa", "dense", False)),
])
def test_auto_on_cuda_packs_with_varlen_then_flex_then_a_dense_mask(flash, flex, want):
    a = choose_attention("auto", cuda=True, packed=True, flash_attn=flash, flex=flex)
    assert (a.implementation, a.packing, a.flatten) == want
    assert (a.note is not None) == (want[0] == "sdpa")  # the dense fallback says why


def test_auto_without_packing_on_cuda_is_flash_or_sdpa_and_on_cpu_always_sdpa():
    assert choose_attention("auto", cuda=True, packed=False, flash_attn=True, flex=True).implementation == "flash_attention_2"
    assert choose_attention("auto", cuda=True, packed=False, flash_attn=False, flex=True).implementation == "sdpa"
    cpu = choose_attention("auto", cuda=False, packed=True, flash_attn=True, flex=True)
    assert (cpu.implementation, cpu.packing, cpu.flatten, cpu.note) == ("sdpa", "dense", False, None)


@pytest.mark.parametrize("requested,cuda,flash,flex,impl,note", [
    ("flash_attention_2", True, False, True, "flex_attention", "flash_attn is not installed"),
    ("flash_attention_2", False, True, True, "sdpa", "needs a CUDA GPU"),
    ("flex_attention", False, False, True, "sdpa", "no backward on CPU"),
    ("flex_attention", True, False, False, "sdpa", "no FlexAttention"),
    ("flex_attention", True, True, True, "flex_attention", None),
    ("eager", True, True, True, "eager", None),
])
def test_an_explicit_kernel_that_cannot_run_falls_back_with_a_message(requested, cuda, flash, flex, impl, note):
    a = choose_attention(requested, cuda=cuda, packed=True, flash_attn=flash, flex=flex)
    assert a.implementation == impl
    assert (note is None and a.note is None) or note in a.note


def test_liger_is_on_where_it_applies_and_a_forced_request_that_cannot_run_says_why():
    assert choose_liger(None, cuda=True, installed=True) == (True, None)
    assert choose_liger(False, cuda=True, installed=True) == (False, None)
    assert choose_liger(None, cuda=False, installed=True) == (False, None)  # default on CPU: quietly off
    on, note = choose_liger(True, cuda=False, installed=True)
    assert not on and "CUDA" in note
    on, note = choose_liger(True, cuda=True, installed=False)
    assert not on and "liger-kernel is not installed" in note


def test_the_knobs_are_in_the_schema_and_the_cli():
    s = specload.build(None, {"model.attn_implementation": "flex_attention", "train.use_liger_kernel": True})
    assert s.model.attn_implementation == "flex_attention" and s.train.use_liger_kernel is True
    assert specmod.FLAGS_BY_PATH["train.use_liger_kernel"] == "use-liger-kernel"
    defs = specload.json_schema()["$defs"]
    assert {"flash_attention_2", "flex_attention"} <= set(defs["ModelSpec"]["properties"]["attn_implementation"]["enum"])
    assert "use_liger_kernel" in defs["TrainSpec"]["properties"]


def test_image_kernels_match_the_cuda_lockfiles():
    from test_chart_helpers import ROOT

    for lock in ("requirements-cuda13.lock", "requirements-cuda12.lock"):
        text = (ROOT / lock).read_text()
        assert ("liger-kernel==" in text) == fastpath.IMAGE_KERNELS["liger_kernel"]
        assert ("flash-attn==" in text or "flash_attn==" in text) == fastpath.IMAGE_KERNELS["flash_attn"]


def test_flash_varlen_collator_flattens_a_packed_batch_into_one_row_with_restarting_positions():
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [9, 10], "labels": [9, 10], "position_ids": [0, 1]}]
    batch = Collator(0, packed=True, flatten=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]] and "attention_mask" not in batch


def test_plan_of_a_packed_gpu_recipe_reports_flex_document_masking_and_liger(capsys):
    """Planned off-cluster (no CUDA here): the plan describes the image's kernels on the pods."""
    from test_chart_helpers import ROOT

    from job import cli

    recipe, config = ROOT / "examples" / "llama3-8b-zero3.yaml", ROOT / "examples" / "configs" / "Llama-3.1-8B.json"
    assert cli.main(["plan", "--config", str(recipe), "--model-config", str(config), "--json"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{"):])
    assert "flex_attention" in plan["attention"] and "flex document masking" in plan["attention"]
    assert plan["use_liger_kernel"] is True
    assert cli.main(["plan", "--config", str(recipe), "--model-config", str(config), "--no-use-liger-kernel",
                     "--attn-implementation", "sdpa"]) == 0
    assert "attention        sdpa, packed rows: dense block-diagonal mask; Liger kernels off" in capsys.readouterr().out
