"""A damaged, mismatched or diverged adapter: eval, merge and generate say what is wrong with which
adapter (exit 2 for a bad adapter file, exit 1 for NaN outputs), never a library traceback, and
write nothing (eval.json stays strict JSON)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_cli.errors import EXIT_RUNTIME, EXIT_USAGE
from tests.helpers import completion_rows, copy_run, lora_in_process, train_tiny_run

lora = lora_in_process  # the CLI in-process (tests/helpers.py)
SHORT = {"max_steps": 4, "save_every": 1000, "eval_every": 1000}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama):
    tmp = tmp_path_factory.mktemp("broken-adapters")
    return {
        "gpt2": train_tiny_run(tmp, "gpt2", tiny_gpt2, completion_rows(), train=SHORT, data={"val_split": 0.25}),
        "llama": train_tiny_run(tmp, "llama", tiny_llama, completion_rows(), train=SHORT),
    }



def commands(run: Path) -> list[list]:
    return [["eval", run], ["merge", run], ["generate", "Define: fox\n", "--run", run, "--temperature", "0",
                                            "--max-new-tokens", "4"]]


def remove_weights(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()


def truncate_weights(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def corrupt_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text("{bad", encoding="utf-8")


@pytest.mark.parametrize("damage, message", [
    (remove_weights, "adapter_model.safetensors is missing"),
    (truncate_weights, "damaged or truncated"),
    (corrupt_config, "adapter_config.json is not valid JSON"),
])
def test_a_damaged_adapter_is_named_with_what_is_wrong(damage, message, runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["gpt2"], tmp_path)
    damage(run / "adapter")
    for args in commands(run):
        code, out, err = lora(monkeypatch, capsys, *args)
        assert code == EXIT_USAGE, (args[0], err)
        assert f"{run / 'adapter'}: " in err and message in err and "hint:" in err, (args[0], err)
        assert "Traceback" not in err and out == ""
    assert not (run / "eval.json").exists() and not (run / "merged").exists()


def test_an_adapter_of_another_architecture_is_refused(runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["gpt2"], tmp_path)
    shutil.rmtree(run / "adapter")
    shutil.copytree(runs["llama"] / "adapter", run / "adapter")  # Llama's q_proj, ... onto GPT-2
    for args in commands(run):
        code, out, err = lora(monkeypatch, capsys, *args)
        assert code == EXIT_USAGE, (args[0], err)
        assert "the adapter does not fit the base model" in err and "model.name" in err, (args[0], err)
        assert "Traceback" not in err and out == ""


def test_an_adapter_of_another_width_is_refused(runs, tiny_gpt2, tmp_path, monkeypatch, capsys):
    """Same architecture and layer names, another hidden size: torch's size mismatch, named."""
    import yaml
    from transformers import AutoConfig, GPT2LMHeadModel

    narrow = tmp_path / "gpt2-narrow"
    shutil.copytree(tiny_gpt2, narrow)
    config = AutoConfig.from_pretrained(tiny_gpt2)
    config.n_embd = 32
    GPT2LMHeadModel(config).save_pretrained(narrow)
    run = copy_run(runs["gpt2"], tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(narrow)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for args in commands(run):
        code, out, err = lora(monkeypatch, capsys, *args)
        assert code == EXIT_USAGE, (args[0], err)
        assert f"does not fit the base model {narrow}: size mismatch" in err and "Traceback" not in err, (args[0], err)


def diverge(adapter: Path) -> None:
    """What a run with an absurd learning rate leaves: finite but huge weights (so the merged
    weights are finite too) whose outputs overflow to inf and NaN."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name in tensors:
        if "lora_B" in name:
            tensors[name].fill_(1e30)
    save_file(tensors, weights)


def test_a_diverged_adapter_is_reported_as_such(runs, tmp_path, monkeypatch, capsys):
    run = copy_run(runs["gpt2"], tmp_path)
    before = {"loss": 1.0}
    (run / "eval.json").write_text(json.dumps(before))  # an earlier eval of the adapter
    diverge(run / "adapter")

    code, out, err = lora(monkeypatch, capsys, "eval", run)
    assert code == EXIT_RUNTIME, err
    assert "the loss of the adapter" in err and "not finite" in err and "diverged" in err and "train.lr" in err
    assert "Traceback" not in err and out == ""
    assert json.loads((run / "eval.json").read_text()) == before  # no NaN written over it

    for temperature in ("0", "0.7"):  # greedy would emit garbage, sampling died in torch.multinomial
        code, out, err = lora(monkeypatch, capsys, "generate", "Define: fox\n", "--run", run,
                              "--temperature", temperature, "--max-new-tokens", "4")
        assert code == EXIT_RUNTIME, err
        assert "the adapter's outputs are not finite" in err and "diverged" in err and "Traceback" not in err
    # The base alone is fine.
    code, out, err = lora(monkeypatch, capsys, "generate", "Define: fox\n", "--run", run, "--base",
                          "--temperature", "0", "--max-new-tokens", "4")
    assert code == 0, err

    code, out, err = lora(monkeypatch, capsys, "merge", run)
    assert code == EXIT_RUNTIME, err
    assert "are non-finite" in err and "diverged" in err and "nothing was saved" in err
    assert "matches the run's base model" not in err and "Traceback" not in err
    assert not (run / "merged").exists()


def drop_layer_one(adapter: Path) -> int:
    """Remove every tensor of the adapter's second layer; returns how many were dropped."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    kept = {k: v for k, v in tensors.items() if ".h.1." not in k}
    save_file(kept, weights)
    return len(tensors) - len(kept)


def test_an_incomplete_adapter_is_refused(runs, tmp_path, monkeypatch, capsys):
    """peft loads an adapter missing tensors with a mere warning (those layers then act as the base):
    wrong numbers with exit 0. Refused instead, saying how many are missing."""
    run = copy_run(runs["gpt2"], tmp_path)
    dropped = drop_layer_one(run / "adapter")
    assert dropped > 0
    for args in commands(run):
        code, out, err = lora(monkeypatch, capsys, *args)
        assert code == EXIT_USAGE, (args[0], err)
        expected = f"{run / 'adapter'}: the adapter is incomplete: {dropped} of its {2 * dropped} tensors are missing"
        assert expected in err, err
        assert "h.1." in err and "hint:" in err and "Traceback" not in err and out == "", (args[0], err)
    assert not (run / "eval.json").exists() and not (run / "merged").exists()


def test_an_adapter_whose_config_disagrees_with_its_weights_says_so(runs, tmp_path, monkeypatch, capsys):
    """adapter_config.json's r edited (or restored from another run): the base model is not at fault."""
    run = copy_run(runs["gpt2"], tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = config["r"] // 2
    config_path.write_text(json.dumps(config))
    for args in commands(run):
        code, out, err = lora(monkeypatch, capsys, *args)
        assert code == EXIT_USAGE, (args[0], err)
        assert "do not have the rank its adapter_config.json gives" in err and "size mismatch" in err, err
        assert "trained on another model" not in err and "Traceback" not in err and out == "", (args[0], err)
