"""Helpers shared by tests: small learnable datasets and recipes pointing at tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_cli.recipe.load import recipe_from_dict
from lora_cli.recipe.schema import Recipe

# A handful of fixed question/answer pairs: a tiny random model memorises them within a few
# dozen steps, so "loss goes down" and "adapter differs from base" are real signals.
PAIRS = [
    ("Define: fox", "A quick brown animal."),
    ("Define: dog", "A lazy friend."),
    ("Define: one", "The first number."),
    ("Define: ten", "Nine and one more."),
    ("Define: model", "A tiny thing that learns."),
    ("Define: paris", "The capital of France."),
    ("Define: world", "Hello to all."),
    ("Define: word", "A definition follows it."),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(repeat: int = 4) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in PAIRS
    ] * repeat


def completion_rows(repeat: int = 4) -> list[dict]:
    return [{"prompt": q + "\n", "completion": a} for q, a in PAIRS] * repeat


def tiny_recipe(model_dir: Path, train_file: Path, output_dir: Path, **sections) -> Recipe:
    """A fast recipe on a tiny model: override any section's keys with dicts in `sections`."""
    raw = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "max_length": 64},
        "train": {
            "max_steps": 40,
            "batch_size": 8,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "log_every": 5,
            "scheduler": "constant",
        },
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return recipe_from_dict(raw)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lora_in_process(monkeypatch, capsys, *args, stdin: str | None = None) -> tuple[int, str, str]:
    """The real command line, run in this process: (exit code, stdout, stderr)."""
    import io
    import sys

    from lora_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["lora", *map(str, args)])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return code, out, err


def train_tiny_run(tmp: Path, name: str, model_dir: Path, rows: list[dict], **sections) -> Path:
    """Train a tiny run on `rows` into tmp/runs/<name> and return its directory."""
    from lora_cli.commands.train import run as run_training

    data = write_jsonl(tmp / f"{name}.jsonl", rows)
    recipe = tiny_recipe(model_dir, data, tmp / "runs" / name, **sections)
    return run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root


def copy_run(run: Path, cwd: Path) -> Path:
    """A private copy of a run under cwd/runs (tests that write into the run use one), without
    what commands write there later (checkpoints aside, which no such test needs)."""
    target = cwd / "runs" / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "merged", "export"))
    return target


def without_cpu_bf16_repacking(model):
    """A plain-transformers 4-bit model computing as in training, as `lora` loads it (on
    AVX512-BF16 CPUs bitsandbytes otherwise switches to a bfloat16 kernel in eval mode)."""
    from lora_cli.model.loading import keep_4bit_weights_as_trained

    keep_4bit_weights_as_trained(model)
    return model


def assert_greedy_up_to_near_ties(model, prompt: list[int], answer: list[int], *, near_tie: float) -> None:
    """`answer`, another runtime's greedy continuation of `prompt` (llama.cpp running an exported
    file), is `model`'s own greedy choice at every step, up to near-ties: fed back through `model`,
    each token is its top choice or within `near_tie` logits of it. Two runtimes that round
    differently can part ways at a near-tie and both be right; a wrong model misses by far more."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float()
    for step, (row, token) in enumerate(zip(logits, answer)):
        gap = (row.max() - row[token]).item()
        assert gap <= near_tie, (
            f"step {step}: the runtime picked token {token}, {gap:.3f} logits below the model's top choice "
            f"{int(row.argmax())} (near-ties allowed up to {near_tie})"
        )
