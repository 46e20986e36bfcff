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

from lora_cli.commands.train import run as run_training
from lora_cli.errors import RunDirError
from tests.helpers import chat_rows, completion_rows, read_metrics, tiny_recipe, without_cpu_bf16_repacking, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    return tok(
        ["Define: fox\nA quick brown animal.", "Define: paris\nThe capital"], return_tensors="pt", padding=True
    ).input_ids


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
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "checkpoints",
        "loss.png",
        "metrics.jsonl",
        "recipe.yaml",
        "run.json",
    ]
    adapter_files = {p.name for p in (run / "adapter").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= adapter_files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in adapter_files)
    assert list((run / "checkpoints").glob("checkpoint-*/adapter_model.safetensors"))
    assert not list((run / "checkpoints").rglob("*.bin")), "no pickled TrainingArguments in checkpoints"
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed"
    assert status["final"]["global_step"] == 40
    # the peak it reached, beside the estimate (an 8-bit base: the range it lies in)
    estimated = status["memory"]["estimate_bytes"]
    assert status["memory"]["process_peak_rss_bytes"] > 0
    if quantization == "8bit":
        assert len(estimated) == 2 and 0 < estimated[0] < estimated[1]
    else:
        assert estimated > 0
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
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
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
    assert (
        json.loads((tmp_path / "run" / "run.json").read_text())["created_at_unix"]
        != json.loads(first)["created_at_unix"]
    )


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
    estimate = subprocess.run(
        [sys.executable, "-m", "lora_cli", "estimate", str(run / "recipe.yaml"), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert memory["estimate_bytes"] == json.loads(estimate.stdout)["memory"]["lora"]["total"]
    from lora_cli.console import human_bytes

    peak, estimated = human_bytes(memory["process_peak_rss_bytes"]), human_bytes(memory["estimate_bytes"])
    assert f"peak memory: {peak} (the whole process; estimate {estimated} plus the libraries)" in stdout
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2
    saved = (run / "recipe.yaml").read_text()
    assert "r: 2" in saved and "lr: 0.001" in saved and "packing: true" in saved
    # A second run into the same directory is refused with the promised message.
    again = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.skipif(
    __import__("lora_cli.allocator", fromlist=["x"]).find_tcmalloc() is None, reason="tcmalloc not installed"
)
@pytest.mark.parametrize("setting,expected", [(None, "tcmalloc"), ("system", "system")])
def test_cli_uses_tcmalloc_when_installed(tiny_gpt2, tmp_path, setting, expected):
    import os

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows(repeat=1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  name: {tiny_gpt2}\ndata:\n  train: {data}\n  max_length: 64\ntrain:\n  max_steps: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_ALLOCATOR", "LD_PRELOAD")}
    if setting:
        env["LORA_ALLOCATOR"] = setting
    result = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "runs" / "r" / "run.json").read_text())["allocator"] == expected


def _lora_b_max(run: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return max(float(w.abs().max()) for name, w in weights.items() if "lora_B" in name)


@pytest.mark.parametrize("train", [{"max_steps": 1}, {"max_steps": None, "epochs": 0.25}])
def test_a_one_step_run_learns_despite_the_default_warm_up(tiny_gpt2, tmp_path, train):
    """warmup_ratio 0.03 of 1 step was rounded up to 1 warm-up step at lr 0: an all-zero adapter."""
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())  # 32 rows: 0.25 epoch = 1 step of 8
    recipe = tiny_recipe(
        tiny_gpt2, data, tmp_path / "run", train={"warmup_ratio": 0.03, "scheduler": "cosine", "log_every": 1, **train}
    )
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert result.final["global_step"] == 1
    (step,) = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert step["learning_rate"] == pytest.approx(1e-2)
    assert _lora_b_max(tmp_path / "run") > 0  # lora_B starts at 0: it moved, the adapter does something


def test_constant_scheduler_warms_up_first(tiny_gpt2, tmp_path):
    """`constant` is the schedule after warm-up: warmup_ratio 0.5 of 4 steps is 2 warm-up steps."""
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(
        tiny_gpt2,
        data,
        tmp_path / "run",
        train={"max_steps": 4, "scheduler": "constant", "warmup_ratio": 0.5, "log_every": 1},
    )
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    lrs = [m["learning_rate"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2])


@pytest.mark.parametrize(
    "ratio, steps, expected", [(0.03, 50, 2), (0.03, 10, 0), (0.1, 100, 10), (0.9, 2, 1), (0.5, 1, 0)]
)
def test_warm_up_steps_round_and_leave_a_step_to_learn(tiny_gpt2, ratio, steps, expected):
    """The rule LoraTrainer.create_scheduler applies (the Trainer's ceil would give 1, 1, 10, 2, 1)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from lora_cli.training.trainer import LoraTrainer

    args = TrainingArguments(
        output_dir="unused",
        warmup_steps=ratio,
        lr_scheduler_type="linear",
        learning_rate=1.0,
        report_to="none",
        use_cpu=True,
    )
    trainer = LoraTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_gpt2), args=args)
    trainer.create_optimizer()
    trainer.create_scheduler(steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert sum(lr < 1.0 for lr in lrs[:expected]) == expected and (expected == 0 or lrs[0] == 0)
    assert lrs[expected] == 1.0  # the first step after warm-up runs at the full rate
    assert args.warmup_steps == ratio  # the arguments are left as they were


def test_max_length_past_learned_positions_is_a_recipe_error(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """GPT-2 learns one embedding per position (n_positions 256): a 300-token row crashed the run
    with an IndexError traceback. Now exit 2 before the model loads, naming the key and the fix."""
    from tests.helpers import lora_in_process

    rows = completion_rows() + [{"prompt": "Define: long\n", "completion": "fox " * 300}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}}}\ntrain: {{max_steps: 2, batch_size: 4}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    code, out, err = lora_in_process(monkeypatch, capsys, "train", recipe, "data.max_length=1000")
    assert code == 2, err
    assert "data.max_length: 1000 is beyond the model's context of 256 tokens (n_positions)" in err
    assert "data.max_length=256 or less" in err and "Traceback" not in err
    assert "trainable parameters" not in out  # stopped before the model was loaded


def test_max_length_past_a_rope_models_context_is_a_warning(tiny_llama, tmp_path, monkeypatch, capsys):
    from tests.helpers import lora_in_process

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_llama}}}\ndata: {{train: {data}, max_length: 300}}\n"
        f"train: {{max_steps: 2, batch_size: 4}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    code, out, err = lora_in_process(monkeypatch, capsys, "train", recipe)
    assert code == 0, err
    assert (
        "warning: data.max_length 300 is beyond the model's context of 256 tokens (max_position_embeddings): "
        "positions past it were never trained. Fix: data.max_length=256 or less"
    ) in out
