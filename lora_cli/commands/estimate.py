"""`lora estimate`: parameters, adapter size and memory to train (full vs LoRA vs QLoRA), from the
model config alone (training/memory.py has the model of memory and how it was measured); with
--num-processes N, the memory of each process under DDP, FSDP or ZeRO-3
(training/memory_per_process.py)."""

from __future__ import annotations

import json

from lora_cli.console import quiet_libraries
from lora_cli.errors import LoraError
from lora_cli.recipe.schema import Recipe
from lora_cli.training.memory import Estimate, estimate_lines, estimate_memory
from lora_cli.training.memory_per_process import ENGINES, per_process_lines, per_process_memory


def check_processes(num_processes: int | None, engine: str | None) -> None:
    """Bad --num-processes / --engine: said before anything is loaded (exit 2)."""
    if num_processes is not None and num_processes < 1:
        raise LoraError(
            f"--num-processes must be at least 1 (got {num_processes})",
            "Give the number of processes (GPUs) to train with, e.g. --num-processes 8.",
        )
    if engine is not None and engine not in ENGINES:
        raise LoraError(f"--engine must be one of {', '.join(ENGINES)} (got {engine!r})",
                        "ddp: every process holds the whole model; fsdp / zero3: the model is sharded.")


def run(recipe: Recipe, *, as_json: bool = False, num_processes: int | None = None,
        engine: str | None = None) -> Estimate:
    check_processes(num_processes, engine)
    quiet_libraries()
    est = estimate_memory(recipe)
    processes = num_processes or 1
    sharded = num_processes is not None or engine is not None
    engine = engine or "ddp"
    if as_json:
        data = est.to_dict()
        if sharded:
            data["per_process"] = {"num_processes": processes, "engine": engine,
                                   "memory": per_process_memory(est, processes, engine)}
        print(json.dumps(data, indent=2))
    else:
        for line in estimate_lines(est):
            print(line)
        if sharded:
            for line in per_process_lines(est, processes, engine):
                print(line)
    return est
