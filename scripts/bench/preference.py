"""The DPO profile of scripts/bench/training.py: `lora train` with train.method dpo against the
tutorial baseline for preference tuning, on the same pairs, in one run.

    .venv/bin/python scripts/bench/training.py --profiles dpo [--repeats 3]
    .venv/bin/python scripts/bench/preference.py [--repeats 3] [--steps 8]     (this profile alone)

Candidates, each in its own fresh subprocess, interleaved and repeated, 2 threads, same seed,
same settings (LoRA r 16 / alpha 32 on all linear layers, dropout off, batch 4 pairs, lr 5e-4,
beta 0.1, max_length 160, float32, no gradient checkpointing):

    trl     the tutorial script: AutoModelForCausalLM + get_peft_model(LoraConfig) + trl.DPOTrainer
            (DPOConfig), the pairs given as TRL's conversational {prompt, chosen, rejected}
    ours    `lora train` with the equivalent recipe (train.method: dpo)

Model: SmolLM2-135M-Instruct cut to its first 6 layers (as the flan/long profiles; real weights
and tokenizer). Pairs: data/devils-dpo/train.jsonl (scripts/make_preference_data.py). Per
candidate: tokens/s over the training loop (non-pad tokens of chosen and rejected rows, as both
trainers count them: TRL's num_tokens, our metrics.jsonl `tokens`), seconds per step, peak RSS of
the process (wait4), final loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import training  # noqa: E402  (the bench's shared helpers: model_for, run_child, WORK)

PAIRS = ROOT / "data" / "devils-dpo" / "train.jsonl"
SETTINGS = {"r": 16, "alpha": 32, "batch": 4, "lr": 5e-4, "beta": 0.1, "max_length": 160, "seed": 0}


def worker_trl(spec: dict) -> None:
    """The tutorial: TRL's DPOTrainer on a get_peft_model model, nothing else."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SETTINGS["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text(encoding="utf-8").splitlines()]
    args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=SETTINGS["batch"], max_steps=spec["steps"],
                     learning_rate=SETTINGS["lr"], beta=SETTINGS["beta"], max_length=SETTINGS["max_length"],
                     gradient_checkpointing=False, bf16=False, logging_steps=1, save_strategy="no",
                     report_to="none", seed=SETTINGS["seed"], lr_scheduler_type="constant", disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"tokens": logs[-1]["num_tokens"], "seconds": seconds, "steps": trainer.state.global_step,
                      "final_loss": logs[-1]["loss"]}))


def ours(spec: dict, env: dict, log: Path) -> dict:
    out = Path(spec["out"])
    recipe = {
        "model": {"name": spec["model"], "dtype": "float32"},
        "lora": {"r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": spec["pairs"], "max_length": SETTINGS["max_length"]},
        "train": {"method": "dpo", "beta": SETTINGS["beta"], "max_steps": spec["steps"],
                  "batch_size": SETTINGS["batch"], "lr": SETTINGS["lr"], "scheduler": "constant",
                  "warmup_ratio": 0.0, "log_every": 1, "seed": SETTINGS["seed"]},
        "output_dir": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    _, rss, _ = training.run_child([*training.lora_command(), "train", str(path), "--overwrite"], env, log)
    record = json.loads((out / "run.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m]
    return {"tokens": train[-1]["tokens"], "seconds": record["timings"]["train_seconds"],
            "steps": record["final"]["global_step"], "final_loss": train[-1]["loss"], "peak_rss_gb": rss}


def dpo_profile(repeats: int, env: dict, steps: int = 8) -> dict:
    if not PAIRS.is_file():
        raise SystemExit(f"{PAIRS} is missing: run scripts/make_preference_data.py first")
    model = training.model_for("flan")  # SmolLM2-135M cut to 6 layers
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for i in range(repeats):
        for name in runs:
            spec = {"model": str(model), "pairs": str(PAIRS), "steps": steps,
                    "out": str(training.WORK / "runs" / f"dpo-{name}-{i}")}
            log = training.WORK / "runs" / f"dpo-{name}-{i}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            if name == "trl":
                result, rss, _ = training.run_child([sys.executable, __file__, "--worker", json.dumps(spec)], env, log)
                result["peak_rss_gb"] = rss
            else:
                result = ours(spec, env, log)
            result["tokens_per_s"] = result["tokens"] / result["seconds"]
            runs[name].append(result)
            print(f"  dpo {name} #{i + 1}: {result['tokens_per_s']:.1f} tok/s, {result['seconds'] / steps:.2f} s/step, "
                  f"{result['peak_rss_gb']:.2f} GB, final loss {result['final_loss']:.4f}", flush=True)
    summary = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
                      "final_loss": statistics.median(r["final_loss"] for r in rs)} for name, rs in runs.items()}
    base = summary["trl"]
    print("\n== dpo ==  (medians of the repeats; peak memory: max)")
    for name, s in summary.items():
        print(f"  {name:<5} {s['tokens_per_s']:8.1f} tok/s ({s['tokens_per_s'] / base['tokens_per_s']:.2f}x)  "
              f"peak RSS {s['peak_rss_gb']:.2f} GB ({s['peak_rss_gb'] / base['peak_rss_gb']:.2f}x)  "
              f"final loss {s['final_loss']:.4f}")
    return {"settings": {**SETTINGS, "steps": steps, "model": str(model), "pairs": str(PAIRS)},
            "summary": summary, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=training.WORK / "preference.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_trl(json.loads(args.worker))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(training.THREADS), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONWARNINGS": "ignore"}
    report = dpo_profile(args.repeats, env, args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
