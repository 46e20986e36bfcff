"""Training-step speed and peak memory with the system allocator vs tcmalloc (lora_cli/allocator.py).

    .venv/bin/python scripts/bench/allocator.py [--steps 8] [--repeats 2]

Each candidate runs in its own fresh subprocess (an allocator must be preloaded at start-up),
interleaved and repeated: SmolLM2-135M (the embedded model, converted copy in the cache),
LoRA r16 all-linear, fp32, 4 x 160 tokens per optimizer step, 2 threads. Reports steady-state
tokens/s (the first 2 steps are warm-up) and the peak RSS of the process, as ratios to glibc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def worker(steps: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cli.model.sources import resolve_model_source
    from lora_cli.recipe.schema import ModelConfig

    torch.set_num_threads(2)
    source = resolve_model_source(ModelConfig(name="smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 160))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    steady = times[2:] or times
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens_per_s": ids.numel() * len(steady) / sum(steady), "peak_rss_gb": rss_kb * 1024 / 1e9}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps)
        return

    from lora_cli.allocator import find_tcmalloc

    tcmalloc = find_tcmalloc()
    candidates = {"glibc": ""}
    if tcmalloc:
        candidates["tcmalloc"] = tcmalloc
    else:
        print("tcmalloc not found: only the system allocator is measured", file=sys.stderr)
    results: dict[str, list[dict]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, preload in candidates.items():
            env = {**os.environ, "LD_PRELOAD": preload, "OMP_NUM_THREADS": "2"}
            out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results["glibc"]
    base_tps = sum(r["tokens_per_s"] for r in base) / len(base)
    base_rss = max(r["peak_rss_gb"] for r in base)
    print(
        f"{'allocator':10} {'tokens/s':>9} {'ratio':>6} {'peak RSS GB':>12} {'ratio':>6}   "
        f"(machine: {os.cpu_count()} cores)"
    )
    for name, runs in results.items():
        tps = sum(r["tokens_per_s"] for r in runs) / len(runs)
        rss = max(r["peak_rss_gb"] for r in runs)
        print(f"{name:10} {tps:9.1f} {tps / base_tps:6.2f} {rss:12.2f} {rss / base_rss:6.2f}")


if __name__ == "__main__":
    main()
