"""`lora validate` / `lora train --dry-run`: check the recipe and report on the data, train nothing.

Prints, in order: the resolved recipe (each value marked recipe / override / default), the data
report from the tokenizer alone (lengths, cut rows, supervised share, EOS, padding), a preview of
a few examples with supervised and masked tokens told apart, warnings with their fixes, and the
memory estimate from the model config. No model weights are loaded.
"""

from __future__ import annotations

import importlib.util
import sys

from lora_cli.config import Recipe, marked_recipe_lines
from lora_cli.errors import DataError, RecipeError

# report_to name -> the package the transformers callback needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(recipe: Recipe) -> None:
    """Fail before any model is loaded when a tracker in train.report_to is not installed."""
    missing = [name for name in recipe.train.report_to if not _installed(TRACKER_PACKAGES[name])]
    if missing:
        raise RecipeError(
            "train.report_to",
            [f"{name} is listed but the '{TRACKER_PACKAGES[name]}' package is not installed" for name in missing],
            f"pip install {' '.join(TRACKER_PACKAGES[n] for n in missing)}  (or remove it from train.report_to)",
        )


def _installed(package: str) -> bool:
    if package in sys.modules:  # None there means "import blocked"
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def run_validate(
    recipe: Recipe,
    *,
    recipe_path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preview: int = 2,
    estimate: bool = True,
) -> None:
    from lora_cli.data import load_with_locations, prepare_data, tokenize_records
    from lora_cli.model import load_tokenizer, resolve_model_source
    from lora_cli.train import quiet_libraries

    quiet_libraries()
    print("recipe: valid")
    for line in marked_recipe_lines(recipe, recipe_path, overrides):
        print(line)
    check_trackers(recipe)
    source = resolve_model_source(recipe.model)
    print(f"model: {source.description}")
    tokenizer = load_tokenizer(recipe.model, source)
    from lora_cli.data import check_max_length
    from lora_cli.estimate import estimate as make_estimate
    from lora_cli.estimate import estimate_lines, load_model_config

    config = load_model_config(recipe.model)
    # an error for learned positions (a longer row cannot run), a warning for RoPE / ALiBi
    context_warning = check_max_length(recipe.data.max_length, config)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, batch_size=recipe.train.batch_size)
    if context_warning:
        data.report.warnings.append(context_warning)
    for line in data.report.lines(full=True):
        print(line)
    from lora_cli.train import ignored_settings

    for note in ignored_settings(recipe, data):
        print(f"note: {note}")
    if preview > 0:
        import dataclasses

        records, where = load_with_locations(recipe.data.train)
        cfg = dataclasses.replace(recipe.data, format=data.report.format, too_long="truncate")
        try:
            examples, counts = tokenize_records(records[:preview], cfg, tokenizer, source="preview", where=where[:preview])
            # Rows with nothing to train on give no example: label each example with its own row.
            skipped = set(counts.no_supervised_where) | set(counts.dropped_where)
            print_preview(examples, [w for w in where[:preview] if w not in skipped], tokenizer)
        except DataError:  # the first rows have nothing to train on: the report above says so
            print(f"preview: the first {preview} rows have no supervised tokens")
    if estimate:
        print("estimate:")
        for line in estimate_lines(make_estimate(recipe, config)):
            print(f"  {line}")


# --------------------------------------------------------------------------- preview


def preview_segments(example: dict, tokenizer) -> list[tuple[str, bool]]:
    """(text, supervised) runs of one example. Token t is supervised when labels[t] is not -100
    (the model predicts it); the first token never is."""
    from lora_cli.data import IGNORE_INDEX

    ids, labels = example["input_ids"], example["labels"]
    runs: list[tuple[list[int], bool]] = []
    for n, (token, label) in enumerate(zip(ids, labels)):
        supervised = n > 0 and label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(tokenizer.decode(tokens, skip_special_tokens=False), sup) for tokens, sup in runs]


def preview_text(example: dict, tokenizer, *, color: bool) -> str:
    """Plain: masked runs in [masked]...[/], supervised runs as they are. Colour: rich markup,
    masked dim, supervised bold green."""
    from rich.markup import escape

    out = []
    for text, supervised in preview_segments(example, tokenizer):
        if color:
            out.append(f"[bold green]{escape(text)}[/]" if supervised else f"[dim]{escape(text)}[/]")
        else:
            out.append(text if supervised else f"[masked]{text}[/]")
    return "".join(out)


def print_preview(examples: list[dict], where: list[str], tokenizer) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    legend = ("[bold green]trained on[/], [dim]masked (no loss)[/]" if color
              else "trained-on text plain, masked text (no loss) in [masked]...[/]")
    print(f"preview of {len(examples)} example(s): ", end="", flush=True)
    console.print(legend, markup=color)
    for example, w in zip(examples, where):
        print(f"--- {w}, {len(example['input_ids'])} tokens", flush=True)
        console.print(preview_text(example, tokenizer, color=color), markup=color)
