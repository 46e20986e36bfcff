"""Nothing we load can run code: YAML tags, pickle gadgets in checkpoints, pickle weights, remote code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.commands.train import run as run_training
from lora_cli.errors import ModelError, RunDirError
from tests.helpers import completion_rows, lora_in_process, tiny_recipe, write_jsonl


class Gadget:
    """What a malicious pickle looks like: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_yaml_python_tag_is_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'model:\n  name: !!python/object/apply:os.system ["touch {marker}"]\ndata:\n  train: x.jsonl\n')
    proc = subprocess.run(
        [sys.executable, "-m", "lora_cli", "validate", str(recipe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "line 2" in proc.stderr and "not allowed" in proc.stderr and "remove the !!tag" in proc.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_run(tiny_gpt2, tmp_path_factory):
    """A 4-step run as it is on disk when killed between its checkpoints at steps 2 and 4: what
    --resume continues from checkpoint-2 (a completed run has nothing to resume)."""
    tmp = tmp_path_factory.mktemp("safety")
    data = write_jsonl(tmp / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp / "run", train={"max_steps": 4, "save_every": 2})
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = tmp / "run"
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))
    return tmp, recipe


@pytest.mark.parametrize("victim", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_pickle_gadget_in_a_checkpoint_is_refused_and_never_runs(saved_run, victim, tmp_path):
    tmp, recipe = saved_run
    ckpt = tmp / "run" / "checkpoints" / "checkpoint-2"
    original = (ckpt / victim).read_bytes()
    marker = tmp_path / "pwned"
    torch.save({"state": Gadget(marker)}, ckpt / victim)
    try:
        with pytest.raises(RunDirError) as info:
            run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    finally:
        (ckpt / victim).write_bytes(original)
    assert not marker.exists()
    assert f"refusing to resume from {ckpt}: {victim} does not load as plain tensors" in info.value.message
    assert "weights_only=True" in info.value.hint
    # The gadget file was real: an unsafe load would have run it.
    torch.save({"state": Gadget(marker)}, tmp_path / "gadget.pt")
    torch.load(tmp_path / "gadget.pt", weights_only=False)
    assert marker.exists()


def test_the_trainer_itself_loads_checkpoints_weights_only(saved_run, tmp_path):
    """Even without our pre-check, transformers' own loader refuses the gadget (weights_only=True)."""
    import pickle

    from transformers import Trainer, TrainingArguments

    tmp, _ = saved_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tmp / "run" / "checkpoints" / "checkpoint-2", ckpt)
    marker = tmp_path / "pwned"
    torch.save({"python": Gadget(marker)}, ckpt / "rng_state.pth")
    trainer = Trainer.__new__(Trainer)  # only _load_rng_state is exercised; it reads self.args
    trainer.args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(pickle.UnpicklingError):
        trainer._load_rng_state(str(ckpt))
    assert not marker.exists()


def _model_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pickle_only_weights_need_the_opt_in(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    model = _model_copy(tiny_gpt2, tmp_path / "pickled")
    weights = model / "model.safetensors"
    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: {model}\ndata:\n  train: {data}\n  max_length: 64\n")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--dry-run")
    assert code == 2
    assert f"{model} has only pickle weights" in err and "model.allow_pickle_weights: true" in err
    # With the explicit opt-in the same directory is accepted.
    code, out, err = lora_in_process(
        monkeypatch, capsys, "train", recipe, "--dry-run", "model.allow_pickle_weights=true"
    )
    assert code == 0, err


def test_remote_code_is_refused_and_never_imported(tiny_gpt2, tmp_path, monkeypatch, capsys):
    model = _model_copy(tiny_gpt2, tmp_path / "custom")
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as info:
        from lora_cli.model.loading import load_base_model
        from lora_cli.recipe.load import recipe_from_dict

        load_base_model(recipe_from_dict({"model": {"name": str(model)}, "data": {"train": "x.jsonl"}}).model)
    assert "asks to run its own Python code (config.json auto_map: evil.py)" in info.value.message
    assert "model.trust_remote_code: true" in info.value.hint
    assert not marker.exists()
