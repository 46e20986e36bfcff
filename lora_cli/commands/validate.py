"""`lora validate` / `lora train --dry-run`: check the recipe and report on the data, train nothing.

Prints, in order: the resolved recipe (each value marked recipe / override / default), the data
report from the tokenizer alone (lengths, cut rows, supervised share, EOS, padding), a preview of
a few examples with supervised and masked tokens told apart, warnings with their fixes, and the
memory estimate from the model config. No model weights are loaded.
"""

from __future__ import annotations

import dataclasses

from lora_cli.console import quiet_libraries
from lora_cli.data.preference import prepare_preferences, tokenize_pairs
from lora_cli.data.preference_report import print_pair_preview
from lora_cli.data.prepare import prepare_data
from lora_cli.data.preview import print_preview
from lora_cli.data.records import check_sources, load_with_locations
from lora_cli.data.tokenize import tokenize_records
from lora_cli.errors import DataError
from lora_cli.model.facts import check_max_length, load_model_config
from lora_cli.model.loading import load_tokenizer
from lora_cli.model.sources import resolve_model_source
from lora_cli.recipe.schema import Recipe
from lora_cli.recipe.show import marked_recipe_lines
from lora_cli.training.optimizers import check_optimizer
from lora_cli.training.preflight import check_trackers, ignored_settings


def run(
    recipe: Recipe,
    *,
    recipe_path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preview: int = 2,
    estimate: bool = True,
) -> None:
    # Model, tokenizer and data are checked before anything is printed: an error (a data path's
    # typo, a bad row) is the whole output, not a line under the 50-line recipe. What needs no
    # library comes first (a model path, the data paths).
    check_trackers(recipe)
    check_optimizer(recipe)
    source = resolve_model_source(recipe.model)
    check_sources(recipe.data.train)
    check_sources(recipe.data.validation, "data.validation")
    quiet_libraries()
    tokenizer = load_tokenizer(recipe.model, source)
    config = load_model_config(recipe.model)
    # an error for learned positions (a longer row cannot run), a warning for RoPE / ALiBi
    context_warning = check_max_length(recipe.data.max_length, config)
    preference = recipe.train.method != "sft"
    if preference:
        data = prepare_preferences(recipe.data, tokenizer, seed=recipe.train.seed, method=recipe.train.method)
    else:
        data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, batch_size=recipe.train.batch_size)
    if context_warning:
        data.report.warnings.append(context_warning)
    print("recipe: valid")
    for line in marked_recipe_lines(recipe, recipe_path, overrides):
        print(line)
    print(f"model: {source.description}")
    for line in data.report.lines(full=True):
        print(line)
    for note in ignored_settings(recipe, data):
        print(f"note: {note}")
    if preview > 0 and preference:
        _preview_pairs(recipe, tokenizer, preview)
    elif preview > 0 and data.preview:  # a mix: its first examples, as they are drawn
        shown = data.preview[:preview]
        print_preview([example for example, _ in shown], [where for _, where in shown], tokenizer)
    elif preview > 0:
        _preview(recipe, data.report.format, tokenizer, preview)
    if estimate:
        # The memory model builds the model on torch's meta device (torch, peft): loaded only now,
        # so a wrong model.name or data file is said before it (1.8 s instead of 4 on our machines).
        from lora_cli.training.memory import estimate_lines, estimate_memory

        print("estimate:")
        for line in estimate_lines(estimate_memory(recipe, config)):
            print(f"  {line}")


def _preview(recipe: Recipe, fmt: str, tokenizer, count: int) -> None:
    """The first `count` rows as the loss sees them (truncated rows shown up to max_length)."""
    records, where = load_with_locations(recipe.data.train)
    cfg = dataclasses.replace(recipe.data, format=fmt, too_long="truncate")
    try:
        examples, counts = tokenize_records(records[:count], cfg, tokenizer, source="preview", where=where[:count])
        # Rows with nothing to train on give no example: label each example with its own row.
        skipped = set(counts.no_supervised_where) | set(counts.dropped_where)
        print_preview(examples, [w for w in where[:count] if w not in skipped], tokenizer)
    except DataError:  # the first rows have nothing to train on: the report above says so
        print(f"preview: the first {count} rows have no supervised tokens")


def _preview_pairs(recipe: Recipe, tokenizer, count: int) -> None:
    """The first `count` pairs as the loss sees them: the prompt masked, each answer scored."""
    records, where = load_with_locations(recipe.data.train)
    cfg = dataclasses.replace(recipe.data, too_long="truncate")
    pairs, shown = [], []
    for record, w in zip(records[:count], where[:count]):
        try:
            pairs += tokenize_pairs([record], cfg, tokenizer, source="preview", where=[w])[0]
            shown.append(w)
        except DataError:  # nothing left to score within max_length: the report above says so
            continue
    print_pair_preview(pairs, shown, tokenizer)
