"""What LoRA attaches to: names as users write them, and misspelt names caught, not ignored."""

from __future__ import annotations

import pytest

from lora_cli.errors import ModelError
from lora_cli.model.attach import attach_lora
from lora_cli.model.loading import load_base_model
from lora_cli.model.sources import resolve_model_source
from lora_cli.recipe.schema import LoraSection
from tests.helpers import tiny_recipe


def _base(model_dir, tmp_path):
    recipe = tiny_recipe(model_dir, tmp_path / "unused.jsonl", tmp_path / "run")
    return load_base_model(recipe.model, resolve_model_source(recipe.model))


def _adapted(peft_model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}


def test_one_module_name_as_a_string_means_that_module(tiny_gpt2, tmp_path):
    # PEFT would read "c_attn" as a regex over full paths and match nothing.
    one = attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(target_modules="c_attn"), quantized=False,
                      gradient_checkpointing=False)
    assert _adapted(one) == {"c_attn"}
    listed = attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(target_modules=["c_attn"]), quantized=False,
                         gradient_checkpointing=False)
    assert one.get_nb_trainable_parameters() == listed.get_nb_trainable_parameters()
    # A regular expression is still one.
    regex = attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(target_modules=r".*\.h\.0\.attn\.c_attn"),
                        quantized=False, gradient_checkpointing=False)
    assert sum(hasattr(m, "lora_A") for m in regex.modules()) == 1


def test_a_misspelt_module_to_save_is_an_error(tiny_gpt2, tmp_path):
    with pytest.raises(ModelError, match="lora.modules_to_save: lm_haed not found") as info:
        attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(modules_to_save=["lm_haed"]), quantized=False,
                    gradient_checkpointing=False)
    assert "lm_head" in info.value.hint
    saved = attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(modules_to_save=["lm_head"]), quantized=False,
                        gradient_checkpointing=False)
    plain = attach_lora(_base(tiny_gpt2, tmp_path), LoraSection(), quantized=False, gradient_checkpointing=False)
    assert saved.get_nb_trainable_parameters()[0] > plain.get_nb_trainable_parameters()[0]


def test_estimate_and_validate_catch_a_misspelt_module_to_save_too(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from tests.helpers import completion_rows, lora_in_process, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}, max_length: 64}}\nlora: {{modules_to_save: [lm_haed]}}\n"
    )
    for command in ("estimate", "validate"):
        code, out, err = lora_in_process(monkeypatch, capsys, command, recipe)
        assert code == 2 and "lora.modules_to_save: lm_haed not found" in err, (command, err)
