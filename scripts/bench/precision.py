"""CPU training step: float32 against bfloat16 autocast, bfloat16 weights and torch.compile.

    .venv/bin/python scripts/bench/precision.py [--steps 10] [--repeats 2] [--candidates ...]

Why it exists: the issue lists bf16 autocast and torch.compile as ways that may pay, to be
chosen by measurement. `lora train` computes in float32 on a CPU (model.dtype auto); this
measures what the alternatives give on this machine (model.dtype auto is bfloat16 on a CPU with
AVX512-BF16 or AMX since it measured faster here, float32 elsewhere). It also measures raw matmul
throughput per dtype, so the training figures can be read against what the CPU can do.

Each candidate runs in its own fresh subprocess, interleaved and repeated: SmolLM2-135M (the
embedded model, converted copy in the cache), LoRA r16 all-linear (peft keeps the adapter in
float32), AdamW, 4 x 160 tokens of the quickstart's Devil's Dictionary rows per step, the same
batches in the same order, 2 threads. Candidates:

    fp32            float32 weights and compute (`lora train` on a CPU without bf16 instructions)
    autocast-bf16   float32 weights, matmuls in bfloat16 under torch.autocast (HF Trainer bf16=True)
    bf16-weights    base weights stored in bfloat16 (model.dtype: bfloat16), under the same autocast
    compile         float32, the model wrapped in torch.compile (inductor; first steps compile)

Reports steady-state tokens/s (after the warm-up steps), the time to the end of the warm-up,
peak RSS, and the train loss of each step next to float32's (same batches): a precision that
is faster but learns differently is not a free win. Writes build/bench/precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
OUT = ROOT / "build" / "bench" / "precision.json"
CANDIDATES = ("fp32", "autocast-bf16", "bf16-weights", "compile")
BATCH, LENGTH = 4, 160


def batches(tokenizer, steps: int) -> list[dict]:
    import torch

    rows = []
    for line in (ROOT / "data" / "devils-dictionary" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append(messages[0]["content"] + "\n" + messages[1]["content"] + tokenizer.eos_token)
    stream = tokenizer("".join(rows))["input_ids"]  # packed: every position is a real token
    out = []
    for step in range(steps):
        start = step * BATCH * LENGTH
        ids = torch.tensor(stream[start : start + BATCH * LENGTH]).view(BATCH, LENGTH)
        out.append({"input_ids": ids, "labels": ids})
    return out


def worker(candidate: str, steps: int, warmup: int) -> None:
    launched = time.perf_counter()
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_cli.model.sources import resolve_model_source
    from lora_cli.recipe.schema import ModelConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    source = resolve_model_source(ModelConfig(name="smollm2-135m-instruct"))
    dtype = torch.bfloat16 if candidate == "bf16-weights" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = batches(AutoTokenizer.from_pretrained(source.location), steps)
    forward = torch.compile(model) if candidate == "compile" else model
    autocast = candidate in ("autocast-bf16", "bf16-weights")
    times, losses = [], []
    warm_at = None
    for step, batch in enumerate(data):
        start = time.perf_counter()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step + 1 == warmup:
            warm_at = time.perf_counter() - launched
    steady = times[warmup:]
    print(json.dumps({
        "tokens_per_s": BATCH * LENGTH * len(steady) / sum(steady),
        "warm_s": warm_at,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KiB
        "losses": losses,
    }))


def worker_matmul() -> None:
    """GFLOP/s of one matmul per dtype, 2 threads: a square 1024 product, and the shape of
    SmolLM2-135M's MLP up-projection on a 4 x 160-token batch (640 x 576 @ 576 x 1536)."""
    import torch
    from matmul import best_matmul_flops

    torch.set_num_threads(2)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for label, shape in {"square": (1024, 1024, 1024), "mlp": (640, 576, 1536)}.items():
            flops = best_matmul_flops(*shape, dtype=dtype)
            out[f"{str(dtype).removeprefix('torch.')}_{label}_gflops"] = round(flops / 1e9, 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "matmul":
        worker_matmul()
        return
    if args.worker:
        worker(args.worker, args.steps, args.warmup)
        return

    candidates = args.candidates.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--worker", "matmul"], capture_output=True, text=True, env=env,
                          check=True)
    matmul = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "matmul GFLOP/s, 2 threads: " + ", ".join(f"{k.removesuffix('_gflops')} {v}" for k, v in matmul.items()),
        flush=True,
    )
    results: dict[str, list[dict]] = {c: [] for c in candidates}
    for repeat in range(args.repeats):
        for candidate in candidates:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    candidate,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0:
                print(f"{candidate} #{repeat + 1} failed:\n{done.stderr[-3000:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[candidate].append(result)
            print(
                f"{candidate} #{repeat + 1}: {result['tokens_per_s']:.0f} tok/s, warm after {result['warm_s']:.1f} s, "
                f"{result['peak_rss_gb']:.2f} GB"
            )

    reference = results.get("fp32") or []
    base_speed = statistics.median(r["tokens_per_s"] for r in reference) if reference else None
    base_losses = reference[0]["losses"] if reference else None
    summary = {}
    print(
        f"\nSmolLM2-135M, LoRA r16, {BATCH} x {LENGTH} tokens per step, 2 threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'candidate':<15} {'tok/s':>7} {'x fp32':>7} {'warm s':>7} {'RSS GB':>7} {'max |loss - fp32|':>18}")
    for candidate, runs in results.items():
        if not runs:
            continue
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        loss_gap = max(abs(a - b) for a, b in zip(runs[0]["losses"], base_losses)) if base_losses else None
        summary[candidate] = {
            "tokens_per_s": speed,
            "x_fp32": speed / base_speed if base_speed else None,
            "warm_s": statistics.median(r["warm_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "max_loss_gap": loss_gap,
            "losses": runs[0]["losses"],
        }
        s = summary[candidate]
        print(
            f"{candidate:<15} {speed:>7.0f} {s['x_fp32'] or 0:>7.2f} {s['warm_s']:>7.1f} {s['peak_rss_gb']:>7.2f} "
            f"{loss_gap if loss_gap is not None else float('nan'):>18.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"cpu": platform.processor() or platform.machine(), "threads": 2},
                "matmul": matmul,
                "steps": args.steps,
                "warmup": args.warmup,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
