"""Preference tuning (train.method dpo / orpo) through TRL's trainers, inside `lora train`'s run.

The losses, the reference log-probabilities, the collators and the metrics (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/*) are TRL's: DPOTrainer, and
ORPOTrainer from trl.experimental. What `lora train` promises around a run comes from LoraTrainer
(training/trainer.py), mixed in before them: the loss book across --resume, non-finite steps
skipped and stopped on, warm-up rounding, checkpoints staged and renamed into place. Where TRL's
trainer gets in the way, this module says how it is solved:

  - The reference model is the base with the adapter switched off (peft's disable_adapter, TRL's
    own path for a fresh adapter): no second copy of the model. Handed a PeftModel, DPOTrainer
    adds a frozen copy of the adapter named "ref" (for re-training an existing adapter); ours is
    fresh (lora_B = 0, so the copy computes the base exactly), and the copy is removed at once.
  - Our data path tokenizes the pairs (data/preference.py: the report, row errors, prompts formatted
    as `lora generate` formats them); TRL's own dataset preparation is skipped for them.
  - LoraTrainer's `_compute_loss` (the chunked supervised loss) shares its name with DPOTrainer's:
    here it is the method's own loss, so compute_loss still agrees on finite losses first.
  - Token counts for throughput come from the pairs' masks (there are no `labels`).
  - TRL writes a README.md model card into the checkpoints directory at every save: ours is the
    adapter's (artifacts/model_card.py), so that one is not written.
  - TRL's trainers send a usage ping on start unless HF_HUB_DISABLE_TELEMETRY is set: `lora` does
    not phone home, so it is set (a user's own setting wins).
  - Dropout is off, as TRL turns it off by default: the log-probabilities of policy and reference
    must come from the same deterministic network (lora.dropout is not used; the run says so).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from lora_cli.data.tokenize import IGNORE_INDEX
from lora_cli.training.trainer import LoraTrainer

# What TRL logs for each method that metrics.jsonl keeps (besides loss, learning rate, ...).
PREFERENCE_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio",
)


class _PreferenceBook:
    """What both preference trainers add to LoraTrainer + TRL."""

    def _pair_counts(self, inputs) -> list[int] | None:
        raise NotImplementedError

    def training_step(self, model, inputs, num_items_in_batch=None):
        counts = self._pair_counts(inputs)
        if counts is not None and self.tokens is not None:
            if self.accelerator.num_processes > 1:  # the whole step's tokens, not rank 0's share
                device = next(iter(inputs.values())).device
                counts = [int(n) for n in self.accelerator.reduce(torch.tensor(counts, device=device),
                                                                   reduction="sum").tolist()]
            self.tokens.add(*counts)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_model_card(self, *args, **kwargs):
        """Not into the checkpoints directory: the adapter has its own card."""


class DPOLoraTrainer(_PreferenceBook, LoraTrainer, DPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(model, "peft_config", {}):
            # DPOTrainer's frozen copy of a pre-trained adapter; ours is fresh, so the reference is
            # the base with the adapter off (its own path when there is no "ref")
            model.delete_adapter("ref")
            model.set_adapter("default")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by data/preference.py

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return DPOTrainer._compute_loss(self, model, inputs, return_outputs)

    def _pair_counts(self, inputs):
        mask, attention = inputs.get("completion_mask"), inputs.get("attention_mask")
        if mask is None or attention is None:
            return None
        return [int(mask[:, 1:].sum()), int(attention.sum()), int(attention.numel())]


class ORPOLoraTrainer(_PreferenceBook, LoraTrainer, ORPOTrainer):
    def tokenize_row(self, feature, model=None):
        return {}  # tokenized by data/preference.py (as_orpo_rows)

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return ORPOTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def _pair_counts(self, inputs):
        if "chosen_labels" not in inputs:
            return None
        supervised = sum(int((inputs[f"{k}_labels"][:, 1:] != IGNORE_INDEX).sum()) for k in ("chosen", "rejected"))
        real = sum(int(inputs[f"{k}_attention_mask"].sum()) for k in ("chosen", "rejected"))
        # ORPO pads chosen and rejected to one length and runs them as one batch
        width = max(inputs["chosen_input_ids"].shape[1], inputs["rejected_input_ids"].shape[1])
        return [supervised, real, 2 * inputs["chosen_input_ids"].shape[0] * width]


def as_orpo_rows(pairs: list[dict]) -> list[dict]:
    """The columns ORPOTrainer's collator reads: each answer after the prompt, the prompt masked."""
    rows = []
    for p in pairs:
        prompt = p["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            ids = prompt + p[f"{name}_ids"]
            row[f"{name}_input_ids"] = ids
            row[f"{name}_attention_mask"] = [1] * len(ids)
            row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + p[f"{name}_ids"]
        rows.append(row)
    return rows


def preference_config(method: str, args: TrainingArguments, *, beta: float, max_length: int):
    """Our TrainingArguments as TRL's config for the method: every setting the same, plus the
    method's own."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values["prediction_loss_only"] = True  # evaluation needs the loss and TRL's metrics, not logits
    if method == "dpo":
        return DPOConfig(**values, beta=beta, max_length=max_length, disable_dropout=True,
                         pad_to_multiple_of=None)
    return ORPOConfig(**values, beta=beta, max_length=max_length, disable_dropout=True)


def preference_trainer(method: str, *, model, args: TrainingArguments, beta: float, max_length: int,
                       train: list[dict], validation: list[dict] | None, tokenizer, callbacks: list):
    """DPO or ORPO on `model` (a PeftModel with a fresh adapter), as LoraTrainer runs a step."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    config = preference_config(method, args, beta=beta, max_length=max_length)
    rows = (lambda pairs: pairs) if method == "dpo" else as_orpo_rows
    datasets = [Dataset.from_list(rows(pairs)) if pairs else None for pairs in (train, validation)]
    trainer_class = DPOLoraTrainer if method == "dpo" else ORPOLoraTrainer
    return trainer_class(model=model, args=config, train_dataset=datasets[0], eval_dataset=datasets[1],
                         processing_class=tokenizer, callbacks=callbacks)
