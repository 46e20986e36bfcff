"""`lora train`: recipe -> data + model -> HF Trainer -> runs/<name>/adapter.

The loop itself is the HF Trainer (accelerate underneath); this module only decides its
arguments, wires in our callbacks, and keeps the run directory's promises (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_cli import __version__
from lora_cli.config import Recipe, dump_recipe, recipe_to_dict
from lora_cli.errors import Interrupted, RunDirError, TrainingError
from lora_cli.runs import RunPaths, atomic_directory, atomic_write_text, prepare_run_dir, read_run_json, update_run_json

# Recipe keys that may change between a run and its resume: they do not alter what is learned.
RESUME_BENIGN_KEYS = {
    "train.log_every", "train.eval_every", "train.save_every", "train.save_total_limit",
    "train.report_to", "train.max_nonfinite_steps", "train.gradient_checkpointing",
    "output_dir",  # the same run, named by another path (or moved)
}


def quiet_libraries() -> None:
    """Our own progress and messages replace the libraries' per-tensor bars and advice."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Deprecation notices addressed to library integrators, and peft's note that GPT-2's Conv1D
    # layers are transposed (it handles that itself): noise for a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def data_fingerprint(spec) -> str:
    """sha256 over the training files' bytes (or the hub id), to detect changed data on resume."""
    digest = hashlib.sha256()
    for item in [spec] if isinstance(spec, str) else list(spec):
        path = Path(item)
        if path.is_file():
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(str(item).encode())
    return digest.hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(paths: RunPaths, recipe: Recipe) -> None:
    """Refuse a resume whose recipe or data changed in a way that changes what is learned."""
    if not paths.recipe.is_file():
        raise RunDirError(f"{paths.root} has no recipe.yaml to resume from", "Start a new run with --overwrite.")
    saved = _flatten(yaml.safe_load(paths.recipe.read_text(encoding="utf-8")) or {})
    current = _flatten(recipe_to_dict(recipe))
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    blocking = [k for k in changed if k not in RESUME_BENIGN_KEYS]
    if blocking:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in blocking[:5])
        raise RunDirError(
            f"cannot resume {paths.root}: the recipe changed ({details})",
            "Resume with the original recipe, or start a new run with --overwrite or another output_dir.",
        )
    old_fp = read_run_json(paths).get("data", {}).get("fingerprint")
    new_fp = data_fingerprint(recipe.data.train)
    if old_fp and old_fp != new_fp:
        raise RunDirError(
            f"cannot resume {paths.root}: the training data changed since the run started",
            "Restore the original data, or start a new run with --overwrite.",
        )
    for key in changed:
        print(f"resume: {key} changed ({saved.get(key)!r} -> {current.get(key)!r}); allowed")


def latest_checkpoint(paths: RunPaths) -> Path | None:
    """The newest checkpoint that was written completely (Trainer writes trainer_state.json last)."""
    if not paths.checkpoints.is_dir():
        return None
    complete = []
    for ckpt in paths.checkpoints.glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[-1]
        if step.isdigit() and (ckpt / "trainer_state.json").is_file():
            complete.append((int(step), ckpt))
        elif step.isdigit():
            print(f"resume: skipping incomplete checkpoint {ckpt}")
    return max(complete)[1] if complete else None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"lora": __version__}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def training_arguments(recipe: Recipe, paths: RunPaths, *, has_validation: bool):
    import torch
    from transformers import TrainingArguments

    from lora_cli.model import resolve_dtype

    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    if has_validation:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": t.eval_every} if t.eval_every else {"eval_strategy": "epoch"}
    else:
        eval_kwargs = {"eval_strategy": "no"}
    save_kwargs = {"save_strategy": "steps", "save_steps": t.save_every} if t.save_every else {"save_strategy": "epoch"}
    return TrainingArguments(
        output_dir=str(paths.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.log_every,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # we want to see (and stop on) non-finite losses
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=list(t.report_to) or "none",
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        disable_tqdm=True,
        optim="adamw_torch",
        **eval_kwargs,
        **save_kwargs,
    )


def make_trainer_class():
    """Trainer + token counting + a guard against non-finite losses (built lazily: heavy import)."""
    import torch
    from transformers import Trainer

    class LoraTrainer(Trainer):
        tokens = None  # TokenCounter
        max_nonfinite_steps = 3
        _nonfinite_in_a_row = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is not None and self.tokens is not None:
                supervised = int((labels[:, 1:] != -100).sum())
                mask = inputs.get("attention_mask")
                nonpad = int(mask.sum()) if mask is not None else int(labels.numel())
                self.tokens.add(supervised, nonpad)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if torch.isfinite(loss).all():
                self._nonfinite_in_a_row = 0
                return loss
            # Drop this step's gradients so the weights stay finite; stop if it keeps happening.
            model.zero_grad(set_to_none=True)
            self._nonfinite_in_a_row += 1
            if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
                lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler else float("nan")
                raise TrainingError(
                    f"the loss was {float(loss)} for {self._nonfinite_in_a_row} steps in a row "
                    f"(step {self.state.global_step + 1}, learning rate {lr:.3g}); training stopped, "
                    "no weights were saved from the bad steps",
                    "Lower train.lr, check the data for empty or broken rows, or use dtype float32.",
                )
            return torch.zeros_like(loss)

    return LoraTrainer


@dataclass
class TrainResult:
    paths: RunPaths
    model: Any  # the trained PeftModel, still in memory (tests compare it with the saved adapter)
    final: dict


def run_training(recipe: Recipe, *, recipe_path: str | None, resume: bool, overwrite: bool) -> TrainResult:
    """Train and save the adapter. Raises LoraError subclasses on failure."""
    paths = prepare_run_dir(recipe.output_dir, resume=resume, overwrite=overwrite)
    checkpoint = None
    if resume:
        check_resumable(paths, recipe)
        checkpoint = latest_checkpoint(paths)
        print(f"resuming {paths.root} from {checkpoint.name}" if checkpoint else f"no complete checkpoint in {paths.root}: starting from step 0")
    else:
        now = time.time()
        update_run_json(paths, name=paths.root.name, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), created_at_unix=now)
    atomic_write_text(paths.recipe, dump_recipe(recipe))
    from lora_cli.allocator import INSTALL_HINT, active_allocator

    allocator = active_allocator()
    if allocator == "system" and os.environ.get("LORA_ALLOCATOR") != "system":
        print(f"tip: tcmalloc makes CPU training steps faster and leaner (make bench): {INSTALL_HINT}")
    update_run_json(
        paths, status="running", recipe_path=recipe_path, versions=library_versions(), pid=os.getpid(), allocator=allocator
    )
    try:
        return _train(recipe, paths, checkpoint)
    except Interrupted:
        update_run_json(paths, status="interrupted")
        raise
    except BaseException as e:
        update_run_json(paths, status="failed", error=f"{type(e).__name__}: {getattr(e, 'message', e)}")
        raise


def _train(recipe: Recipe, paths: RunPaths, checkpoint: Path | None) -> TrainResult:
    quiet_libraries()
    import torch
    from transformers import set_seed

    from lora_cli.callbacks import MetricsFileCallback, ProgressCallback, StopOnSignalCallback, TokenCounter
    from lora_cli.data import Collator, prepare_data
    from lora_cli.model import attach_lora, load_base_model, load_tokenizer, resolve_model_source

    started = time.perf_counter()
    set_seed(recipe.train.seed)
    source = resolve_model_source(recipe.model)
    print(f"model: {source.description}")
    tokenizer = load_tokenizer(recipe.model, source)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    for line in data.report.lines():
        print(line)
    update_run_json(
        paths,
        model={"name": recipe.model.name, "source": source.description, "quantization": recipe.model.quantization},
        data={"fingerprint": data_fingerprint(recipe.data.train), "report": _jsonable(data.report)},
    )

    base = load_base_model(recipe.model, source)
    quantized = recipe.model.quantization != "none"
    model = attach_lora(base, recipe.lora, quantized=quantized, gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"lora: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")

    tokens = TokenCounter()
    stopper = StopOnSignalCallback()
    progress = ProgressCallback(tokens)
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=training_arguments(recipe, paths, has_validation=bool(data.validation)),
        train_dataset=data.train,
        eval_dataset=data.validation or None,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(paths.metrics, tokens), progress, stopper],
    )
    # Our ProgressCallback replaces the Trainer's raw printing of log dicts.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.tokens = tokens
    trainer.max_nonfinite_steps = recipe.train.max_nonfinite_steps
    stopper.install()
    try:
        train_started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - train_started
    except torch.OutOfMemoryError:
        raise TrainingError(
            "out of memory during training",
            "Lower train.batch_size (raise train.grad_accum to keep the effective batch), lower "
            "data.max_length, set train.gradient_checkpointing: true, or use model.quantization: 4bit.",
        ) from None
    except KeyboardInterrupt:
        raise Interrupted(
            "aborted by a second Ctrl-C; the last complete checkpoint is kept",
            f"Continue with `lora train --resume {paths.root}`.",
        ) from None
    finally:
        stopper.uninstall()
        progress.close()

    if stopper.received is not None:
        import signal

        step = trainer.state.global_step
        raise Interrupted(
            f"interrupted at step {step}; checkpoint saved in {paths.checkpoints}",
            f"Continue with `lora train --resume {paths.root}`.",
            exit_code=128 + int(stopper.received) if stopper.received != signal.SIGINT else 130,
        )

    final = {"global_step": trainer.state.global_step, "train_loss": result.training_loss}
    if data.validation:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == trainer.state.global_step:
            final["eval_loss"] = evals[-1]["eval_loss"]  # the Trainer just evaluated
        else:
            final["eval_loss"] = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        with atomic_directory(paths.adapter) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        update_run_json(
            paths,
            status="completed",
            final=final,
            params={"trainable": trainable, "total": total},
            timings={
                "total_seconds": round(time.perf_counter() - started, 2),
                "train_seconds": round(train_seconds, 2),
                "supervised_tokens": tokens.supervised,
                "tokens_per_second": round(tokens.tokens / max(train_seconds, 1e-9), 1),
            },
        )
        print(f"adapter saved to {paths.adapter}  (final train loss {final['train_loss']:.4f}"
              + (f", eval loss {final['eval_loss']:.4f}" if "eval_loss" in final else "") + ")")
    return TrainResult(paths, model, final)


def _jsonable(obj) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool, type(None), list, dict)) and not (isinstance(v, float) and math.isnan(v))}
