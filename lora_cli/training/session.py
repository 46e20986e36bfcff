"""One training session on an open run directory, in the order it runs: the data and the model,
the HF Trainer (training/trainer.py) with our callbacks, the loop, the checks of the result, then
the adapter saved with its tokenizer and model card, run.json completed, the memory it reached
and loss.png.

The loop itself is the HF Trainer's (accelerate underneath). Under `accelerate launch` every rank
runs this; only the main one writes to the run directory. commands/train.py opens the run
directory, calls `train` and records how the run ended, whatever stops it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback

from lora_cli import ranks
from lora_cli.artifacts.loss_plot import write_loss_plot
from lora_cli.artifacts.model_card import adapter_model_card
from lora_cli.console import human_bytes, quiet_libraries
from lora_cli.data.packing import Collator
from lora_cli.errors import Interrupted, LoraError, is_out_of_memory, out_of_memory_error
from lora_cli.fsutil import atomic_directory
from lora_cli.model.attach import attach_lora
from lora_cli.model.dtypes import describe_precision
from lora_cli.model.loading import load_base_model
from lora_cli.model.lora_init import (
    initial_adapter,
    save_adapter,
    sharded_conversion_error,
    weights_directory,
)
from lora_cli.model.sources import local_model_path
from lora_cli.recipe.schema import Recipe
from lora_cli.run.checkpoints import latest_checkpoint
from lora_cli.run.paths import RunPaths
from lora_cli.run.recipes import with_run_dtypes
from lora_cli.run.record import DataRecord, FinalMetrics, ModelRecord, report_json, update_record
from lora_cli.training import distributed
from lora_cli.training.arguments import training_arguments
from lora_cli.training.callbacks import MetricsFileCallback, ProgressCallback, StopOnSignalCallback, TokenCounter
from lora_cli.training.checkpoints import DISK_FULL, disk_full_error
from lora_cli.training.early_stopping import early_stopping_callbacks, restore_best
from lora_cli.training.evaluation import evaluation_rows
from lora_cli.training.inputs import RunInputs
from lora_cli.training.memory import estimate_memory
from lora_cli.training.peaks import peak_memory, peak_memory_line
from lora_cli.training.preference import PREFERENCE_METRICS, preference_trainer
from lora_cli.training.preflight import ignored_settings
from lora_cli.training.resume import data_fingerprint
from lora_cli.training.trainer import LoraTrainer


def train(recipe: Recipe, paths: RunPaths, checkpoint: Path | None, inputs: RunInputs) -> tuple[Any, dict]:
    """Train on an open run directory (commands/train.py opened it) from `checkpoint` (None: step
    0), on the model source, tokenizer and data already read and checked (training/inputs.py);
    check the result and save the adapter; run.json says "completed" when this returns.
    Returns the trained PeftModel (still in memory) and the final metrics."""
    quiet_libraries()
    main = ranks.is_main()
    say = print if main else (lambda *args, **kwargs: None)  # one copy of each message, not N
    started = time.perf_counter()
    # `auto` dtypes become concrete now and are recorded: a resumed run keeps the ones it started
    # with, and eval / merge / generate load the base as it was trained (run/recipes.py).
    recipe = with_run_dtypes(recipe, paths)
    set_seed(recipe.train.seed)  # the same on every rank: same LoRA init, same data order
    source, tokenizer, data = inputs.source, inputs.tokenizer, inputs.data
    say(f"model: {source.description}, {describe_precision(recipe.model)}")
    if inputs.context_warning:
        say(f"warning: {inputs.context_warning}")
    preference = recipe.train.method != "sft"  # dpo / orpo: pairs, and TRL's trainers (training/preference.py)
    for line in data.report.lines():
        say(line)
    for note in ignored_settings(recipe, data):
        say(f"note: {note}")
    validation, eval_line = evaluation_rows(recipe, data.validation)  # eval.max_rows, eval.batch_size
    if eval_line:
        say(eval_line)
    memory_line, estimate_bytes = _memory_estimate(recipe)
    say(memory_line)
    if ranks.is_distributed():
        say(distributed.describe_global_batch(recipe.train.batch_size, recipe.train.grad_accum))
    if main:
        m = recipe.model
        update_record(
            paths,
            model=ModelRecord(
                name=m.name,
                source=source.description,
                quantization=m.quantization,
                dtype=m.dtype,
                compute_dtype=m.compute_dtype,
                local_path=local_model_path(m),
            ),
            working_dir=os.getcwd(),  # what the recipe's relative paths meant (run/recipes.py)
            data=DataRecord(fingerprint=data_fingerprint(recipe.data.train), report=report_json(data.report)),
        )

    base = load_base_model(recipe.model, source)
    quantized = recipe.model.quantization != "none"
    lora = recipe.lora
    if preference and lora.dropout > 0:  # policy and reference log-probs from one deterministic network
        say(f"note: lora.dropout {lora.dropout:g} is not used by train.method: {recipe.train.method} (dropout off, "
            "as TRL's preference trainers run)")
        lora = dataclasses.replace(lora, dropout=0.0)
    model = attach_lora(
        base, lora, quantized=quantized, gradient_checkpointing=recipe.train.gradient_checkpointing,
        weights_dir=weights_directory(source) if recipe.lora.init == "loftq" else None,
    )
    initial = initial_adapter(model, recipe.lora)  # PiSSA / OLoRA: the adapter is saved converted
    if initial is not None and ranks.shards_parameters():  # said now, not after the training
        raise sharded_conversion_error(recipe.lora.init)
    trainable, total = model.get_nb_trainable_parameters()
    # (peft's total includes the adapter; the share is of the base, as `lora estimate` gives it)
    say(
        f"lora: {trainable:,} trainable parameters "
        f"({100 * trainable / (total - trainable):.2f}% of the base's {total - trainable:,})"
    )

    tokens = TokenCounter()
    stopper = StopOnSignalCallback()
    early_stop = early_stopping_callbacks(recipe.train)  # train.early_stopping_patience
    progress = ProgressCallback(tokens)
    if "tensorboard" in recipe.train.report_to:  # transformers 5 reads the event-file directory from here
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.tensorboard)
    args = training_arguments(recipe, paths, has_validation=bool(data.validation))
    metrics_file = MetricsFileCallback(paths.metrics, tokens, extra_keys=PREFERENCE_METRICS if preference else ())
    if preference:
        trainer = preference_trainer(
            recipe.train.method, model=model, args=args, beta=recipe.train.beta, max_length=recipe.data.max_length,
            train=data.train, validation=validation, tokenizer=tokenizer,
            callbacks=[metrics_file, progress, stopper, *early_stop],
        )
    else:
        trainer = LoraTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=validation or None,
            data_collator=Collator(tokenizer.pad_token_id, count_tokens=True),
            processing_class=tokenizer,
            callbacks=[metrics_file, progress, stopper, *early_stop],
        )
    trainer.remove_callback(PrinterCallback)  # our ProgressCallback replaces its raw log dicts
    trainer.tokens = tokens
    trainer.keep_best = recipe.train.keep_best
    trainer.max_nonfinite_steps = recipe.train.max_nonfinite_steps
    trainer.lr_ratio = recipe.lora.lr_ratio  # LoRA+ (training/optimizers.py)
    stopper.install()
    try:
        train_started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - train_started
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory_error(e) from None
    except KeyboardInterrupt:
        raise Interrupted(
            "aborted by a second Ctrl-C; the last complete checkpoint is kept",
            f"Continue with `lora train --resume {paths.root}`.",
        ) from None
    finally:
        stopper.uninstall()
        progress.close()

    if stopper.stopped and 0 < trainer.state.max_steps <= trainer.state.global_step:
        # Agreed at the end of the last step: the training is complete, only the adapter is left.
        name = "Ctrl-C" if stopper.received == signal.SIGINT else signal.Signals(stopper.received).name
        say(
            f"{name} came after the last step ({trainer.state.global_step}/{trainer.state.max_steps}): "
            "the training is complete; saving the adapter"
        )
    elif stopper.stopped:
        raise Interrupted(
            f"interrupted at step {trainer.state.global_step}; checkpoint saved in {paths.checkpoints}",
            f"Continue with `lora train --resume {paths.root}`.",
            exit_code=128 + int(stopper.received) if stopper.received != signal.SIGINT else 130,
        )

    # The whole run's loss (the Trainer's training_loss covers only the steps since a --resume,
    # and counts skipped non-finite steps as 0).
    train_loss, skipped_steps = trainer.run_train_loss()
    final = {"global_step": trainer.state.global_step, "train_loss": train_loss}
    if skipped_steps:
        final["skipped_steps"] = skipped_steps
    if any(callback.stopped for callback in early_stop):
        final["stopped_early"] = True
        say(f"early stopping: the eval loss did not improve for {recipe.train.early_stopping_patience} "
            f"evaluations; stopped at step {trainer.state.global_step} of {trainer.state.max_steps}")
    if data.validation:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == trainer.state.global_step:
            final["eval_loss"] = evals[-1]["eval_loss"]  # the Trainer just evaluated
        else:
            final["eval_loss"] = trainer.evaluate()["eval_loss"]
    best = restore_best(trainer, model, paths.checkpoints, final.get("eval_loss")) if recipe.train.keep_best else {}
    if best:
        final.update(best, eval_loss=best["best_eval_loss"])  # the adapter saved is the best one
        say(f"keep_best: saving the adapter of step {best['best_step']} (eval loss {best['best_eval_loss']:.4f})")
    trainer.check_finite_result(final)  # a diverged run fails (exit 1): no broken adapter saved as completed
    # FSDP / ZeRO-3 shard the weights: every rank takes part in gathering them (else None).
    state_dict = distributed.gather_full_state_dict(trainer)
    if trainer.is_world_process_zero():
        card = adapter_model_card(
            recipe,
            run_name=paths.root.name,
            report=data.report,
            trainable=trainable,
            total=total,
            final=final,
            source_description=source.description,
        )
        _save(paths, model, tokenizer, state_dict, card, initial)
        peaks = peak_memory()  # what this process reached (under DDP: rank 0's), beside the estimate
        update_record(
            paths,
            status="completed",
            memory={**peaks, "estimate_bytes": estimate_bytes},
            final=FinalMetrics(**final),
            params={"trainable": trainable, "total": total},
            timings={
                "total_seconds": round(time.perf_counter() - started, 2),
                "train_seconds": round(train_seconds, 2),
                "supervised_tokens": tokens.supervised,
                "tokens_per_second": round(tokens.tokens / max(train_seconds, 1e-9), 1),
            },
        )
        print(
            f"adapter saved to {paths.adapter}  (final train loss {final['train_loss']:.4f}"
            + (f", eval loss {final['eval_loss']:.4f}" if "eval_loss" in final else "")
            + ")"
        )
        print(peak_memory_line(peaks, estimate_bytes))
        print(write_loss_plot(paths.metrics, paths.loss_plot, title=paths.root.name))
    distributed.barrier()  # the other ranks finish when the run is complete, not before
    return model, final


def _save(paths: RunPaths, model, tokenizer, state_dict, card: str, initial: dict | None = None) -> None:
    """The adapter (standard PEFT files; converted to fit the original base where lora.init
    changed it: model/lora_init.py), its tokenizer and its model card, in one atomic step."""
    try:
        with atomic_directory(paths.adapter) as tmp:
            save_adapter(model, tmp, state_dict=state_dict, initial=initial)
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card, encoding="utf-8")  # peft's own card is replaced
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise disk_full_error(e, f"the adapter {paths.adapter}", latest_checkpoint(paths)) from None


def _memory_estimate(recipe: Recipe) -> tuple[str, float | tuple[float, float] | None]:
    """One line of `lora estimate` for this recipe (memory before it is spent, not an hour in),
    and its total in bytes: (low, high) for an 8-bit base, which lies between two; None if none."""
    try:
        est = estimate_memory(recipe)
    except (LoraError, OSError, ValueError) as e:  # an estimate never stops a run
        return f"memory estimate: unavailable ({getattr(e, 'message', e)})", None
    shape = (f"batch {est.batch_size} x {est.max_length} tokens, plus ~0.5-1 GB for the libraries; "
             "`lora estimate` has the table")
    if est.method not in est.memory:
        # (the 4-bit figure is not always the lower one: its activations are in the compute dtype)
        low, high = sorted(est.memory[m]["total"] for m in ("qlora", "lora"))
        return (
            f"memory estimate: between {human_bytes(low)} and {human_bytes(high)} to train "
            f"({est.method}: between the 4-bit and full-precision figures; {shape})"
        ), (low, high)
    total = est.memory[est.method]["total"]
    return f"memory estimate: {human_bytes(total)} to train ({est.method}, {shape})", total
