"""The recipe schema: every shipped recipe validates; broken recipes give the promised message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli.errors import RecipeError
from lora_cli.recipe.load import load_recipe, recipe_from_dict
from lora_cli.recipe.show import dump_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_cli", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=300
    )


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.output_dir
    # Round trip: the resolved dump loads back to the same recipe.
    again = recipe_from_dict(__import__("yaml").safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"tiny-gpt2.yaml", "tiny-gpt2-qlora.yaml"} <= names


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora:\n  r: 4\ntrain:\n  lr: 1e-4\n")
    recipe = load_recipe(
        path, ["train.lr=3e-4", "lora.r=8", "data.packing=true", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert recipe.lora.r == 8
    assert recipe.train.lr == pytest.approx(3e-4)  # `3e-4` is a string to PyYAML; still a number here
    assert recipe.data.packing is True
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.output_dir == "runs/r"  # default: runs/<recipe stem>
    assert recipe.train.batch_size == 4  # untouched default


# (recipe text, overrides, fragments the message must contain)
BROKEN = [
    ("lora:\n  r: 0\n", [], ["line 2", "'lora.r' must be ≥ 1, got 0"]),
    ("lora:\n  r: -3\n", [], ["'lora.r' must be ≥ 1"]),
    ("lora:\n  r: eight\n", [], ["line 2", "'lora.r' must be an integer, got 'eight'"]),
    ("lora:\n  alpah: 16\n", [], ["line 2", "unknown key 'lora.alpah'", "did you mean 'alpha'"]),
    ("trian:\n  lr: 1\n", [], ["line 1", "unknown key 'trian'", "did you mean 'train'"]),
    ("train:\n  lr: 0\n", [], ["'train.lr' must be > 0"]),
    ("train:\n  lr: -1e-4\n", [], ["'train.lr' must be > 0"]),
    ("train:\n  lr: fast\n", [], ["'train.lr' must be a number, got 'fast'"]),
    ("lora:\n  dropout: 1.0\n", [], ["'lora.dropout' must be ≥ 0 and < 1"]),
    ("lora:\n  dropout: -0.1\n", [], ["'lora.dropout' must be ≥ 0 and < 1"]),
    ("data:\n  val_split: 1.5\n", [], ["'data.val_split' must be ≥ 0 and < 1"]),
    (
        "data:\n  format: sharegpt\n",
        [],
        ["'data.format' must be one of 'auto', 'text', 'completion', 'alpaca', 'chat'"],
    ),
    ("data:\n  too_long: wrap\n", [], ["'data.too_long' must be one of 'truncate', 'drop', 'error'"]),
    ("data:\n  max_length: 1\n", [], ["'data.max_length' must be ≥ 2"]),
    ("data:\n  packing: yes please\n", [], ["'data.packing' must be true or false"]),
    ("model:\n  quantization: 3bit\n", [], ["'model.quantization' must be one of 'none', '8bit', '4bit'"]),
    ("model:\n  quant_type: fp4\n", [], ["model.quant_type=fp4 needs model.quantization: 4bit"]),
    ("model:\n  dtype: fp8\n", [], ["'model.dtype' must be one of"]),
    ("model:\n  trust_remote_code: 1\n", [], ["'model.trust_remote_code' must be true or false"]),
    ("model: gpt2\n", [], ["'model' must be a section"]),
    ("train:\n  batch_size: 2.5\n", [], ["'train.batch_size' must be an integer"]),
    ("train:\n  scheduler: exponential\n", [], ["'train.scheduler' must be one of"]),
    ("train:\n  report_to: [neptune]\n", [], ["'train.report_to' must be a list of one of"]),
    ("data:\n  validation: v.jsonl\n  val_split: 0.1\n", [], ["data.validation and data.val_split are both set"]),
    ("lora:\n  target_modules: []\n", [], ["'lora.target_modules' is an empty list"]),
    ("- just\n- a list\n", [], ["the recipe must be a mapping"]),
    ("lora:\n  r: [1\n", [], ["malformed YAML", "line"]),
    ("lora:\n\tr: 8\n", [], ["malformed YAML", "line 2"]),
    ("model: !!python/object/apply:os.system ['echo pwned']\n", [], ["line 1", "not allowed"]),
    ("lora:\n  r: 8\n", ["train.lr"], ["override 'train.lr' is not of the form key.path=value"]),
    ("lora:\n  r: 8\n", ["train.lrr=1e-4"], ["unknown key 'train.lrr'", "did you mean 'lr'"]),
    ("lora:\n  r: 8\n", ["lora.r=0"], ["'lora.r' must be ≥ 1, got 0"]),
    ("lora:\n  r: 8\n", ["lora.r.x=1"], ["override 'lora.r.x=1': 'r' is not a section"]),
    # nan compares false with every bound, so it needs its own check; inf is no learning rate either
    ("train:\n  lr: .nan\n", [], ["line 2: 'train.lr' must be a finite number"]),
    ("lora:\n  r: 8\n", ["train.lr=.inf"], ["'train.lr' must be a finite number"]),
    ("lora:\n  r: 8\n", ["lora.dropout=nan"], ["'lora.dropout' must be a finite number"]),
    ("lora:\n  r: 8\n", ["data.val_split=nan"], ["'data.val_split' must be a finite number"]),
    ("lora:\n  r: 8\n", ["train.epochs=.inf"], ["'train.epochs' must be a finite number"]),
    ("train:\n  seed: -1\n", [], ["'train.seed' must be ≥ 0 and ≤ 4294967295, got -1"]),
    ("train:\n  seed: 99999999999\n", [], ["'train.seed' must be ≥ 0 and ≤ 4294967295"]),
    # a bad value from the command line is not blamed on the file's line it replaced
    ("lora:\n  r: 8\n", ["lora.r=abc"], ["command line: 'lora.r' must be an integer, got 'abc'"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BROKEN, ids=[f"case{i}" for i in range(len(BROKEN))])
def test_broken_recipe_message(tmp_path, text, overrides, fragments):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = info.value.message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("lora:\n  r: 0\n  alpah: 1\ntrain:\n  lr: -1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert len(info.value.problems) == 3


def test_malicious_yaml_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert not marker.exists()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text,overrides,fragments",
    [BROKEN[0], BROKEN[3], BROKEN[26], BROKEN[28], BROKEN[30]],
    ids=["range", "unknown-key", "malformed", "python-tag", "override"],
)
def test_cli_reports_recipe_errors_without_traceback(tmp_path, text, overrides, fragments):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = run_cli("train", str(path), *overrides)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_missing_recipe_file(tmp_path):
    result = run_cli("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: the recipe file does not exist" in result.stderr
