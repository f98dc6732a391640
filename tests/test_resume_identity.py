"""Resume refuses a checkpoint made under another spec (job/identity.py), with a real checkpoint.

One tiny run (single process, 4 steps, a checkpoint every 2) is trained once for the module; each test
works on a copy of its output with ``_SUCCESS`` and ``manifest.json`` removed: the state a run is in
when it was interrupted after its checkpoints reached the output and before it published.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trainkit

from job import checkpoints, identity, specload
from job.errors import ConfigError, ExitCode
from job.train import reshard

STEPS = 4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    data = root / "data.jsonl"
    shutil.copy(trainkit.chat_data(), data)
    out = root / "out"
    r = trainkit.run(*trainkit.steady_args(out, STEPS, "--save-steps", "2"), "--data", str(data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoints.complete_steps(str(out)) == [2, 4]
    return {"out": out, "data": data, "args": trainkit.steady_args(out, STEPS, "--save-steps", "2")[1:]}


def unpublished(made, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(made["out"], out)
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()
    return out


def args(made, out, *extra) -> list[str]:
    """The fixture run's arguments with another output, then `extra` (later flags win)."""
    a = list(made["args"])
    a[a.index("--output") + 1] = str(out)
    return ["run", *a, "--data", str(made["data"]), *extra]


def spec_of(made, out, **overrides):
    """The fixture run's spec (as trainkit.steady_args gives it) with dotted-path overrides."""
    tree = {"model": str(trainkit.tiny_model()), "data": {"path": str(made["data"]), "max_length": 256},
            "output": str(out), "resilience": {"save_steps": 2},
            "train": {"max_steps": STEPS, "logging_steps": 1, "seed": 3, "learning_rate": 1e-3,
                      "per_device_train_batch_size": 2, "lr_scheduler_type": "constant"}}
    return specload.build(tree=tree, overrides=overrides, environ={})


def test_the_marker_records_what_defines_the_run(made):
    marker = json.loads((made["out"] / "checkpoints" / "step-4" / "COMPLETE").read_text())
    ident = marker["identity"]
    assert ident["train.lora_r"] == 16 and ident["train.max_steps"] == STEPS
    assert ident["data.sources"] == [{"path": str(made["data"]), "weight": 1.0}]
    assert ident["model.path"] == str(trainkit.tiny_model())
    for key in identity.CONTENT_FIELDS:
        assert key in ident
    assert ident["data.prepared"] and ident["model.files"] and ident["chat_template.sha256"]
    # what may change on resume is not part of it
    assert not any(k.startswith(("distributed.", "storage.", "resilience.", "output.")) for k in ident)
    assert "train.per_device_train_batch_size" not in ident and "train.report_to" not in ident


def test_the_unchanged_spec_passes_and_what_may_change_on_resume_does(made, tmp_path):
    out = unpublished(made, tmp_path)
    assert identity.check_before_fetch(spec_of(made, out), str(out), node_rank=0) is False
    free = {"distributed.num_processes": 2, "distributed.strategy": "ddp", "resilience.save_steps": 5,
            "train.logging_steps": 3, "train.report_to": ["tensorboard"], "storage.read_timeout": 7,
            "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2,
            "train.gradient_checkpointing": True, "model.attn_implementation": "eager", "output.overwrite": True,
            "resilience.grace_seconds": 120}
    for path, value in free.items():
        assert identity.check_before_fetch(spec_of(made, out, **{path: value}), str(out), node_rank=0) is False, path
    assert checkpoints.complete_steps(str(out)) == [2, 4]  # nothing removed


# one case per class of field: base model, method and LoRA shape, objective, data, template,
# preparation, seed, schedule
CHANGED = [
    ("model.path", "OTHER_MODEL", "model.path (--model)"),
    ("train.lora_r", 8, "train.lora_r (--lora-r): 16 → 8"),
    ("train.method", "full", "train.method (--method): lora → full"),
    ("train.use_dora", True, "train.use_dora (--use-dora): false → true"),
    ("train.target_modules", ["q_proj"], "train.target_modules (--target-modules)"),
    ("train.objective", "dpo", "train.objective (--objective): sft → dpo"),
    ("data.path", "OTHER_DATA", "data.sources (--data, data.sources): "),
    ("model.chat_template", "chatml", "model.chat_template (--chat-template): null → chatml"),
    ("data.max_length", 128, "data.max_length (--max-length): 256 → 128"),
    ("data.packing", True, "data.packing (--packing): false → true"),
    ("train.seed", 4, "train.seed (--seed): 3 → 4"),
    ("train.learning_rate", 2e-3, "train.learning_rate (--learning-rate): 0.001 → 0.002"),
    ("train.lr_scheduler_type", "cosine", "train.lr_scheduler_type (--lr-scheduler-type): constant → cosine"),
    ("train.max_steps", 3, "train.max_steps (--max-steps): 3 is below the checkpoint's step 4"),
]


@pytest.mark.parametrize("path,value,line", CHANGED, ids=[c[0] for c in CHANGED])
def test_a_changed_defining_field_is_refused_before_any_fetch_naming_old_and_new(made, tmp_path, path, value, line):
    out = unpublished(made, tmp_path)
    if value == "OTHER_MODEL":
        value = str(shutil.copytree(trainkit.tiny_model(), tmp_path / "other-model"))
    if value == "OTHER_DATA":
        value = str(shutil.copy(made["data"], tmp_path / "other.jsonl"))
    with pytest.raises(ConfigError) as e:
        identity.check_before_fetch(spec_of(made, out, **{path: value}), str(out), node_rank=0)
    assert e.value.exit_code == ExitCode.CONFIG
    assert line in e.value.message, e.value.message
    assert "checkpoints/step-4 (step 4) was made by a run with a different spec" in e.value.message
    assert "--overwrite" in e.value.hint and "new --output" in e.value.hint and "restore" in e.value.hint
    assert checkpoints.complete_steps(str(out)) == [2, 4]  # refused: nothing removed


def test_the_cli_refuses_another_lora_rank_with_64_before_fetching_anything(made, tmp_path):
    """Was: a size-mismatch traceback in the rank, exit 71 'retryable', a crash loop under backoffLimit."""
    out = unpublished(made, tmp_path)
    cache = tmp_path / "cache"
    r = trainkit.run(*args(made, out, "--lora-r", "8"), env={"SFTJOB_CACHE_DIR": str(cache)})
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]
    err = r.stdout + r.stderr
    assert "train.lora_r (--lora-r): 16 → 8" in err and "Traceback" not in err
    assert err.count("fix:") == 1
    assert not (cache / "prepared").exists() and not (cache / "inputs").exists()  # nothing prepared or fetched
    assert checkpoints.complete_steps(str(out)) == [2, 4]


def test_max_steps_below_the_checkpoint_is_refused_not_published(made, tmp_path):
    """Was: 'step 4/2', a 4-step adapter published with rc 0 and run.yaml saying max_steps: 2."""
    out = unpublished(made, tmp_path)
    r = trainkit.run(*args(made, out, "--max-steps", "2"))
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]
    assert "train.max_steps (--max-steps): 2 is below the checkpoint's step 4" in r.stderr
    assert not (out / "_SUCCESS").exists()


def test_data_changed_under_the_same_path_is_refused_after_prepare_before_training(made, tmp_path):
    """Was: resumed silently; the adapter trained on two datasets."""
    out = unpublished(made, tmp_path)
    data = made["data"]
    saved = data.read_bytes()
    try:
        rows = saved.splitlines()
        data.write_bytes(b"\n".join(rows[len(rows) // 2:] + rows[:len(rows) // 2]) + b"\n")  # same rows, other file
        r = trainkit.run(*args(made, out))
    finally:
        data.write_bytes(saved)
    assert r.returncode == ExitCode.CONFIG, r.stderr[-2000:]
    assert "data.prepared: " in r.stderr and "changed under the same names" in r.stderr
    assert "launching" not in r.stdout + r.stderr  # no rank started
    assert checkpoints.complete_steps(str(out)) == [2, 4]


def test_a_longer_constant_schedule_continues_the_run(made, tmp_path):
    """The one exception: the LR does not depend on the length, so 4 → 6 steps is the 6-step run."""
    out = unpublished(made, tmp_path)
    r = trainkit.run(*args(made, out, "--max-steps", "6"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from complete checkpoint step-4" in r.stdout + r.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 6 and 5 in steps
    assert "max_steps: 6" in (out / "run.yaml").read_text()


def test_overwrite_starts_over_instead_of_resuming_another_spec(made, tmp_path):
    out = unpublished(made, tmp_path)
    r = trainkit.run(*args(made, out, "--lora-r", "8", "--overwrite"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "starting over" in log and "resuming from" not in log
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    marker = json.loads((out / "checkpoints" / "step-4" / "COMPLETE").read_text())
    assert marker["identity"]["train.lora_r"] == 8  # the new run's own checkpoints


def test_a_marker_whose_identity_is_not_an_object_is_skipped_like_a_corrupt_one(made, tmp_path):
    out = unpublished(made, tmp_path)
    marker = out / "checkpoints" / "step-4" / "COMPLETE"
    doc = json.loads(marker.read_text())
    marker.write_text(json.dumps({**doc, "identity": ["train.lora_r", 8]}))
    step, older = checkpoints.newest_marker(str(out))
    assert step == 2 and older["identity"]["train.lora_r"] == 16
    found = checkpoints.find_and_fetch(str(out), tmp_path / "resume")
    assert found.step == 2
    marker.write_text(json.dumps({k: v for k, v in doc.items() if k != "identity"}))  # an older job's marker
    assert identity.check_before_fetch(spec_of(made, out, **{"train.lora_r": 8}), str(out), node_rank=0) is False


def test_the_length_exception_holds_only_where_the_lr_does_not_depend_on_it(made):
    saved = identity.of_spec(spec_of(made, "/tmp/x"))
    for sched, warm, allowed in (("constant", 0.03, True), ("constant_with_warmup", 0.0, True),
                                 ("constant_with_warmup", 0.1, False), ("cosine", 0.0, False), ("linear", 0.0, False)):
        was = {**saved, "train.lr_scheduler_type": sched, "train.warmup_ratio": warm}
        for key, value in (("train.max_steps", 9), ("train.num_train_epochs", 3.0)):
            lines = identity.differences(was, {**was, key: value}, step=4)
            assert (lines == []) == allowed, (sched, warm, key, lines)
    assert identity.differences(saved, {**saved, "train.max_steps": 3}, step=4)  # never below the step
    # a field only one side knows (another job version) is not compared
    assert identity.differences({**saved, "train.future_knob": 1}, saved, step=4) == []


def test_a_changed_micro_batch_on_the_same_count_keeps_the_global_batch(tmp_path):
    from job.spec import RunSpec
    from job.train.launch import Topology

    topo = Topology("single", 1, 1, 1, 0, "127.0.0.1", 1, "no", False)
    spec = RunSpec.model_validate({"train": {"per_device_train_batch_size": 4}})
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    (ck / "optimizer.pt").write_bytes(b"x")
    (ck / reshard.WORLD_FILE).write_text(json.dumps(reshard.plan_resume(None, spec, topo).record))
    smaller = RunSpec.model_validate({"train": {"per_device_train_batch_size": 2}})
    r = reshard.plan_resume(ck, smaller, topo)
    assert (r.spec.train.per_device_train_batch_size, r.spec.train.gradient_accumulation_steps) == (2, 2)
    assert r.record["global_batch"] == 4 and "global batch 4 (kept)" in r.message
