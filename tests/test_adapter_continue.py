"""Continue from a published adapter (`--adapter`): real tiny-model runs. The child starts from the parent's
weights (its first loss is near the parent's last, far below the base's first), the manifest records the
parent and its sha256, and an adapter that does not fit, or a run that is not sealed, is refused with 64
before any training process starts."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from trainkit import chat_data, run, tiny_model

from job import publish
from job.errors import ConfigError

COMMON = ["--learning-rate", "2e-3", "--per-device-train-batch-size", "8", "--warmup-ratio", "0",
          "--max-length", "256", "--logging-steps", "1", "--lr-scheduler-type", "constant"]


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if x.strip() and json.loads(x).get("loss") is not None]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    d = tmp_path_factory.mktemp("parent")
    p = run("run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(d / "out"),
            "--max-steps", "30", "--cache-dir", str(d / "cache"), *COMMON, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "out"


@pytest.mark.slow
def test_child_starts_from_the_parent_and_records_it(parent, tmp_path):
    out = tmp_path / "child"
    p = run("run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(out),
            "--adapter", str(parent), "--max-steps", "4", "--cache-dir", str(tmp_path / "cache"), *COMMON, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    base, child = _losses(parent), _losses(out)
    assert base[0] - child[0] > 0.4, (base[0], base[-1], child[0])  # not the base's starting point
    assert abs(child[0] - base[-1]) < 0.35, (base[-1], child[0])  # where the parent left off
    manifest = publish.verify_published(str(out))
    sha = hashlib.sha256((parent / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert manifest["parent_adapter"]["sha256"] == sha
    assert manifest["parent_adapter"]["uri"] == str(parent)
    parent_run_id = json.loads((parent / "manifest.json").read_text())["run_id"]
    assert manifest["parent_adapter"]["run_id"] == parent_run_id


def _refused(tmp_path, adapter) -> str:
    p = run("run", "--model", str(tiny_model()), "--data", str(chat_data()), "--output", str(tmp_path / "o"),
            "--adapter", str(adapter), "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"), *COMMON, timeout=600)
    assert p.returncode == 64, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "launching" not in p.stderr  # before any training process
    return p.stderr


@pytest.mark.slow
def test_an_adapter_of_another_shape_is_refused_before_training(parent, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(parent / "adapter_config.json", bad)
    tensors = load_file(str(parent / "adapter_model.safetensors"))
    key = next(k for k in tensors if ".lora_A." in k)
    tensors[key] = tensors[key][:, :-8].contiguous()  # as if trained on a base with a narrower hidden size
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    err = _refused(tmp_path, bad)
    assert "does not fit the base" in err and key.split(".lora_A")[0].rsplit(".", 1)[-1] in err


@pytest.mark.slow
def test_an_unsealed_published_run_is_refused(parent, tmp_path):
    copy = tmp_path / "unsealed"
    shutil.copytree(parent, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "_SUCCESS").unlink()
    err = _refused(tmp_path, copy)
    assert "not a sound published run" in err and "_SUCCESS" in err
    assert err.count("fix:") == 1 and "--adapter" in err.split("fix:")[1]  # one fix, about the input


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An adapter for the tiny base as PEFT saves one (lora_B moved, as if trained), without a run."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from job.specload import build
    from job.train import lora

    d = tmp_path_factory.mktemp("made") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model())),
                           lora.peft_config(build(overrides={"model.path": str(tiny_model())}, environ={})))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p)
    model.save_pretrained(str(d))
    return d


def _variant(made, tmp_path, change) -> Path:
    """A copy of `made` whose tensors `change` rewrites."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "variant"
    shutil.copytree(made, d)
    tensors = load_file(str(made / "adapter_model.safetensors"))
    save_file(change(tensors), str(d / "adapter_model.safetensors"))
    return d


def _fetch(adapter):
    from job.specload import build
    from job.train import parent

    return parent.fetch(build(overrides={"model.path": str(tiny_model()), "model.adapter": str(adapter)},
                              environ={}), str(tiny_model()))


def test_the_made_adapter_fits(made):
    assert _fetch(made).path == made


def test_an_input_adapter_of_another_shape_gets_one_fix_about_the_input(made, tmp_path):
    def narrow(t):
        key = next(k for k in t if ".lora_A." in k)
        return {**t, key: t[key][:, :-8].contiguous()}  # as if trained on a base with a narrower hidden size

    bad = _variant(made, tmp_path, narrow)
    err = _refused(tmp_path, bad)
    assert "does not fit the base" in err and "expected" in err
    assert err.count("fix:") == 1, err  # not also the output verifier's "nothing was published" fix
    assert "--adapter" in err.split("fix:")[1] and "nothing was published" not in err


def test_an_adapter_for_modules_the_base_lacks_is_refused(made, tmp_path):
    bad = _variant(made, tmp_path, lambda t: {k.replace(".q_proj.", ".query."): v for k, v in t.items()})
    with pytest.raises(ConfigError, match=r"no module model\.layers\.0\.self_attn\.query") as e:
        _fetch(bad)
    assert str(e.value).count("fix:") == 1


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "adapter_config.json"])
def test_an_unreadable_input_adapter_is_a_config_error(made, tmp_path, broken):
    bad = tmp_path / "bad"
    shutil.copytree(made, bad)
    (bad / broken).write_bytes(b"{not an adapter")
    with pytest.raises(ConfigError, match="does not read") as e:
        _fetch(bad)
    assert str(e.value).count("fix:") == 1
