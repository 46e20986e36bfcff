"""--resume: what may change between a run and its resume, and which checkpoint it continues from.

A resume refuses a recipe or data change that alters what is learned (model, LoRA shape, learning
rate, data file contents) and names it; log/eval/save cadence may change. It continues with the
process count the run started with, from the newest complete checkpoint, loaded as plain tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from lora_cli import ranks
from lora_cli.data.mixing import source_paths
from lora_cli.errors import RunDirError
from lora_cli.fsutil import absolute_if_exists
from lora_cli.model.sources import is_builtin
from lora_cli.recipe.load import load_recipe
from lora_cli.recipe.schema import DataSource, Recipe
from lora_cli.recipe.show import recipe_to_dict
from lora_cli.run.checkpoints import complete_checkpoints, latest_checkpoint
from lora_cli.run.paths import RunPaths
from lora_cli.run.recipes import with_run_paths
from lora_cli.run.record import RunRecord, read_record
from lora_cli.training.checkpoints import check_loads_safely

# Recipe keys that may change between a run and its resume: they do not alter what is learned.
RESUME_BENIGN_KEYS = {
    "train.log_every", "train.eval_every", "train.save_every", "train.save_total_limit",
    "train.report_to", "train.max_nonfinite_steps", "train.gradient_checkpointing",
    "output_dir",  # the same run, named by another path (or moved)
    "eval.batch_size", "eval.max_rows",  # what is evaluated, not what is learned
}


def data_fingerprint(spec) -> str:
    """sha256 over the training files' bytes (or the hub id), to detect changed data on resume."""
    digest = hashlib.sha256()
    for item in source_paths(spec):
        path = Path(item)
        if path.is_file():
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(str(item).encode())
    return digest.hexdigest()[:16]


def _spec_text(spec) -> str:
    return ", ".join(source_paths(spec))


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
    # Paths compare as the files they name: the saved recipe's as they were where the run trained
    # (run/recipes.py with_run_paths), the current one's from here; `--resume` works from any directory.
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
    data = read_record(paths).data
    old_fp = data.fingerprint if data is not None else None
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
    def absolute(spec):
        if isinstance(spec, DataSource):  # an entry of a mix: its path
            return dataclasses.replace(spec, path=absolute_if_exists(spec.path))
        return [absolute(item) for item in spec] if isinstance(spec, list) else absolute_if_exists(spec)

    data = dataclasses.replace(
        recipe.data, train=absolute(recipe.data.train), validation=absolute(recipe.data.validation)
    )
    model = (
        recipe.model
        if is_builtin(recipe.model.name)
        else dataclasses.replace(recipe.model, name=absolute(recipe.model.name))
    )
    return dataclasses.replace(recipe, model=model, data=data)


def resume_checkpoint(paths: RunPaths, record: RunRecord) -> Path | None:
    """The checkpoint a resume of this (unfinished) run starts from; None: from step 0."""
    started_with = record.num_processes
    if started_with is not None and started_with != ranks.world_size():
        # The global batch (batch_size x grad_accum x processes) and the data position a
        # checkpoint resumes at both depend on it: another count learns something else.
        raise RunDirError(
            f"cannot resume {paths.root}: it trained with {started_with} process{'es' if started_with != 1 else ''}, "
            f"this resume has {ranks.world_size()}",
            f"Resume with the same count: lora train --resume {paths.root} --num-processes {started_with}"
            f"{' (or accelerate launch --num_processes ' + str(started_with) + ')' if started_with > 1 else ''}.",
        )
    checkpoint = latest_checkpoint(paths)
    # (a complete checkpoint's trainer_state.json parses: run/checkpoints.py incomplete_reason)
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")) if checkpoint else {}
    if 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
        # Stopped after its last step, before the adapter was saved (Ctrl-C on that step, disk
        # full). The Trainer resumed there trains one step past max_steps and the schedule:
        # redo the last stretch from the checkpoint before it instead (resume is exact).
        earlier = [p for _, p in complete_checkpoints(paths.checkpoints) if p != checkpoint]
        print(
            f"{checkpoint.name} is the run's last step but its adapter was not saved: "
            f"training again from {earlier[-1].name if earlier else 'step 0'} to save it"
        )
        checkpoint = earlier[-1] if earlier else None
    if checkpoint is not None:
        check_loads_safely(checkpoint)
    return checkpoint
