"""A diverging run stops with exit-1 semantics, names the step and learning rate, and saves no bad weights."""

from __future__ import annotations

import json

import pytest

from lora_cli.errors import TrainingError
from lora_cli.train import run_training
from tests.helpers import completion_rows, tiny_recipe, write_jsonl


def test_nonfinite_loss_stops_the_run(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    # A learning rate this absurd blows the weights up within a few steps.
    recipe = tiny_recipe(
        tiny_gpt2, data, tmp_path / "run",
        train={"lr": 1e6, "max_steps": 60, "max_nonfinite_steps": 2, "max_grad_norm": 0.0},
    )
    with pytest.raises(TrainingError) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert info.value.exit_code == 1
    assert "steps in a row" in info.value.message and "learning rate" in info.value.message
    assert "train.lr" in info.value.hint
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed"
    assert not (tmp_path / "run" / "adapter").exists()  # never save the broken weights
