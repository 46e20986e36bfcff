"""Peak RSS of `lora train RECIPE` phase by phase: loading the model, then each optimizer step.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 OMP_NUM_THREADS=2 \
        .venv/bin/python scripts/bench/memory_phases.py RECIPE [--out DIR]

A diagnostic for `lora estimate`: the estimate models the live tensors of one step, so it
should match the first step's peak; what grows after it is the allocator holding on to freed
memory. Runs the training in this process (preload the allocator `lora train` would use, as
above) into --out (default /tmp/lora-memory-phases, overwritten). RSS is sampled every 2 ms;
figures are MB above the RSS once the libraries are imported. "step N" runs from the start of
optimizer step N to the start of the next one (the last one's ends with the Trainer's own
end-of-training work); "saving" is the adapter, its model card and the loss plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--out", default="/tmp/lora-memory-phases")
    args = parser.parse_args()

    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from lora_cli.console import quiet_libraries
    from lora_cli.recipe.load import load_recipe

    quiet_libraries()
    import peft  # noqa: F401  everything training imports, so the baseline includes it
    import torch

    torch.ones(1024, 1024) @ torch.ones(1024, 1024)  # start the threads and the allocator
    baseline, phase, peaks, done = rss(), ["data"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss())
            time.sleep(0.002)

    session = lora_cli.training.session
    load_base_model = session.load_base_model

    def loading(*a, **k):
        phase[0] = "loading"
        model = load_base_model(*a, **k)
        phase[0] = "attaching LoRA"
        return model

    class PhaseTrainer(session.LoraTrainer):
        def training_step(self, *a, **k):
            phase[0] = f"step {self.state.global_step + 1}"
            return super().training_step(*a, **k)

        def train(self, *a, **k):
            result = super().train(*a, **k)
            phase[0] = "saving"  # the adapter, the model card, the loss plot
            return result

    session.load_base_model, session.LoraTrainer = loading, PhaseTrainer
    recipe = dataclasses.replace(load_recipe(args.recipe), output_dir=args.out)
    shutil.rmtree(args.out, ignore_errors=True)
    threading.Thread(target=sample, daemon=True).start()
    run_training(recipe, recipe_path=args.recipe, resume=False, overwrite=False)
    done.set()
    result = {name: round((peak - baseline) / 2**20) for name, peak in peaks.items()}
    print(json.dumps({"ld_preload": os.environ.get("LD_PRELOAD", ""), "mb_above_imports": result}))


if __name__ == "__main__":
    main()
