"""A run's recipe as the run trained with it, whichever directory a command runs in.

The recipe.yaml a run keeps names paths as they were written; run.json recorded what they meant:
the base model's absolute path, the directory training ran in, and the dtypes `auto` became. A
resumed, evaluated, merged or sampled run reads the same base and data, in the same dtypes, from
anywhere (a deleted base or data file is named, never swapped for another at the same relative path).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_cli.data.records import load_records
from lora_cli.errors import LoraError, RunDirError
from lora_cli.model.dtypes import pin_dtypes
from lora_cli.recipe.load import load_recipe
from lora_cli.recipe.schema import DataSource, Recipe
from lora_cli.run.paths import RunPaths
from lora_cli.run.record import read_record


def recipe_to_train(recipe: Path, overrides: list[str], *, resume: bool) -> tuple[Recipe, Path]:
    """`lora train RECIPE [overrides]`: the recipe and the file it was read from. With --resume,
    RECIPE may be a run directory: its recipe.yaml, its output_dir that directory, and its relative
    paths those of the directory it trained in (run.json), not of here."""
    recipe = recipe.expanduser()  # `--resume "~/runs/x"`, quoted past the shell
    if resume and recipe.is_dir():
        loaded = load_recipe(recipe / "recipe.yaml", overrides)
        loaded = with_run_paths(dataclasses.replace(loaded, output_dir=str(recipe)), RunPaths(recipe))
        return loaded, recipe / "recipe.yaml"
    if resume and not recipe.exists():
        raise RunDirError(
            f"nothing to resume: {recipe} does not exist",
            "Name a run directory (runs/<name>) or its recipe file; drop --resume to start a new run.",
        )
    return load_recipe(recipe, overrides), recipe


def load_run_recipe(paths: RunPaths) -> Recipe:
    """The recipe a run was trained with, its dtypes pinned (with_run_dtypes): the base loads as
    the adapter was trained on it."""
    return with_run_dtypes(with_run_paths(load_recipe(paths.recipe), paths), paths)


def with_run_paths(recipe: Recipe, paths: RunPaths) -> Recipe:
    """`recipe` with the paths it names as they were when the run trained: the base model at the
    absolute path recorded then (an error if it is gone, not a hub lookup of a relative path), and
    relative data paths against the directory training ran in, where they still exist there."""
    record = read_record(paths)
    local_path = record.model.local_path if record.model is not None else None
    if local_path and not Path(recipe.model.name).expanduser().is_absolute():
        if not Path(local_path).exists():
            raise RunDirError(
                f"the base model of run {paths.root} is gone: {local_path} no longer exists",
                "Restore it there (the adapter only works on the base it was trained on).",
            )
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=local_path))
    working_dir = record.working_dir
    if working_dir is None:
        return recipe

    def anchored(spec):
        if isinstance(spec, list):
            return [anchored(item) for item in spec]
        if isinstance(spec, DataSource):  # an entry of a mix: its path
            return dataclasses.replace(spec, path=anchored(spec.path))
        if not isinstance(spec, str) or Path(spec).expanduser().is_absolute():
            return spec
        there = Path(working_dir) / spec
        # A data file is the one training read, even when it is gone (its error then names that
        # path, and another file of the same name here is never used instead); a hub dataset id
        # (no file suffix, not a file there) stays as it is.
        return str(there) if there.exists() or Path(spec).suffix else spec

    data = dataclasses.replace(
        recipe.data, train=anchored(recipe.data.train), validation=anchored(recipe.data.validation)
    )
    return dataclasses.replace(recipe, data=data)


def with_run_dtypes(recipe: Recipe, paths: RunPaths) -> Recipe:
    """`recipe` with its `auto` dtypes pinned to the ones the run recorded when it started, else
    (a new run) to this machine's (model/dtypes.py pin_dtypes)."""
    model = read_record(paths).model
    recorded = {"dtype": model.dtype} if model is not None and model.dtype else None
    return dataclasses.replace(recipe, model=pin_dtypes(recipe.model, recorded))


def trained_on_chat(paths: RunPaths, recipe: Recipe) -> bool:
    """Did the run train on chat rows? run.json says which format was used; else the recipe/data."""
    try:
        data = read_record(paths).data
    except LoraError:
        data = None
    fmt = data.format if data is not None else None
    if fmt:
        return "chat" in fmt.split("+") or fmt == "preference-chat"  # a mix: "chat+completion"; chat pairs (dpo/orpo)
    if recipe.data.format not in ("auto", "preference"):
        return recipe.data.format == "chat"
    try:
        first = load_records(recipe.data.train)[0]
    except LoraError:
        return False
    return "messages" in first or isinstance(first.get("prompt"), list)


def run_base_path(run: Path) -> Path | None:
    """The local base model directory a run trained on, as recorded (None if none or unreadable)."""
    try:
        path = Path(with_run_paths(load_recipe(run / "recipe.yaml"), RunPaths(run)).model.name).expanduser()
    except Exception:  # another run's broken files (or its deleted base) are not a caller's business
        return None
    return path if path.exists() else None
