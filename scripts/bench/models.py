"""Model directories the benchmarks build: shapes with seeded random weights, cut copies."""

from __future__ import annotations

import shutil
from pathlib import Path


def random_model(config_dir: Path, layers: int | None, work: Path, seed: int) -> Path:
    """The model of `config_dir` (a config.json and a tokenizer; cut to `layers`), its weights
    drawn with `seed`, saved under `work`: for machines without the pretrained weights (a
    borrowed GPU machine, scripts/bench/gpu_kit.py). Speed and memory depend only on the shapes."""
    out = work / f"random-{config_dir.name}-{layers or 'all'}layers"
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(config_dir)
        config.num_hidden_layers = layers or config.num_hidden_layers
        torch.manual_seed(seed)
        save_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), config_dir, out)
    return out


def save_model(model, tokenizer_dir: Path, out: Path) -> None:
    """`model` and the tokenizer of `tokenizer_dir` into `out`, whole or not at all."""
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
