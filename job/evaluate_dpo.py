"""DPO evaluation: on the eval pairs, does the adapter prefer chosen over rejected more than the base does?

The implicit reward of a completion is β·(log π(y|x) − log π_ref(y|x)); a pair is won when chosen's reward
beats rejected's, i.e. when log p(chosen) − log p(rejected) under the adapter exceeds the same under the base
(the reference). Measured here in the entrypoint after training, on the prepared eval pairs (the same tokens
and completion masks as training), base first, then the adapter loaded on it. eval.json / eval.md as for SFT;
eval.min_reward_accuracy gates the publish (exit 78, adapter under rejected/).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from job.evalkit import FORMAT, Evaluation, free_cuda, load_base, tokenizer, with_adapter, written

log = logging.getLogger("sftjob.eval")
BATCH = 8


def pair_margins(model, eval_path: Path) -> list[float]:
    """log p(chosen) − log p(rejected), summed over each completion's trained tokens, per eval pair."""
    import torch
    from datasets import Dataset

    from job.train.dpo import PairCollator

    ds = Dataset.from_parquet(str(eval_path))
    collate = PairCollator(0)
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(ds), BATCH):
            b = collate([ds[i] for i in range(start, min(start + BATCH, len(ds)))])
            ids, mask = b["input_ids"].to(device), b["completion_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            seq = (lp * mask[:, 1:]).sum(-1)
            chosen, rejected = seq.chunk(2)
            out += (chosen - rejected).tolist()
    return out


def evaluate(spec, prepared, model_dir: str, adapter_dir: str, workdir: Path) -> Evaluation:
    t0 = time.time()
    workdir = Path(workdir)
    e, beta = spec.eval, spec.train.beta
    trainer = json.loads((workdir / "eval_loss.json").read_text()) if (workdir / "eval_loss.json").exists() else {}
    report: dict = {"format": FORMAT, "objective": "dpo", "beta": beta,
                    "loss": {"eval_loss": trainer.get("eval_loss"), "trainer_metrics": trainer} if trainer else None}
    if prepared.eval_path is not None:
        tok = tokenizer(spec, prepared, model_dir, adapter_dir)
        model = load_base(spec, model_dir, len(tok))
        base = pair_margins(model, prepared.eval_path)
        model = with_adapter(spec, model, adapter_dir)
        after = pair_margins(model, prepared.eval_path)
        del model
        free_cuda()
        rewards = [beta * (a - b) for a, b in zip(after, base, strict=True)]  # chosen reward − rejected reward
        report["preference"] = {
            "pairs": len(rewards),
            "reward_accuracy": sum(r > 0 for r in rewards) / len(rewards),
            "mean_margin": sum(rewards) / len(rewards),
            "base_logp_margin": sum(base) / len(base), "adapter_logp_margin": sum(after) / len(after),
            "base_prefers_chosen": sum(m > 0 for m in base) / len(base),
            "adapter_prefers_chosen": sum(m > 0 for m in after) / len(after),
        }
    return written(workdir, report, gate(spec, report), t0, markdown, summary, min_reward_accuracy=e.min_reward_accuracy)


def gate(spec, report: dict) -> list[str]:
    need = spec.eval.min_reward_accuracy
    if need is None:
        return []
    pref = report.get("preference")
    if not pref:
        return ["eval.min_reward_accuracy is set but there are no eval pairs"]
    got = pref["reward_accuracy"]
    return [f"reward_accuracy {got:.1%} < eval.min_reward_accuracy {need:.1%}"] if got < need else []


def summary(report: dict) -> dict:
    out: dict = {}
    pref = report.get("preference")
    if pref:
        out.update(pairs=pref["pairs"], reward_accuracy=round(pref["reward_accuracy"], 4),
                   mean_margin=round(pref["mean_margin"], 4))
    loss = report.get("loss") or {}
    if loss.get("eval_loss") is not None:
        out["eval_loss"] = round(loss["eval_loss"], 4)
    if report["gate"]["checked"]:
        out["gate"] = "passed" if report["gate"]["passed"] else "failed"
    return out


def markdown(report: dict) -> str:
    lines = ["# Evaluation (DPO): base model → adapter on the eval pairs", ""]
    pref = report.get("preference")
    if pref:
        lines += [f"{pref['pairs']} pairs, β = {report['beta']}", "",
                  "| | base | adapter |", "|---|---|---|",
                  f"| mean log p(chosen) − log p(rejected) | {pref['base_logp_margin']:.3f} | {pref['adapter_logp_margin']:.3f} |",
                  f"| prefers chosen | {pref['base_prefers_chosen']:.1%} | {pref['adapter_prefers_chosen']:.1%} |", "",
                  f"Reward accuracy (adapter's implicit reward prefers chosen): **{pref['reward_accuracy']:.1%}**; "
                  f"mean reward margin {pref['mean_margin']:.4f}.", ""]
    g = report["gate"]
    if g["checked"]:
        lines.append(f"Gate eval.min_reward_accuracy {g['min_reward_accuracy']:.1%}: "
                     + ("passed" if g["passed"] else "FAILED — " + "; ".join(g["failures"])))
    return "\n".join(lines) + "\n"
