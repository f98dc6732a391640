"""DPO's part of a training rank: the prepared pairs (never tokenized here) through TRL's DPOTrainer.

The rank itself is SFT's (job.train.sft.train with this module's ``recipe`` on train.objective: dpo), so the
callbacks, stop flag, checkpoint mirror, status, trackers, resume on another world size and the save path are
the same code: preemption, resume and publish behave the same. With LoRA the reference is the base with the adapter disabled (TRL does that when ref_model is None and the model is a PEFT
model); for full fine-tunes TRL loads a frozen copy (prepared for DeepSpeed/FSDP like the policy).
"""
from __future__ import annotations

from job.errors import ConfigError
from job.train.recipe import Recipe, training_args

SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the TRL 1.16 losses that read label_smoothing


def check(spec) -> None:
    """DPO settings that could never train: refused before fetch/prepare (exit 64), not as a rank's traceback
    (through job/objectives/dpo.py, which also refuses the SFT eval DPO has no counterpart for)."""
    t = spec.train
    if spec.data.packing:
        raise ConfigError("data.packing with objective dpo: a pair is two separate sequences, never packed",
                          hint="drop data.packing for DPO runs")
    if t.loss_type == "exo_pair" and t.label_smoothing == 0:
        raise ConfigError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)",
                          hint="set train.label_smoothing: 0.001")
    if t.label_smoothing and t.loss_type not in SMOOTHED:
        raise ConfigError(f"label_smoothing has no effect with loss_type {t.loss_type} (TRL 1.16 reads it only for "
                          f"{', '.join(SMOOTHED)})", hint="use loss_type robust for noisy labels, or drop label_smoothing")


class PairCollator:
    """Pads prepared pairs into TRL's DPO batch: chosen rows then rejected rows, completion_mask = trained labels.

    The labels come from job.data.preference (the SFT masking of the completion plus end-of-turn), so the
    template's scaffolding after the turn is context, not completion. Counts tokens for the progress lines.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0
        self.trained_tokens = 0

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows] + \
               [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        comp = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (x, lab) in enumerate(seqs):
            n = len(x)
            ids[i, :n] = torch.as_tensor(x, dtype=torch.long)
            attn[i, :n] = 1
            comp[i, :n] = torch.as_tensor(lab, dtype=torch.long) != -100
            self.tokens += n
            self.trained_tokens += int(comp[i].sum())
        out = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
        for k in ("ref_chosen_logps", "ref_rejected_logps"):  # precompute_ref_log_probs
            if k in rows[0]:
                out[k] = torch.tensor([r[k] for r in rows])
        return out


def trainer_base():
    from trl import DPOTrainer

    class PreparedDPOTrainer(DPOTrainer):
        """DPOTrainer on data job.data.preference already tokenized and masked: TRL's own preparation is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreparedDPOTrainer


def dpo_args(spec, plan: dict):
    from trl import DPOConfig

    t = spec.train
    return training_args(spec, plan, DPOConfig, extra=dict(
        beta=t.beta, loss_type=[t.loss_type], label_smoothing=t.label_smoothing,
        precompute_ref_log_probs=t.precompute_ref_log_probs, max_length=None))


def recipe(spec, plan: dict, tok):
    """DPO's part of the shared rank (job.train.sft.train): pairs collator, TRL's DPOTrainer on prepared pairs."""
    def init_distributed():  # the frozen reference is a DeepSpeed engine built before the policy's:
        import deepspeed  # without this it sees a world of 1 and refuses the batch sizes

        deepspeed.init_distributed()

    return Recipe(PairCollator(tok.pad_token_id), trainer_base(), lambda: dpo_args(spec, plan),
                  before_trainer=init_distributed if plan.get("deepspeed_config") else None,
                  drop_from_adapter=("ref",))  # the frozen reference copy is not part of the adapter
