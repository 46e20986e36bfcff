"""What a run reads before it trains, checked before anything is printed or any weight loaded:
the model source (a wrong path, a directory without config.json or weights), its config
(data.max_length past learned positions), the tokenizer, and the data (every row read, formatted
and tokenized; too_long: error applied).

`lora train` prints the resolved recipe only once these pass, so a typo in a data path or a bad
row is the whole output, on one screen, not a line under the 50-line recipe; and it is said
before the Trainer (~6 s to import) and the base model are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_cli.console import quiet_libraries
from lora_cli.data.preference import prepare_preferences
from lora_cli.data.prepare import PreparedData, prepare_data
from lora_cli.data.records import check_sources
from lora_cli.model.facts import check_model_context
from lora_cli.model.loading import load_tokenizer
from lora_cli.model.sources import ModelSource, resolve_model_source
from lora_cli.recipe.schema import Recipe
from lora_cli.training import distributed


@dataclass
class RunInputs:
    source: ModelSource
    tokenizer: Any
    data: PreparedData
    context_warning: str | None  # RoPE / ALiBi models: max_length past the trained context


def read_inputs(recipe: Recipe) -> RunInputs:
    """The model source, tokenizer and prepared data of `recipe`; a LoraError for the first problem.
    What needs no library comes first (the model directory, the data paths: a typo is said in
    half a second), then the config, the tokenizer and every row."""
    # The main process converts a GGUF file into the shared cache once; the others reuse it.
    source = distributed.main_first(lambda: resolve_model_source(recipe.model))
    check_sources(recipe.data.train)
    check_sources(recipe.data.validation, "data.validation")
    quiet_libraries()
    # data.max_length past learned positions (GPT-2): exit 2 now, not an IndexError mid-run.
    context_warning = check_model_context(recipe.model, recipe.data.max_length)
    tokenizer = load_tokenizer(recipe.model, source)
    if recipe.train.method != "sft":  # dpo / orpo: preference pairs (data/preference.py)
        data = prepare_preferences(recipe.data, tokenizer, seed=recipe.train.seed, method=recipe.train.method)
    else:
        data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, batch_size=recipe.train.batch_size)
    return RunInputs(source=source, tokenizer=tokenizer, data=data, context_warning=context_warning)
