"""`lora train` end to end on tiny real models: LoRA and QLoRA, GPT-2 and Llama."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.errors import RunDirError
from lora_cli.train import run_training
from tests.helpers import chat_rows, completion_rows, read_metrics, tiny_recipe, without_cpu_bf16_repacking, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    return tok(["Define: fox\nA quick brown animal.", "Define: paris\nThe capital"], return_tensors="pt", padding=True).input_ids


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_train_learns_saves_and_reloads(arch, quantization, request, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    weights = model_dir / "model.safetensors"
    before = sha256(weights)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows() if arch == "gpt2" else chat_rows())
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", model={"quantization": quantization})

    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = result.paths.root

    # Loss goes down clearly on a learnable dataset.
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < 0.6 * losses[0], losses

    # The run directory holds exactly what the contract says.
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl", "recipe.yaml", "run.json"]
    adapter_files = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= adapter_files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in adapter_files)
    assert list((run / "checkpoints").glob("checkpoint-*/adapter_model.safetensors"))
    assert not list((run / "checkpoints").rglob("*.bin")), "no pickled TrainingArguments in checkpoints"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed"
    assert status["final"]["global_step"] == 40
    for line in read_metrics(run):
        assert "step" in line and ("loss" in line and "learning_rate" in line or "eval_loss" in line)

    # The adapter loads with nothing but transformers + peft and reproduces the trained logits.
    ids = probe_ids(model_dir)
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    kwargs = {}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
    elif quantization == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = without_cpu_bf16_repacking(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        # The adapter changed the model...
        assert (got - base_logits).abs().max() > 1e-2
        # ...and the base is never modified: adapter off gives the original logits back.
        with reloaded.disable_adapter():
            assert torch.allclose(reloaded(input_ids=ids).logits, base_logits, atol=1e-6)
    assert sha256(weights) == before


def test_existing_run_is_never_overwritten_silently(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    first = (tmp_path / "run" / "run.json").read_text()
    with pytest.raises(RunDirError, match="already exists") as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert "--resume" in info.value.hint and "--overwrite" in info.value.hint
    assert (tmp_path / "run" / "run.json").read_text() == first  # untouched
    run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["created_at_unix"] != json.loads(first)["created_at_unix"]


def test_cli_train_with_overrides(tiny_llama, tmp_path):
    """The real command line: recipe file + dotted overrides, exit code 0, the adapter written."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  name: {tiny_llama}\nlora:\n  r: 4\ndata:\n  train: {data}\n  max_length: 64\n"
        "train:\n  max_steps: 3\n  batch_size: 4\n"
    )
    argv = [sys.executable, "-m", "lora_cli", "train", str(recipe), "lora.r=2", "train.lr=1e-3", "data.packing=true"]
    env = {**os.environ, "LORA_ALLOCATOR": "system"}  # one process: no re-launch under tcmalloc
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        pid = subprocess.Popen(argv, stdout=out, stderr=err, cwd=tmp_path, env=env).pid
        _, status, usage = os.wait4(pid, 0)  # also gives the child's peak RSS, as the kernel counted it
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, stderr + stdout
    run = tmp_path / "runs" / "recipe"  # default output_dir: runs/<recipe stem>

    # The memory it reached is printed and recorded beside the estimate printed before training.
    memory = json.loads((run / "run.json").read_text())["memory"]
    peak_seen_by_parent = usage.ru_maxrss * 1024
    assert 0.8 * peak_seen_by_parent <= memory["process_peak_rss_bytes"] <= peak_seen_by_parent
    estimate = subprocess.run([sys.executable, "-m", "lora_cli", "estimate", str(run / "recipe.yaml"), "--json"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert memory["estimate_bytes"] == json.loads(estimate.stdout)["memory"]["lora"]["total"]
    from lora_cli.estimate import human_bytes

    peak, estimated = human_bytes(memory["process_peak_rss_bytes"]), human_bytes(memory["estimate_bytes"])
    assert f"peak memory: {peak} (the whole process; estimate {estimated} plus the libraries)" in stdout
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2
    saved = (run / "recipe.yaml").read_text()
    assert "r: 2" in saved and "lr: 0.001" in saved and "packing: true" in saved
    # A second run into the same directory is refused with the promised message.
    again = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", str(recipe)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.skipif(__import__("lora_cli.allocator", fromlist=["x"]).find_tcmalloc() is None, reason="tcmalloc not installed")
@pytest.mark.parametrize("setting,expected", [(None, "tcmalloc"), ("system", "system")])
def test_cli_uses_tcmalloc_when_installed(tiny_gpt2, tmp_path, setting, expected):
    import os

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows(repeat=1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name: {tiny_gpt2}\ndata:\n  train: {data}\ntrain:\n  max_steps: 1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_ALLOCATOR", "LD_PRELOAD")}
    if setting:
        env["LORA_ALLOCATOR"] = setting
    result = subprocess.run([sys.executable, "-m", "lora_cli", "train", str(recipe)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "runs" / "r" / "run.json").read_text())["allocator"] == expected
