"""`lora estimate`: parameters, adapter size and memory to train (full vs LoRA vs QLoRA), from the
model config alone (training/memory.py has the model of memory and how it was measured)."""

from __future__ import annotations

import json

from lora_cli.console import quiet_libraries
from lora_cli.recipe.schema import Recipe
from lora_cli.training.memory import Estimate, estimate_lines, estimate_memory


def run(recipe: Recipe, *, as_json: bool = False) -> Estimate:
    quiet_libraries()
    est = estimate_memory(recipe)
    if as_json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        for line in estimate_lines(est):
            print(line)
    return est
