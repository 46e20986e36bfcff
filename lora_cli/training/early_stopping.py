"""Early stopping and the best adapter, both judged by the eval loss.

train.early_stopping_patience: HF's EarlyStoppingCallback (metric eval_loss, lower is better)
stops training once the eval loss has not fallen by more than train.early_stopping_threshold
for that many evaluations in a row. The Trainer keeps a callback's counter in trainer_state.json
but restores it only with `restore_callback_states_from_checkpoint`, which also restores the
TrainerControl flags of the step that saved (a stop asked for by Ctrl-C among them): on --resume
the counter is rebuilt from the evaluations in the checkpoint's log history instead.

train.keep_best: the Trainer's `load_best_model_at_end` reads the best checkpoint from the path it
was saved under, which our staged saves rename and our rotation may delete
(training/checkpoints.py). Instead a checkpoint is saved at every evaluation
(`best_model_arguments`), the best one (the Trainer's state.best_global_step, which
trainer_state.json carries across --resume) is spared by the rotation, and at the end its adapter
weights are loaded back into the model (`restore_best`) before the adapter is saved.
"""

from __future__ import annotations

from pathlib import Path

from transformers import EarlyStoppingCallback

from lora_cli.errors import TrainingError
from lora_cli.recipe.schema import TrainConfig


def best_model_arguments(t: TrainConfig) -> dict:
    """TrainingArguments for early stopping / keep_best: the Trainer tracks the best eval loss
    (state.best_metric, best_global_step); keep_best saves at every evaluation."""
    if t.early_stopping_patience is None and not t.keep_best:
        return {}
    args = {"metric_for_best_model": "eval_loss", "greater_is_better": False}
    if t.keep_best and t.eval_every:  # (recipe/load.py: save_every is unset or equal to it)
        args.update(save_strategy="steps", save_steps=t.eval_every)
    return args


class EarlyStopping(EarlyStoppingCallback):
    """HF's EarlyStoppingCallback, its counter rebuilt on --resume, and whether it stopped the run."""

    stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        # The evaluations so far (a resumed run's, from its checkpoint), judged as the callback
        # judged them: against the best loss before each (the Trainer updates best_metric after
        # the callback has seen an evaluation).
        self.early_stopping_patience_counter = 0
        best = None
        for entry in state.log_history:
            loss = entry.get("eval_loss")
            if loss is None:
                continue
            improved = best is None or (loss < best and abs(loss - best) > self.early_stopping_threshold)
            self.early_stopping_patience_counter = 0 if improved else self.early_stopping_patience_counter + 1
            best = loss if best is None else min(best, loss)

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            self.stopped = True


def early_stopping_callbacks(t: TrainConfig) -> list:
    if t.early_stopping_patience is None:
        return []
    return [EarlyStopping(t.early_stopping_patience, t.early_stopping_threshold)]


def restore_best(trainer, model, checkpoints: Path, final_loss: float | None) -> dict:
    """keep_best: load the adapter weights of the best evaluation's checkpoint into `model`,
    unless the final weights (eval loss `final_loss`) are at least as good. Returns best_step and
    best_eval_loss for run.json ({} when nothing was evaluated)."""
    step, loss = trainer.state.best_global_step, trainer.state.best_metric
    if final_loss is not None and (not step or loss is None or final_loss < loss):
        return {"best_step": trainer.state.global_step, "best_eval_loss": final_loss}
    if not step or loss is None:
        return {}
    if step != trainer.state.global_step:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors"
        if not path.is_file():
            raise TrainingError(
                f"train.keep_best: the checkpoint of the best evaluation (step {step}) is gone: {path.parent}",
                "Its checkpoint is kept by lora train; was it deleted by hand? Train again with --overwrite.",
            )
        result = set_peft_model_state_dict(model, load_file(path))
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"train.keep_best: {path} does not fit the adapter being trained "
                                f"(unexpected {result.unexpected_keys[:3]})", "Train again with --overwrite.")
    return {"best_step": step, "best_eval_loss": loss}
