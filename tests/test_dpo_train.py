"""DPO on the same job, really trained on the tiny model: 50 preference pairs whose rejected answer is the
chosen one with its words reversed, 60 steps; the published adapter must prefer chosen on held-out pairs
more than the base does; the reward-accuracy gate rejects an under-trained adapter (exit 78)."""
import json
from pathlib import Path

import pytest
import trainkit

from job.demo_pairs import write_jsonl

pytestmark = pytest.mark.slow


def _args(out: Path, train: Path, evald: Path, steps: int, *extra: str) -> list[str]:
    return ["run", "--objective", "dpo", "--model", str(trainkit.tiny_model()), "--data", str(train),
            "--eval-data", str(evald), "--output", str(out), "--max-steps", str(steps), "--learning-rate", "2e-3",
            "--lora-r", "16", "--beta", "0.1", "--warmup-ratio", "0", "--per-device-train-batch-size", "4",
            "--logging-steps", "10", *extra]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", 50, seed=0), write_jsonl(d / "heldout.jsonl", 10, seed=99)


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-run") / "out"
    r = trainkit.run(*_args(out, *pairs, 60), env={"SFTJOB_CACHE_DIR": str(out.parent / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r


def completion_margins(model_dir: Path, adapter: Path | None, rows: list[dict]) -> list[float]:
    """log p(chosen) − log p(rejected) per pair, computed from scratch with the chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    def ids(msgs, **kw):
        x = tok.apply_chat_template(msgs, tokenize=True, **kw)
        return list(x if isinstance(x, list) else x["input_ids"])

    def logp(prompt, completion) -> float:
        head, full = ids(prompt, add_generation_prompt=True), ids(prompt + completion)
        assert full[:len(head)] == head
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), -1)
        return sum(lp[i - 1, full[i]].item() for i in range(len(head), len(full)))

    return [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows]


def test_dpo_run_publishes_a_verified_adapter_that_prefers_chosen_on_held_out_pairs(trained, pairs):
    out, r = trained
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "eval.json", "metrics.jsonl"} <= \
        {f["path"] for f in manifest["files"]}
    rows = [json.loads(line) for line in pairs[1].read_text().splitlines()]
    base = completion_margins(trainkit.tiny_model(), None, rows)
    tuned = completion_margins(trainkit.tiny_model(), out, rows)
    raised = sum(t > b for t, b in zip(tuned, base, strict=True))
    print(f"\nheld-out pairs where the adapter raised log p(chosen) - log p(rejected) over the base: {raised}/10; "
          f"mean margin base {sum(base) / 10:.3f} → adapter {sum(tuned) / 10:.3f}")
    assert raised >= 8
    ev = json.loads((out / "eval.json").read_text())
    assert ev["preference"]["pairs"] == 10 and ev["preference"]["reward_accuracy"] == raised / 10
    assert ev["preference"]["mean_margin"] > 0


def test_dpo_progress_lines_and_metrics_carry_reward_accuracy_and_margin(trained):
    out, r = trained
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train] == [10, 20, 30, 40, 50, 60]
    assert all("rewards/accuracies" in x and "rewards/margins" in x for x in train)
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    progress = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith('{"event": "progress"')]
    assert progress and all("rewards/accuracies" in e and "rewards/margins" in e for e in progress)
    status = json.loads((out / "status.json").read_text())
    assert status["reward_accuracies"] == train[-1]["rewards/accuracies"] and "reward_margins" in status
    assert json.loads((out / "data_report.json").read_text())["examples"] == {"train": 50, "eval": 10}


def test_dpo_continues_a_published_adapter_and_uses_it_frozen_as_the_reference(trained, pairs, tmp_path):
    """SFT → DPO chain (here: a published DPO run continued): the policy starts from the parent adapter and
    TRL's frozen "ref" copy of it is the reference, so the first step sees policy == reference (loss ln 2,
    margin 0). With the base as reference the trained parent would start near loss 0.2."""
    import hashlib
    import math

    parent, _ = trained
    out = tmp_path / "child"
    r = trainkit.run(*_args(out, *pairs, 3, "--adapter", str(parent), "--logging-steps", "1"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 0.1, first
    assert abs(first["rewards/margins"]) < 0.5, first
    assert not (out / "ref").exists()  # the reference copy is not published
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parent_adapter"]["sha256"] == hashlib.sha256(
        (parent / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_reward_accuracy_gate_rejects_an_under_trained_adapter_with_78(pairs, tmp_path):
    out = tmp_path / "out"
    r = trainkit.run(*_args(out, *pairs, 2, "--learning-rate", "1e-6", "--min-reward-accuracy", "1.0"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 78, r.stdout[-2000:] + r.stderr[-3000:]
    assert "reward_accuracy" in r.stderr and "eval.min_reward_accuracy" in r.stderr
    assert not (out / "_SUCCESS").exists()
    assert (out / "rejected" / "adapter_model.safetensors").exists()
    assert json.loads((out / "rejected" / "eval.json").read_text())["gate"]["passed"] is False


def test_two_process_zero2_dpo_run_stops_on_sigterm_with_75_and_resumes_to_a_verified_adapter(pairs, tmp_path):
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "cache")}
    zero2 = ["--distributed", "deepspeed", "--zero-stage", "2", "--num-processes", "2",
             "--per-device-train-batch-size", "2", "--logging-steps", "1",
             "--lr-scheduler-type", "constant"]  # the rerun shortens the run: allowed only where the LR ignores it
    log = tmp_path / "first.log"
    proc = trainkit.start(*_args(out, *pairs, 400, *zero2), env=env, log=log)
    trainkit.wait_for_step(log, proc, 3)
    assert trainkit.sigterm_and_wait(proc) == 75, log.read_text()[-4000:]
    status = json.loads((out / "status.json").read_text())
    step = status["step"]
    assert status["state"] == "interrupted" and 3 <= step < 400
    marker = json.loads((out / "checkpoints" / f"step-{step}" / "COMPLETE").read_text())
    assert len([f for f in marker["files"] if "optim_states" in f["path"]]) == 2  # one ZeRO-2 shard per rank
    assert not (out / "_SUCCESS").exists()

    rerun = trainkit.run(*_args(out, *pairs, step + 3, *zero2), env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["resumed_from"] == step
    assert min(trainkit.losses(rerun.stdout.splitlines())) == step + 1
    assert (out / "_SUCCESS").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "launch" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("extra", [
    ["--precompute-ref-log-probs", "true"],
    ["--method", "full", "--distributed", "deepspeed", "--zero-stage", "3", "--num-processes", "2"],
], ids=["lora-precomputed-reference", "full-zero3-frozen-reference"])
def test_dpo_reference_variants_train_and_publish(pairs, tmp_path, extra):
    out = tmp_path / "out"
    r = trainkit.run(*_args(out, *pairs, 4, "--per-device-train-batch-size", "2", "--logging-steps", "1", *extra),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (out / "_SUCCESS").exists()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 4 or recs[-2]["step"] == 4
    last = [x for x in recs if "loss" in x][-1]
    assert last["rewards/margins"] > 0  # the policy moved away from the reference toward chosen
    if "full" in extra:
        assert (out / "model.safetensors").exists() or list(out.glob("model-*.safetensors"))


def test_preview_shows_the_prompt_once_and_the_trained_spans_of_both_answers(pairs, capsys):
    from job.cli import main

    assert main(["preview", "--objective", "dpo", "--data", str(pairs[1]), "--tokenizer", str(trainkit.tiny_model()),
                 "--limit", "1"]) == 0
    out = capsys.readouterr().out
    row = json.loads(pairs[1].read_text().splitlines()[0])
    assert out.count("prompt: ") == 1 and out.count(row["prompt"][0]["content"]) == 1
    assert f"[[{row['chosen'][0]['content']}<|im_end|>]]" in out
    assert f"[[{row['rejected'][0]['content']}<|im_end|>]]" in out


def test_dpo_under_ddp_and_fsdp_with_two_processes_trains_the_same_steps_and_publishes(pairs, tmp_path):
    """DPO on 2 processes under DDP and under FSDP: the same global batch, so the same losses step for step
    (the reference is the adapter-free base in both); each run publishes a verified adapter."""
    losses = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        r = trainkit.run(*_args(out, *pairs, 4, "--per-device-train-batch-size", "2", "--logging-steps", "1",
                                "--distributed", strategy, "--num-processes", "2"),
                         env={"SFTJOB_CACHE_DIR": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert (out / "_SUCCESS").exists() and (out / "adapter_model.safetensors").exists()
        topo = json.loads((out / "launch" / "topology.json").read_text())
        assert (topo["strategy"], topo["num_processes"]) == (strategy, 2)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[strategy] = {x["step"]: x["loss"] for x in recs if "loss" in x}
        assert [x for x in recs if "loss" in x][-1]["rewards/margins"] > 0
    assert sorted(losses["ddp"]) == sorted(losses["fsdp"]) == [1, 2, 3, 4]
    for step, loss in losses["ddp"].items():
        assert losses["fsdp"][step] == pytest.approx(loss, abs=1e-4), step
    assert losses["ddp"][4] < losses["ddp"][1]  # it learned
