"""`model.dtype: auto`: bfloat16 on a CPU that computes it natively, float32 elsewhere; a run
keeps the dtypes it started with, and merge / eval / generate use them on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lora_cli.model.dtypes
import lora_cli.run.recipes
from lora_cli.model.dtypes import pin_dtypes, resolve_dtype
from lora_cli.recipe.schema import ModelConfig
from lora_cli.run.record import parse_record
from tests.helpers import chat_rows, read_metrics, train_tiny_run


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.skipif(not _cpu_flags(), reason="needs /proc/cpuinfo (Linux x86)")
def test_the_bfloat16_probe_agrees_with_the_cpu_flags():
    flags = _cpu_flags()
    assert lora_cli.model.dtypes.cpu_has_native_bfloat16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_only_on_a_cpu_that_computes_it(cpu_only, native):
    cpu_only.setattr(lora_cli.model.dtypes, "cpu_has_native_bfloat16", lambda: native)
    assert resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    assert pin_dtypes(ModelConfig()).dtype == ("bfloat16" if native else "float32")


def test_recorded_dtypes_win_over_the_machine_and_lose_to_the_recipe(cpu_only):
    cpu_only.setattr(lora_cli.model.dtypes, "cpu_has_native_bfloat16", lambda: False)
    recorded = {"dtype": "bfloat16", "compute_dtype": "bfloat16"}
    pinned = pin_dtypes(ModelConfig(quantization="4bit"), recorded)
    assert (pinned.dtype, pinned.compute_dtype) == ("bfloat16", "bfloat16")
    pinned = pin_dtypes(ModelConfig(quantization="4bit", compute_dtype="float32"), recorded)
    assert (pinned.dtype, pinned.compute_dtype) == ("bfloat16", "float32")
    pinned = pin_dtypes(ModelConfig(dtype="float16"), recorded)  # the recipe names one: it stands
    assert (pinned.dtype, pinned.compute_dtype) == ("float16", "float16")
    assert pin_dtypes(ModelConfig(), {}).dtype == "float32"  # nothing recorded: this machine's


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_llama):
    """A run trained with `dtype: auto` where auto means bfloat16 (as on an AVX512-BF16 CPU)."""
    tmp = tmp_path_factory.mktemp("bf16-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_cli.model.dtypes, "cpu_has_native_bfloat16", lambda: True)
        patch.setattr(torch.cuda, "is_available", lambda: False)
        run = train_tiny_run(
            tmp,
            "llama-bf16",
            tiny_llama,
            chat_rows(),
            model={"dtype": "auto"},
            lora={"dropout": 0.1},
            data={"val_split": 0.25},
            train={"max_steps": 30, "save_every": 1000},
        )
    return run


@pytest.fixture
def machine_without_bfloat16(cpu_only):
    """Everything after training runs where auto would mean float32."""
    cpu_only.setattr(lora_cli.model.dtypes, "cpu_has_native_bfloat16", lambda: False)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def _probe(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(
        ["Define: fox\nA quick brown animal. Define: paris"], return_tensors="pt"
    ).input_ids


def test_a_bfloat16_run_records_its_dtype_and_learns(bf16_run):
    run_json = json.loads((bf16_run / "run.json").read_text())
    assert run_json["model"]["dtype"] == "bfloat16"
    assert "dtype: auto" in (bf16_run / "recipe.yaml").read_text()  # the recipe stays as written
    assert "- dtype bfloat16" in (bf16_run / "adapter" / "README.md").read_text()  # the model card says which
    losses = [m["loss"] for m in read_metrics(bf16_run) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    from safetensors.torch import load_file

    adapter = load_file(bf16_run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # LoRA weights train in float32


def test_generate_loads_the_base_in_the_dtype_the_run_trained_in(bf16_run, machine_without_bfloat16):
    from lora_cli.inference.generation import load_generator

    model = load_generator(bf16_run, None).model
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}


def test_merge_of_a_bfloat16_run_equals_base_plus_adapter(bf16_run, tiny_llama, tmp_path, machine_without_bfloat16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_cli.commands.merge import run as run_merge

    result = run_merge(bf16_run, output=tmp_path / "merged")
    assert result.dtype == "bfloat16"  # the run's dtype, not this machine's float32
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=None)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}

    # base + adapter with plain transformers + peft: as it trained (bfloat16 base, float32
    # adapter) and exactly (float32 throughout)
    def unmerged(dtype):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
        return PeftModel.from_pretrained(base, str(bf16_run / "adapter"))

    ids = _probe(tiny_llama)
    exact, as_trained, ours = (
        _logits(unmerged(torch.float32), ids),
        _logits(unmerged(torch.bfloat16), ids),
        _logits(merged, ids),
    )
    merged_error, unmerged_error = (ours - exact).abs().max().item(), (as_trained - exact).abs().max().item()
    print(
        f"max logit error vs float32 base + adapter: merged bfloat16 {merged_error:.3g}, "
        f"unmerged bfloat16 {unmerged_error:.3g} (logit scale {exact.abs().max().item():.3g})"
    )
    # merging adds no error beyond bfloat16's own rounding: merged is unmerged, in bfloat16
    assert merged_error <= 1.5 * unmerged_error, (merged_error, unmerged_error)
    assert (ours - as_trained).abs().max().item() <= result.tolerance
    # and the adapter is really in there: the merged model is not the base
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), ids)
    assert (base - exact).abs().max().item() > 5 * merged_error


def test_eval_of_a_bfloat16_run_matches_a_float32_evaluation(bf16_run, machine_without_bfloat16, monkeypatch):
    """Base and adapter losses in the run's bfloat16 are those of a float32 evaluation of the
    same adapter within bfloat16's rounding; the adapter beats the base on what it learned."""
    from lora_cli.commands.eval import run as run_eval

    bf16 = run_eval(bf16_run, as_json=True)
    recorded = json.loads((bf16_run / "run.json").read_text())
    monkeypatch.setattr(
        lora_cli.run.recipes, "read_record", lambda paths: parse_record({**recorded, "model": {"dtype": "float32"}})
    )
    fp32 = run_eval(bf16_run, as_json=True)
    print({side: (bf16[side]["loss"], fp32[side]["loss"]) for side in ("base", "adapter")})
    assert bf16["adapter"]["loss"] < 0.8 * bf16["base"]["loss"]
    assert bf16["adapter"]["loss"] != fp32["adapter"]["loss"]  # two evaluations, two dtypes
    for side in ("base", "adapter"):
        assert bf16[side]["loss"] == pytest.approx(fp32[side]["loss"], rel=0.02), side
