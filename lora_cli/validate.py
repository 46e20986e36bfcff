"""`lora validate` / `lora train --dry-run`: check the recipe and report on the data, train nothing."""

from __future__ import annotations

from lora_cli.config import Recipe, dump_recipe


def run_validate(recipe: Recipe) -> None:
    from lora_cli.data import prepare_data
    from lora_cli.model import load_tokenizer, resolve_model_source
    from lora_cli.train import quiet_libraries

    quiet_libraries()
    print("recipe: valid")
    print(dump_recipe(recipe).rstrip())
    source = resolve_model_source(recipe.model)
    print(f"model: {source.description}")
    tokenizer = load_tokenizer(recipe.model, source)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed)
    for line in data.report.lines():
        print(line)
