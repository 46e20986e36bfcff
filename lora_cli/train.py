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


from lora_cli import __version__
from lora_cli.config import Recipe, dump_recipe, marked_recipe_lines, recipe_to_dict
from lora_cli.data import REAL_TOKENS_KEY
from lora_cli.errors import Interrupted, RunDirError, TrainingError
from lora_cli.runs import (RunPaths, atomic_directory, atomic_write_text, prepare_run_dir, read_run_json,
                           update_run_json, with_run_dtypes)

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
    # bitsandbytes advises installing `kernels` (which downloads code from the Hub) for a CPU
    # inference kernel that lora_cli.model turns off anyway.
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
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


def _spec_text(spec) -> str:
    return spec if isinstance(spec, str) else ", ".join(map(str, spec))


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
    from lora_cli.config import load_recipe
    from lora_cli.runs import with_run_paths

    # Paths compare as the files they name: the saved recipe's as they were where the run trained
    # (runs.with_run_paths), the current one's from here; `--resume` works from any directory.
    saved = _flatten(recipe_to_dict(_absolute_paths(with_run_paths(load_recipe(paths.recipe), paths))))
    current = _flatten(recipe_to_dict(_absolute_paths(recipe)))
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
            f"cannot resume {paths.root}: the training data changed since the run started "
            f"(data.train {_spec_text(recipe.data.train)}: fingerprint {old_fp} -> {new_fp})",
            "Restore the original data, or start a new run with --overwrite.",
        )
    for key in changed:
        print(f"resume: {key} changed ({saved.get(key)!r} -> {current.get(key)!r}); allowed")


def _absolute_paths(recipe: Recipe) -> Recipe:
    """`recipe` with its relative model and data paths made absolute, where they exist here."""
    import dataclasses

    def absolute(spec):
        return [absolute(item) for item in spec] if isinstance(spec, list) else _absolute_if_exists(spec)

    data = dataclasses.replace(recipe.data, train=absolute(recipe.data.train), validation=absolute(recipe.data.validation))
    model = recipe.model if _is_builtin(recipe.model.name) else dataclasses.replace(recipe.model, name=absolute(recipe.model.name))
    return dataclasses.replace(recipe, model=model, data=data)


def _absolute_if_exists(spec):
    """A path that exists here, made absolute; anything else (a hub id, a missing file) as it is."""
    if not isinstance(spec, str) or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def _is_builtin(name: str) -> bool:
    from lora_cli.model import BUILTIN_MODELS

    return name.lower() in BUILTIN_MODELS


def latest_checkpoint(paths: RunPaths) -> Path | None:
    """The newest complete checkpoint (see checkpoints.incomplete_reason); says which it skips."""
    from lora_cli.checkpoints import complete_checkpoints

    complete = complete_checkpoints(paths.checkpoints, say=print)
    return complete[-1][1] if complete else None


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
        optim="adamw_torch",
        # Every LoRA weight takes part in each forward pass: DDP need not search for unused ones.
        ddp_find_unused_parameters=False,
        **eval_kwargs,
        **save_kwargs,
    )


def make_trainer_class():
    """Trainer + token counting + a guard against non-finite losses (built lazily: heavy import)."""
    import json

    import torch
    from transformers import Trainer

    RUN_LOSS_FILE = "lora_run_loss.json"  # in each checkpoint: the loss book of the steps before it

    class LoraTrainer(Trainer):
        tokens = None  # TokenCounter
        max_nonfinite_steps = 3
        use_chunked_loss = True  # lora_cli/loss.py where exact; False: the model's own loss
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
                supervised = int((labels[:, 1:] != -100).sum())
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
                flags = self.accelerator.reduce(torch.tensor([bad_tensors, last_bad], device=self.args.device), reduction="sum")
                bad_tensors, last_bad = flags.tolist()
            if bad_tensors:
                problem = f"{bad_tensors} adapter weight tensors hold NaN or inf"
            elif not math.isfinite(final["train_loss"]):
                problem = "the loss of every step was non-finite, so nothing was learned"
            elif not math.isfinite(final.get("eval_loss", 0.0)):
                problem = f"the final eval loss is {final['eval_loss']}"
            elif last_bad:
                problem = ("the last step's loss was non-finite, and the final weights give a non-finite loss "
                           "on the last training batch that was finite")
            else:
                if final.get("skipped_steps") and self.is_world_process_zero():
                    skipped = final["skipped_steps"]
                    print(f"warning: {skipped} of {self.state.global_step} steps {'was' if skipped == 1 else 'were'} skipped "
                          "(non-finite loss); the final train loss is the mean of the others")
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
            # once (lora_cli/loss.py); same value as the model's own loss. Only where it is exact.
            head = self._plain_head(model)
            # Outputs (logits) wanted: the Trainer's own loss. Loss-only evaluation comes through
            # prediction_step below without asking for outputs.
            if head is None or "labels" not in inputs or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from lora_cli.loss import supervised_loss

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
                from lora_cli.loss import plain_head

                unwrapped = self.accelerator.unwrap_model(model)
                owned = self.is_fsdp_enabled or self.is_deepspeed_enabled or self.label_smoother is not None
                usable = hasattr(unwrapped, "get_base_model") and not owned and self.compute_loss_func is None
                self._head = plain_head(unwrapped.get_base_model()) if usable and self.use_chunked_loss else None
                self._head_checked = True
            return self._head

        def _save_checkpoint(self, model, trial):
            # Staged and renamed into place: a kill or a full disk never leaves a half checkpoint-N.
            from lora_cli.checkpoints import save_checkpoint_atomically

            run_loss = self._reduced_run_loss()  # every rank, before only the main one writes it
            save_trainer_files = super()._save_checkpoint

            def save(model, trial):
                save_trainer_files(model, trial)
                if self.args.should_save:  # the run's loss so far: --resume reports the whole run's loss
                    folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                    (folder / RUN_LOSS_FILE).write_text(json.dumps({"run_loss": run_loss}), encoding="utf-8")

            save_checkpoint_atomically(self, save, model, trial)

    return LoraTrainer


@dataclass
class TrainResult:
    paths: RunPaths
    model: Any  # the trained PeftModel, still in memory (tests compare it with the saved adapter)
    final: dict


def run_training(recipe: Recipe, *, recipe_path: str | None, resume: bool, overwrite: bool,
                 overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Train and save the adapter. Raises LoraError subclasses on failure.

    `recipe_path` and `overrides` (the command line's key=value) mark where each value of the
    resolved recipe printed at the start came from, as `lora validate` does.

    Under `accelerate launch` every rank runs this; only the main one touches the run directory
    (lora_cli/distributed.py): it goes first, the others wait and share its result or its failure.
    """
    from lora_cli import distributed
    from lora_cli.validate import check_trackers

    check_trackers(recipe)  # a missing tracker package fails now, not after loading the model
    distributed.init()
    paths, checkpoint, finished = distributed.main_first(
        lambda: _open_run(recipe, recipe_path, resume=resume, overwrite=overwrite, overrides=overrides)
    )
    if finished is not None:  # --resume of a completed run: nothing to train (_open_run said so)
        return TrainResult(paths, None, finished)
    main = distributed.is_main()

    def completed() -> bool:
        # The adapter is saved and run.json says so: whatever stops us afterwards (a late Ctrl-C
        # while plotting) leaves a complete run, not an "interrupted" or "failed" one.
        try:
            return read_run_json(paths).get("status") == "completed"
        except (RunDirError, OSError):
            return False

    try:
        return _train(recipe, paths, checkpoint)
    except Interrupted:
        if main and not completed():
            update_run_json(paths, status="interrupted")
        raise
    except KeyboardInterrupt:
        if main and completed():
            raise Interrupted(f"interrupted after the run completed; the adapter is saved in {paths.adapter}",
                              "Nothing to resume: the run is complete.") from None
        # Ctrl-C outside the training loop (loading the model, the final save): every save is
        # atomic, so the last complete checkpoint stands.
        if main:
            update_run_json(paths, status="interrupted")
        raise Interrupted(
            "interrupted; the last complete checkpoint is kept", f"Continue with `lora train --resume {paths.root}`."
        ) from None
    except BaseException as e:
        lost = distributed.peer_lost(e)  # another rank died: say so instead of a gloo/NCCL traceback
        if main and not completed():
            update_run_json(paths, status="failed", error=f"{type(e).__name__}: {getattr(lost or e, 'message', e)}")
        if lost is not None:
            raise lost from None
        raise


def _open_run(recipe: Recipe, recipe_path: str | None, *, resume: bool, overwrite: bool,
              overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunPaths, Path | None, dict | None]:
    """Create or check the run directory, record the start and print the resolved recipe (main
    process only: the other ranks print nothing of it). The third value is the final metrics of a
    completed run that --resume found with nothing left to do (None: train)."""
    import json

    import torch

    from lora_cli.distributed import check_engine_supports, world_size
    from lora_cli.runs import process_identity

    check_engine_supports(recipe.model.quantization, cuda=torch.cuda.is_available())
    # Files this run reads: a directory holding one is never deleted to make room for the run.
    data = recipe.data
    keep = [recipe_path, recipe.model.name, *([data.train] if isinstance(data.train, str) else data.train),
            *([data.validation] if isinstance(data.validation, str) else data.validation or [])]
    paths = prepare_run_dir(recipe.output_dir, resume=resume, overwrite=overwrite, keep=keep)
    checkpoint = None
    if resume:
        check_resumable(paths, recipe)
        record = read_run_json(paths)
        if record.get("status") == "completed" and (paths.adapter / "adapter_config.json").is_file():
            # Training on would run past max_steps (the schedule's end) and replace the adapter.
            final = record.get("final") or {}
            print(f"{paths.root} is already complete (step {final.get('global_step', '?')}): nothing to do; "
                  f"the adapter is in {paths.adapter}")
            return paths, None, final
        started_with = record.get("num_processes")
        if isinstance(started_with, int) and started_with != world_size():
            # The global batch (batch_size x grad_accum x processes) and the data position a
            # checkpoint resumes at both depend on it: another count learns something else.
            raise RunDirError(
                f"cannot resume {paths.root}: it trained with {started_with} process{'es' if started_with != 1 else ''}, "
                f"this resume has {world_size()}",
                f"Resume with the same count: lora train --resume {paths.root} --num-processes {started_with}"
                f"{' (or accelerate launch --num_processes ' + str(started_with) + ')' if started_with > 1 else ''}.",
            )
        checkpoint = latest_checkpoint(paths)
        # (a complete checkpoint's trainer_state.json parses: checkpoints.incomplete_reason)
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")) if checkpoint else {}
        if 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
            # Stopped after its last step, before the adapter was saved (Ctrl-C on that step, disk
            # full). The Trainer resumed there trains one step past max_steps and the schedule:
            # redo the last stretch from the checkpoint before it instead (resume is exact).
            from lora_cli.checkpoints import complete_checkpoints

            earlier = [p for _, p in complete_checkpoints(paths.checkpoints) if p != checkpoint]
            print(f"{checkpoint.name} is the run's last step but its adapter was not saved: "
                  f"training again from {earlier[-1].name if earlier else 'step 0'} to save it")
            checkpoint = earlier[-1] if earlier else None
        if checkpoint is not None:
            from lora_cli.checkpoints import check_loads_safely

            check_loads_safely(checkpoint)
        print(f"resuming {paths.root} from {checkpoint.name}" if checkpoint else f"no complete checkpoint in {paths.root}: starting from step 0")
    else:
        now = time.time()
        update_run_json(paths, name=paths.root.name, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), created_at_unix=now,
                        num_processes=world_size())
    # Valid recipe, run directory open: show what this run trains with, as `lora validate` does.
    # Read before recipe.yaml is rewritten below (a resumed run directory's recipe is that file).
    print(f"recipe (resolved; lora validate {recipe_path or 'RECIPE'} shows the data preview):")
    for line in marked_recipe_lines(recipe, recipe_path, overrides):
        print(line)
    atomic_write_text(paths.recipe, dump_recipe(recipe))
    from lora_cli.allocator import INSTALL_HINT, active_allocator

    allocator = active_allocator()
    if allocator == "system" and os.environ.get("LORA_ALLOCATOR") != "system":
        print(f"tip: tcmalloc makes CPU training steps faster and leaner (make bench): {INSTALL_HINT}")
    update_run_json(
        paths, status="running", recipe_path=recipe_path, versions=library_versions(),
        **process_identity(), allocator=allocator,  # pid, start time, host: runs.py sees whether it is still alive
    )
    return paths, checkpoint, None


def _train(recipe: Recipe, paths: RunPaths, checkpoint: Path | None) -> TrainResult:
    quiet_libraries()
    import torch
    from transformers import set_seed

    from lora_cli.callbacks import MetricsFileCallback, ProgressCallback, StopOnSignalCallback, TokenCounter
    from lora_cli.data import Collator, prepare_data
    from lora_cli import distributed
    from lora_cli.model import attach_lora, load_base_model, load_tokenizer, resolve_model_source
    from lora_cli.peaks import peak_memory, peak_memory_line

    main = distributed.is_main()
    say = print if main else (lambda *args, **kwargs: None)  # one copy of each message, not N
    started = time.perf_counter()
    # `auto` dtypes become concrete now and are recorded: a resumed run keeps the ones it started
    # with, and eval / merge / generate load the base as it was trained (runs.load_run_recipe).
    recipe = with_run_dtypes(recipe, paths)
    set_seed(recipe.train.seed)  # the same on every rank: same LoRA init, same data order
    # The main process converts a GGUF file into the shared cache once; the others reuse it.
    source = distributed.main_first(lambda: resolve_model_source(recipe.model))
    say(f"model: {source.description}, {_dtype_text(recipe.model)}")
    from lora_cli.data import check_model_context

    # data.max_length past learned positions (GPT-2): exit 2 now, not an IndexError mid-run.
    context_warning = check_model_context(recipe.model, recipe.data.max_length)
    if context_warning:
        say(f"warning: {context_warning}")
    tokenizer = load_tokenizer(recipe.model, source)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, batch_size=recipe.train.batch_size)
    for line in data.report.lines():
        say(line)
    for note in ignored_settings(recipe, data):
        say(f"note: {note}")
    memory_line, estimate_bytes = _memory_estimate(recipe)
    say(memory_line)
    if distributed.is_distributed():
        say(distributed.describe_global_batch(recipe.train.batch_size, recipe.train.grad_accum))
    if main:
        update_run_json(
            paths,
            model={"name": recipe.model.name, "source": source.description, "quantization": recipe.model.quantization,
                   "dtype": recipe.model.dtype, "compute_dtype": recipe.model.compute_dtype,
                   **_local_model_path(recipe.model)},
            working_dir=os.getcwd(),  # what the recipe's relative paths meant (runs.load_run_recipe)
            data={"fingerprint": data_fingerprint(recipe.data.train), "report": _jsonable(data.report)},
        )

    base = load_base_model(recipe.model, source)
    quantized = recipe.model.quantization != "none"
    model = attach_lora(base, recipe.lora, quantized=quantized, gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    # (peft's total includes the adapter; the share is of the base, as `lora estimate` gives it)
    say(f"lora: {trainable:,} trainable parameters ({100 * trainable / (total - trainable):.2f}% of the base's {total - trainable:,})")

    tokens = TokenCounter()
    stopper = StopOnSignalCallback()
    progress = ProgressCallback(tokens)
    trainer_cls = make_trainer_class()
    if "tensorboard" in recipe.train.report_to:  # transformers 5 reads the event-file directory from here
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(paths.root / "tensorboard")
    trainer = trainer_cls(
        model=model,
        args=training_arguments(recipe, paths, has_validation=bool(data.validation)),
        train_dataset=data.train,
        eval_dataset=data.validation or None,
        data_collator=Collator(tokenizer.pad_token_id, count_tokens=True),
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
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - train_started
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        from lora_cli.errors import is_out_of_memory, out_of_memory_error

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

    # A signal after the last step's agreement stopped nothing: the run is complete and is saved.
    if stopper.stopped and 0 < trainer.state.max_steps <= trainer.state.global_step:
        # Agreed at the end of the last step: the training is complete, only the adapter is left.
        import signal

        name = "Ctrl-C" if stopper.received == signal.SIGINT else signal.Signals(stopper.received).name
        say(f"{name} came after the last step ({trainer.state.global_step}/{trainer.state.max_steps}): "
            "the training is complete; saving the adapter")
    elif stopper.stopped:
        import signal

        step = trainer.state.global_step
        raise Interrupted(
            f"interrupted at step {step}; checkpoint saved in {paths.checkpoints}",
            f"Continue with `lora train --resume {paths.root}`.",
            exit_code=128 + int(stopper.received) if stopper.received != signal.SIGINT else 130,
        )

    # The whole run's loss (result.training_loss covers only the steps since a --resume, and counts
    # skipped non-finite steps as 0).
    train_loss, skipped_steps = trainer.run_train_loss()
    final = {"global_step": trainer.state.global_step, "train_loss": train_loss}
    if skipped_steps:
        final["skipped_steps"] = skipped_steps
    if data.validation:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if evals and evals[-1].get("step") == trainer.state.global_step:
            final["eval_loss"] = evals[-1]["eval_loss"]  # the Trainer just evaluated
        else:
            final["eval_loss"] = trainer.evaluate()["eval_loss"]
    trainer.check_finite_result(final)  # a diverged run fails (exit 1): no broken adapter saved as completed
    # FSDP / ZeRO-3 shard the weights: every rank takes part in gathering them (else None).
    state_dict = distributed.gather_full_state_dict(trainer)
    if trainer.is_world_process_zero():
        from lora_cli.checkpoints import DISK_FULL, disk_full_error

        try:
            with atomic_directory(paths.adapter) as tmp:
                model.save_pretrained(tmp, state_dict=state_dict)
                tokenizer.save_pretrained(tmp)
                from lora_cli.modelcard import model_card

                card = model_card(recipe, run_name=paths.root.name, report=data.report, trainable=trainable,
                                  total=total, final=final, source_description=source.description)
                (tmp / "README.md").write_text(card, encoding="utf-8")  # peft's own card is replaced
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise disk_full_error(e, f"the adapter {paths.adapter}", latest_checkpoint(paths)) from None
        peaks = peak_memory()  # what this process reached (under DDP: rank 0's), beside the estimate
        update_run_json(
            paths,
            status="completed",
            memory={**peaks, "estimate_bytes": estimate_bytes},
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
        print(peak_memory_line(peaks, estimate_bytes))
        from lora_cli.plot import write_loss_plot

        print(write_loss_plot(paths.metrics, paths.root / "loss.png", title=paths.root.name))
    distributed.barrier()  # the other ranks finish when the run is complete, not before
    return TrainResult(paths, model, final)


def ignored_settings(recipe: Recipe, data) -> list[str]:
    """Settings this run cannot act on: said, not silently dropped (also by `lora validate`)."""
    notes = []
    if recipe.train.eval_every and not data.validation:
        notes.append("train.eval_every is set but there is no validation data (data.validation or "
                     "data.val_split): nothing will be evaluated")
    if recipe.data.train_on_prompt and data.report.format == "text":
        notes.append("data.train_on_prompt does nothing for text data: every token is trained on already")
    return notes


def _local_model_path(model) -> dict:
    """{"local_path": absolute path} for a base read from a local directory or .gguf file, so a
    run's eval / merge / generate load that base from anywhere, and never another model that
    happens to sit at the same relative path there; {} for built-in names and hub ids."""
    if _is_builtin(model.name) or not Path(model.name).expanduser().exists():
        return {}
    return {"local_path": _absolute_if_exists(model.name)}


def _dtype_text(model) -> str:
    # (peft's prepare_model_for_kbit_training keeps a quantized model's other weights in float32)
    if model.quantization == "4bit":
        return f"4-bit {model.quant_type} computing in {model.compute_dtype}"
    return "8-bit" if model.quantization == "8bit" else f"weights in {model.dtype}"


def _memory_estimate(recipe: Recipe) -> tuple[str, float | tuple[float, float] | None]:
    """One line of `lora estimate` for this recipe (memory before it is spent, not an hour in),
    and its total in bytes: (low, high) for an 8-bit base, which lies between two; None if none."""
    from lora_cli.errors import LoraError
    from lora_cli.estimate import estimate, human_bytes

    try:
        est = estimate(recipe)
    except (LoraError, OSError, ValueError) as e:  # an estimate never stops a run
        return f"memory estimate: unavailable ({getattr(e, 'message', e)})", None
    shape = f"batch {est.batch_size} x {est.max_length} tokens, plus ~0.5-1 GB for the libraries; `lora estimate` has the table"
    if est.method not in est.memory:
        # (the 4-bit figure is not always the lower one: its activations are in the compute dtype)
        low, high = sorted(est.memory[m]["total"] for m in ("qlora", "lora"))
        return (f"memory estimate: between {human_bytes(low)} and {human_bytes(high)} to train "
                f"({est.method}: between the 4-bit and full-precision figures; {shape})"), (low, high)
    total = est.memory[est.method]["total"]
    return f"memory estimate: {human_bytes(total)} to train ({est.method}, {shape})", total


def _jsonable(obj) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool, type(None), list, dict)) and not (isinstance(v, float) and math.isnan(v))}
