"""The recipe's train section as the HF Trainer's arguments."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from lora_cli.model.dtypes import resolve_dtype
from lora_cli.recipe.schema import Recipe
from lora_cli.run.paths import RunPaths
from lora_cli.training import distributed
from lora_cli.training.early_stopping import best_model_arguments
from lora_cli.training.optimizers import optimizer_arguments


def training_arguments(recipe: Recipe, paths: RunPaths, *, has_validation: bool):
    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    if has_validation:
        eval_kwargs = (
            {"eval_strategy": "steps", "eval_steps": t.eval_every} if t.eval_every else {"eval_strategy": "epoch"}
        )
    else:
        eval_kwargs = {"eval_strategy": "no"}
    save_kwargs = {"save_strategy": "steps", "save_steps": t.save_every} if t.save_every else {"save_strategy": "epoch"}
    save_kwargs.update(best_model_arguments(t))  # early stopping / keep_best: the best eval loss, saved
    args = TrainingArguments(
        output_dir=str(paths.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size or t.batch_size,  # (no gradients: may be larger)
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        # `constant` is the schedule after warm-up (recipe help): with a warm-up, warm up first.
        lr_scheduler_type="constant_with_warmup" if t.scheduler == "constant" and t.warmup_ratio > 0 else t.scheduler,
        warmup_steps=t.warmup_ratio,  # a ratio of the total steps (< 1); LoraTrainer.create_scheduler rounds it
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
        **optimizer_arguments(recipe),  # train.optimizer, betas, epsilon (training/optimizers.py)
        neftune_noise_alpha=t.neftune_noise_alpha,  # the Trainer's NEFTune: noise in training steps only
        # Every LoRA weight takes part in each forward pass: DDP need not search for unused ones.
        ddp_find_unused_parameters=False,
        **eval_kwargs,
        **save_kwargs,
    )
    distributed.use_fsdp_on_cpu()  # now: building the arguments reset accelerate's state
    return args
