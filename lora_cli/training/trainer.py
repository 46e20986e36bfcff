"""The HF Trainer as `lora train` runs it: the loop stays the Trainer's (accelerate underneath);
this subclass adds what the run directory and the user are promised around it.

  - a loss book per optimizer step (the Trainer's running loss counts a skipped step as 0 and
    starts again at 0 on --resume), saved in every checkpoint: the whole run's loss survives resumes;
  - non-finite losses: agreed across ranks before the backward, the step skipped by all of them,
    stopped after train.max_nonfinite_steps in a row, and a diverged result refused (exit 1);
  - the chunked supervised-only loss (training/loss.py) where it is exact;
  - token counts for throughput (TokenCounter, training/callbacks.py);
  - warm-up rounded to nearest, never swallowing a short run;
  - LoRA+ (lora.lr_ratio): PEFT's optimizer, B matrices at a higher learning rate;
  - checkpoints staged and renamed into place (training/checkpoints.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Trainer

from lora_cli.data.packing import REAL_TOKENS_KEY
from lora_cli.data.tokenize import IGNORE_INDEX
from lora_cli.errors import TrainingError
from lora_cli.training.checkpoints import save_checkpoint_atomically
from lora_cli.training.loss import plain_head, supervised_loss
from lora_cli.training.optimizers import loraplus_optimizer

RUN_LOSS_FILE = "lora_run_loss.json"  # in each checkpoint: the loss book of the steps before it


class LoraTrainer(Trainer):
    tokens = None  # TokenCounter
    max_nonfinite_steps = 3
    keep_best = False  # train.keep_best: the rotation spares the best evaluation's checkpoint
    use_chunked_loss = True  # training/loss.py where exact; False: the model's own loss
    _nonfinite_in_a_row = 0

    # Our own loss book, per optimizer step (the sum of its micro-batches' losses): the Trainer's
    # running loss counts a skipped step as 0 and starts again at 0 on --resume.
    _step = None  # the optimizer step the current micro-batches belong to
    _step_loss = 0.0
    _step_bad = None  # its first non-finite micro-batch loss: the whole step is skipped
    _last_bad_step = None
    _last_step_finite = True

    def train(self, resume_from_checkpoint=None, **kwargs):
        self._window = []  # (loss, finite) of the steps since the last log
        self.run_loss = [0.0, 0, 0]  # the whole run: sum of finite step losses, their count, skipped steps
        if isinstance(resume_from_checkpoint, str):
            saved = Path(resume_from_checkpoint) / RUN_LOSS_FILE  # absent in older checkpoints
            if saved.is_file():
                self.run_loss = json.loads(saved.read_text(encoding="utf-8"))["run_loss"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    lr_ratio = None  # lora.lr_ratio: LoRA+, B matrices at lr x lr_ratio (training/optimizers.py)

    def create_optimizer(self, model=None):
        if self.lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        self.optimizer = loraplus_optimizer(self.model if model is None else model, self.args, self.lr_ratio)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        # The Trainer rounds a warm-up ratio up (ceil(0.03 * 1) = 1) and warm-up starts at lr 0:
        # a short run could learn nothing at all. Round to nearest, and always leave a step after it.
        ratio = self.args.warmup_steps
        warmup = math.floor(num_training_steps * ratio + 0.5) if ratio < 1 else int(ratio)
        self.args.warmup_steps = max(0, min(warmup, num_training_steps - 1))
        try:
            return super().create_scheduler(num_training_steps, optimizer)
        finally:
            self.args.warmup_steps = ratio

    def _close_step(self):
        """Book the current optimizer step once the Trainer has counted it."""
        if self._step is None or self.state.global_step < self._step:
            return
        finite = self._step_bad is None
        self._window.append((self._step_loss if finite else self._step_bad, finite))
        total, good, skipped = self.run_loss
        self.run_loss = [total + self._step_loss, good + 1, skipped] if finite else [total, good, skipped + 1]
        self._last_step_finite = finite
        self._step = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = dict(inputs)
        real_tokens = inputs.pop(REAL_TOKENS_KEY, None)  # from our Collator; not a model input
        labels = inputs.get("labels")
        if labels is not None and self.tokens is not None:
            supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
            mask = inputs.get("attention_mask")
            if real_tokens is not None:
                nonpad = int(real_tokens.sum())
            else:
                nonpad = int(mask.sum()) if mask is not None else int(labels.numel())
            counts = [supervised, nonpad, int(labels.numel())]
            if self.accelerator.num_processes > 1:  # the whole step's tokens, not rank 0's share
                summed = self.accelerator.reduce(torch.tensor(counts, device=labels.device), reduction="sum")
                counts = [int(n) for n in summed.tolist()]
            self.tokens.add(*counts)
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if step != self._step:
            self._close_step()
            self._step, self._step_loss, self._step_bad = step, 0.0, None
        # compute_loss agrees across the ranks, before the backward, whether this micro-batch's
        # loss is finite (_agree_finite): a bad one is skipped by every rank together.
        self._agreeing, self._micro_bad = True, None
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._agreeing = False
        bad, self._micro_bad = self._micro_bad, None
        if bad is None and self._step_bad is None:
            self._step_loss += float(loss)
            self._last_good_inputs = inputs  # check_finite_result: the final weights on real data
            return loss
        # Drop the gradients of this step (of all its micro-batches) so the weights stay finite;
        # stop if it keeps happening.
        model.zero_grad(set_to_none=True)
        if self._step_bad is not None:
            return torch.zeros_like(loss)  # a later micro-batch of a step already skipped
        self._step_bad = bad
        self._nonfinite_in_a_row = self._nonfinite_in_a_row + 1 if self._last_bad_step == step - 1 else 1
        self._last_bad_step = step
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler else float("nan")
            raise TrainingError(
                f"the loss was {bad} for {self._nonfinite_in_a_row} steps in a row "
                f"(step {self.state.global_step + 1}, learning rate {lr:.3g}); training stopped, "
                "no weights were saved from the bad steps",
                "Lower train.lr, check the data for empty or broken rows, or use dtype float32.",
            )
        # The Trainer adds this to its running loss: 0 keeps that finite, and log() below reports
        # the step as skipped with its real loss.
        return torch.zeros_like(loss)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            self._close_step()
            window, self._window = self._window, []
            skipped = [loss for loss, finite in window if not finite]
            if skipped:  # the Trainer averaged them in as 0: log the real steps' mean, or nan / inf
                good = [loss for loss, finite in window if finite]
                mean = sum(good) / len(good) if good else skipped[-1]
                if good and self.accelerator.num_processes > 1:  # every rank logs; all skipped the same steps
                    mean = self.accelerator.reduce(torch.tensor([mean], dtype=torch.float64, device=self.args.device),
                                                   reduction="mean").item()
                logs["loss"] = mean
                logs["skipped_steps"] = len(skipped)
                if not window[-1][1]:
                    logs["grad_norm"] = float("nan")  # its gradients were dropped, not measured as 0
        super().log(logs, start_time)

    def _reduced_run_loss(self) -> list[float]:
        """run_loss averaged over the processes (every rank must call it)."""
        self._close_step()
        if self.accelerator.num_processes == 1:
            return list(self.run_loss)
        totals = torch.tensor(self.run_loss, dtype=torch.float64, device=self.args.device)
        return self.accelerator.reduce(totals, reduction="mean").tolist()

    def run_train_loss(self) -> tuple[float, int]:
        """The whole run's mean loss over its finite steps (across --resume), and the skipped steps."""
        total, good, skipped = self._reduced_run_loss()
        return (total / good if good else float("nan")), round(skipped)

    def check_finite_result(self, final: dict) -> None:
        """Refuse (exit 1) to save a run as completed whose adapter is broken: non-finite weights,
        no finite step at all, or a final loss that is not finite (the eval loss where there is
        validation, else the last step's). Every rank must call it (they all agree)."""
        bad_tensors = 0
        for p in self.model.parameters():
            if p.requires_grad:
                local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP shards
                bad_tensors += int(not torch.isfinite(local).all())
        # A skipped last step changed nothing: the weights are those of the last applied update.
        # Whether they still give a finite loss (a poisoned batch, not a divergence) is seen on
        # the last batch that was finite.
        last_bad = int(not self._last_step_finite and "eval_loss" not in final and not self._final_loss_finite())
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([bad_tensors, last_bad], device=self.args.device)
            flags = self.accelerator.reduce(flags, reduction="sum")
            bad_tensors, last_bad = flags.tolist()
        if bad_tensors:
            problem = f"{bad_tensors} adapter weight tensors hold NaN or inf"
        elif not math.isfinite(final["train_loss"]):
            problem = "the loss of every step was non-finite, so nothing was learned"
        elif not math.isfinite(final.get("eval_loss", 0.0)):
            problem = f"the final eval loss is {final['eval_loss']}"
        elif last_bad:
            problem = (
                "the last step's loss was non-finite, and the final weights give a non-finite loss "
                "on the last training batch that was finite"
            )
        else:
            if final.get("skipped_steps") and self.is_world_process_zero():
                skipped = final["skipped_steps"]
                print(
                    f"warning: {skipped} of {self.state.global_step} steps {'was' if skipped == 1 else 'were'} skipped "
                    "(non-finite loss); the final train loss is the mean of the others"
                )
            return
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler else float("nan")
        raise TrainingError(
            f"training diverged: {problem} after step {self.state.global_step} (learning rate "
            f"{lr:.3g}); the adapter was not saved",
            "Lower train.lr (keep train.max_grad_norm > 0), check the data for empty or broken rows, "
            "or use dtype float32; then train again with --overwrite.",
        )

    _last_good_inputs = None  # the inputs of the last finite micro-batch

    def _final_loss_finite(self) -> bool:
        if self._last_good_inputs is None:  # no finite step at all: train_loss says so
            return True
        # (FSDP / ZeRO-3 shard the weights: their wrapper gathers them, every rank takes part,
        # as every rank is here: the skip was agreed)
        model = self.model_wrapped if self.is_fsdp_enabled or self.is_deepspeed_enabled else self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                loss = self.compute_loss(model, self._prepare_inputs(self._last_good_inputs))
        finally:
            model.train(was_training)
        return bool(torch.isfinite(loss).all())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS_KEY}
        if prediction_loss_only and "labels" in inputs and self._plain_head(model) is not None:
            # Evaluation needs only the loss: the same chunked loss as training, no logits.
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    _agreeing = False  # in training_step: compute_loss agrees on the loss before the backward
    _micro_bad = None  # the current micro-batch's agreed non-finite loss (None: finite)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._agreeing and not return_outputs:
            self._agreeing = False
            return self._agree_finite(result)
        return result

    def _agree_finite(self, loss):
        """Before the backward: is this micro-batch's loss finite on every rank? Under DDP the
        backward averages every rank's gradients into all of them, so a NaN on one rank must
        make all of them skip it. Skipped: the backward gets a detached copy, which touches no
        weight (no gradient, no DDP all-reduce), on every rank alike."""
        value = loss.detach().float().sum().reshape(1)
        if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)  # a sum: NaN or inf on any rank shows on all
        if self._step_bad is None and bool(torch.isfinite(value).all()):
            return loss
        self._micro_bad = self._step_bad if self._step_bad is not None else float(value)
        return loss.detach().requires_grad_(True)

    def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Our loss skips the logits of unsupervised positions and never holds all of them at
        # once (training/loss.py); same value as the model's own loss. Only where it is exact.
        head = self._plain_head(model)
        # Outputs (logits) wanted: the Trainer's own loss. Loss-only evaluation comes through
        # prediction_step below without asking for outputs.
        if head is None or "labels" not in inputs or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hf_model = self.accelerator.unwrap_model(model).get_base_model()
        n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = supervised_loss(model, hf_model, head, inputs, n_items)
        if self.args.average_tokens_across_devices and n_items is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
        return loss

    _head_checked = False
    _head = None

    def _plain_head(self, model):
        if not self._head_checked:
            unwrapped = self.accelerator.unwrap_model(model)
            owned = self.is_fsdp_enabled or self.is_deepspeed_enabled or self.label_smoother is not None
            usable = hasattr(unwrapped, "get_base_model") and not owned and self.compute_loss_func is None
            self._head = plain_head(unwrapped.get_base_model()) if usable and self.use_chunked_loss else None
            self._head_checked = True
        return self._head

    def _save_checkpoint(self, model, trial):
        # Staged and renamed into place: a kill or a full disk never leaves a half checkpoint-N.
        run_loss = self._reduced_run_loss()  # every rank, before only the main one writes it
        save_trainer_files = super()._save_checkpoint

        def save(model, trial):
            save_trainer_files(model, trial)
            if self.args.should_save:  # the run's loss so far: --resume reports the whole run's loss
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                (folder / RUN_LOSS_FILE).write_text(json.dumps({"run_loss": run_loss}), encoding="utf-8")

        save_checkpoint_atomically(self, save, model, trial)
