"""LoRA variants through PEFT's own options (lora.init, lora.lr_ratio, use_dora, use_rslora) on
tiny real runs: each trains, its loss falls, the saved adapter on the original, unmodified base
gives the trained model's logits, and `lora merge` gives the same as the unmerged model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lora_cli.commands.merge import run as run_merge
from lora_cli.commands.train import run as run_training
from lora_cli.training.memory import estimate_memory
from tests.helpers import chat_rows, read_metrics, tiny_recipe, without_cpu_bf16_repacking, write_jsonl

FOUR_BIT = {"quantization": "4bit", "compute_dtype": "float32"}
VARIANTS = {
    "gaussian-dora": ({"init": "gaussian", "use_dora": True}, {}),
    "pissa": ({"init": "pissa"}, {}),
    "olora-rslora": ({"init": "olora", "use_rslora": True}, {}),
    "loftq": ({"init": "loftq"}, FOUR_BIT),
    "loraplus": ({"lr_ratio": 16.0}, {}),
}


def probe_ids(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "<|im_start|>user\nDefine: fox<|im_end|>\n<|im_start|>assistant\nA quick"
    return tok([prompt], return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def original_base(model_dir, model_section: dict):
    """The base as it is on disk, loaded with plain transformers (4-bit like the run where it was)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if model_section:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return without_cpu_bf16_repacking(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_merges_and_its_adapter_fits_the_original_base(variant, tiny_llama, tmp_path):
    from peft import PeftModel

    lora, model_section = VARIANTS[variant]
    weights_before = sha256(tiny_llama / "model.safetensors")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2))
    recipe = tiny_recipe(tiny_llama, data, tmp_path / "run", lora=lora, model=model_section,
                         train={"max_steps": 12, "save_every": 12, "lr": 3e-3, "log_every": 1})
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = result.paths.root

    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses

    ids = probe_ids(tiny_llama)
    trained = logits(result.model, ids)
    # The adapter as saved, on the base as it is on disk, with nothing but transformers + peft.
    base = original_base(tiny_llama, model_section)
    base_logits = logits(base, ids)
    reloaded = logits(PeftModel.from_pretrained(base, run / "adapter"), ids)
    assert (reloaded - trained).abs().max() < 1e-4
    assert (reloaded - base_logits).abs().max() > 1e-2  # it learned something to compare
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if lora.get("init") in ("pissa", "olora"):  # PEFT's conversion: ΔW = B·A - B0·A0, a plain LoRA
        assert config["r"] == 2 * recipe.lora.r and config["init_lora_weights"] is True
    on_disk = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert abs(estimate_memory(recipe).adapter_bytes / on_disk - 1) < 0.05  # lora estimate knows the size

    if "lr_ratio" in lora:  # LoRA+: PEFT's groups, the B matrices at lr x ratio (constant schedule)
        state = torch.load(run / "checkpoints" / "checkpoint-12" / "optimizer.pt", weights_only=False)
        trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
        sizes = {}  # learning rate -> how many tensors learn at it
        for group in state["param_groups"]:
            if group["params"]:
                sizes[round(group["lr"], 9)] = sizes.get(round(group["lr"], 9), 0) + len(group["params"])
        assert sizes == {3e-3: sum("lora_A" in n for n in trainable), 48e-3: sum("lora_B" in n for n in trainable)}

    merged = run_merge(run)
    assert merged.max_diff <= merged.tolerance
    from transformers import AutoModelForCausalLM

    merged_logits = logits(AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32), ids)
    # a 4-bit base merges into its dequantized weights: the same function, in float32
    assert (merged_logits - trained).abs().max() < (2e-3 if model_section else 1e-4)
    assert sha256(tiny_llama / "model.safetensors") == weights_before  # the base is never modified


def test_loftq_starts_closer_to_the_full_precision_model(tiny_llama, tmp_path):
    """What LoftQ is for: at step 0, 4-bit base + adapter is nearer the original model than the
    4-bit base alone (plain QLoRA's start)."""
    from lora_cli.model.attach import attach_lora
    from lora_cli.model.loading import load_base_model
    from lora_cli.recipe.load import recipe_from_dict

    ids = probe_ids(tiny_llama)
    reference = logits(original_base(tiny_llama, {}), ids)
    errors = {}
    for init in ("default", "loftq"):
        recipe = recipe_from_dict({"model": {"name": str(tiny_llama), "dtype": "float32", **FOUR_BIT},
                                   "lora": {"r": 16, "alpha": 32, "init": init}})
        model = attach_lora(load_base_model(recipe.model), recipe.lora, quantized=True,
                            gradient_checkpointing=False, weights_dir=tiny_llama)
        errors[init] = (logits(model, ids) - reference).pow(2).mean().item()
    assert errors["loftq"] < 0.7 * errors["default"], errors
