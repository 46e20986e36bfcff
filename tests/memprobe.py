"""Run `lora train` on a recipe in this process and print its peak RSS above the imports (MB).

Used by tests/test_estimate.py and tests/test_lean_dropout.py in a fresh subprocess. RSS is sampled
every 2 ms by a thread during the run; the baseline is the RSS once every library is imported. (ru_maxrss is not used:
a transient spike while importing can set the high-water mark above the whole run.)
"""

import json
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main(recipe_path: str, plain_lora_dropout: bool = False) -> None:
    from lora_cli.commands.train import run as run_training
    from lora_cli.console import quiet_libraries
    from lora_cli.recipe.load import load_recipe

    quiet_libraries()
    if plain_lora_dropout:  # peft's own dropout, for tests/test_lean_dropout.py to compare
        import lora_cli.model.attach

        lora_cli.model.attach.fold_lora_dropout = lambda model: 0
    import peft  # noqa: F401  everything training imports, so the baseline includes it
    import torch
    import transformers  # noqa: F401

    torch.ones(1024, 1024) @ torch.ones(1024, 1024)  # start the threads and the allocator
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_training(load_recipe(recipe_path), recipe_path=recipe_path, resume=False, overwrite=False)
    done.set()
    thread.join()
    print(json.dumps({"peak_mb": (peak[0] - before) / 2**20, "before_mb": before / 2**20}))


if __name__ == "__main__":
    main(sys.argv[1], plain_lora_dropout="--plain-lora-dropout" in sys.argv[2:])
