"""A diverging run stops with exit-1 semantics, names the step and learning rate, and saves no bad weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_cli.commands.train import run as run_training
from lora_cli.errors import TrainingError
from tests.helpers import completion_rows, read_metrics, tiny_recipe, write_jsonl


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


# Run in a child process: caps its address space once everything is imported, then trains a batch
# far too big for the cap, so the CPU allocator genuinely fails (no mocks).
_OOM_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch, transformers, peft
from lora_cli.errors import LoraError
from lora_cli.console import quiet_libraries
from lora_cli.commands.train import run as run_training
from tests.helpers import tiny_recipe, write_jsonl
quiet_libraries()
tmp, model = Path(sys.argv[1]), Path(sys.argv[2])
rows = [{"text": " ".join(["fox dog one ten model"] * 60)} for _ in range(256)]
data = write_jsonl(tmp / "t.jsonl", rows)
recipe = tiny_recipe(model, data, tmp / "run", data={"max_length": 256}, train={"batch_size": 256, "max_steps": 1})
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY))
try:
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    print(json.dumps({"trained": True}))
except LoraError as e:
    print(json.dumps({"kind": type(e).__name__, "code": e.exit_code, "message": e.message, "hint": e.hint}))
"""


def test_out_of_memory_names_the_knobs(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "oom.py"
    script.write_text(_OOM_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tiny_llama)],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.get("kind") == "TrainingError", result
    assert result["code"] == 1
    assert result["message"].startswith("out of memory during training (could not allocate")
    for knob in ("train.batch_size", "train.grad_accum", "data.max_length", "train.gradient_checkpointing", "4bit"):
        assert knob in result["hint"]
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed" and "out of memory" in status["error"]


@pytest.mark.parametrize("val_split", [0.0, 0.25])
def test_diverged_run_logs_nan_steps_and_is_not_saved(tiny_gpt2, tmp_path, capsys, val_split):
    """lr 1e30: step 1 is finite, every later step NaN, fewer than max_nonfinite_steps of them."""
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(
        tiny_gpt2, data, tmp_path / "run", data={"val_split": val_split},
        train={"lr": 1e30, "max_steps": 4, "log_every": 1, "max_nonfinite_steps": 10},
    )
    with pytest.raises(TrainingError) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert info.value.exit_code == 1
    assert info.value.message.startswith("training diverged: ") and "the adapter was not saved" in info.value.message
    assert ("the final eval loss is nan" if val_split else "the last step's loss was non-finite") in info.value.message
    assert "train.lr" in info.value.hint
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "adapter").exists()
    steps = [m for m in read_metrics(run) if "loss" in m]
    assert isinstance(steps[0]["loss"], float) and "skipped_steps" not in steps[0]
    for m in steps[1:]:  # skipped steps are visible as such, never as a loss of 0.0
        assert (m["loss"], m["skipped_steps"], m["grad_norm"]) == ("nan", 1, "nan")
    assert "step 2/4 loss nan (step skipped)" in capsys.readouterr().err


def _poisoned_llama(tiny_llama, tmp_path, token: str) -> Path:
    """The tiny Llama with a NaN input embedding for `token` (its output head untied): a batch
    holding that token gives a real NaN loss, every other batch a finite one."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "poisoned"
    shutil.copytree(tiny_llama, target)
    model = AutoModelForCausalLM.from_pretrained(target)
    (token_id,) = AutoTokenizer.from_pretrained(target).convert_tokens_to_ids([token])
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    model.save_pretrained(target)
    return target


@pytest.mark.parametrize("batch", [{"batch_size": 4}, {"batch_size": 2, "grad_accum": 2}])
def test_a_few_nonfinite_steps_are_skipped_not_averaged_as_zero(tiny_llama, tmp_path, capsys, batch):
    model = _poisoned_llama(tiny_llama, tmp_path, "<|im_start|>")
    rows = completion_rows(repeat=2)
    rows[3] = {"prompt": "Define: ten\n", "completion": "<|im_start|> poison"}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    # 16 rows, 4 per step: one step of each epoch holds the poisoned row (with grad_accum, in one
    # of its micro-batches: the other's gradients are dropped too).
    recipe = tiny_recipe(model, data, tmp_path / "run", train={"max_steps": 8, "log_every": 1, **batch})
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    skipped = [m for m in steps if m.get("skipped_steps")]
    finite = [m["loss"] for m in steps if not m.get("skipped_steps")]
    assert len(skipped) == 2 and all(m["loss"] == "nan" for m in skipped)
    assert result.final["skipped_steps"] == 2
    # The mean of the 6 real steps: the 2 skipped ones are not averaged in as 0.
    assert result.final["train_loss"] == pytest.approx(sum(finite) / len(finite), rel=1e-6)
    out, err = capsys.readouterr()
    assert "loss nan (step skipped)" in err
    assert "warning: 2 of 8 steps were skipped (non-finite loss)" in out
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "completed" and status["final"]["skipped_steps"] == 2


def test_skipped_steps_are_counted_in_a_log_window(tiny_llama, tmp_path, capsys):
    """log_every 4: the window of steps 5-8 (epoch 2, which holds the poisoned row once) logs the
    mean of its other 3 steps and says one was skipped."""
    model = _poisoned_llama(tiny_llama, tmp_path, "<|im_start|>")
    rows = completion_rows(repeat=2)
    rows[3] = {"prompt": "Define: ten\n", "completion": "<|im_start|> poison"}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tiny_recipe(model, data, tmp_path / "run", train={"max_steps": 8, "batch_size": 4, "log_every": 4})
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    last = [m for m in read_metrics(tmp_path / "run") if "loss" in m][-1]
    assert last["step"] == 8 and last["skipped_steps"] == 1 and isinstance(last["loss"], float)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 8/8 loss ")]
    assert "(1 step with non-finite loss skipped)" in line


def test_non_finite_adapter_weights_are_never_saved_as_completed(tiny_gpt2, tmp_path):
    """One step whose loss is finite, but whose update (weight decay lr * 1e30 = inf) leaves the
    weights NaN / inf: the run used to complete with exit 0 and an all-NaN adapter."""
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run",
                         train={"lr": 1e30, "weight_decay": 1e30, "max_steps": 1, "log_every": 1})
    with pytest.raises(TrainingError) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert info.value.exit_code == 1
    assert "adapter weight tensors hold NaN or inf after step 1" in info.value.message
    assert "the adapter was not saved" in info.value.message
    assert isinstance(read_metrics(tmp_path / "run")[0]["loss"], float)  # the step itself was fine
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_skipped_last_step_still_completes_the_run(tiny_llama, tmp_path, capsys):
    """The poisoned row falls in steps 1 and 6 (16 rows, batch 4, seed 42): with max_steps 6 the
    last step is skipped. It changed no weight (they are step 5's, finite and giving a finite
    loss), so the run is complete, with the usual warning; it used to fail as "diverged"."""
    from safetensors.torch import load_file

    model = _poisoned_llama(tiny_llama, tmp_path, "<|im_start|>")
    rows = completion_rows(repeat=2)
    rows[3] = {"prompt": "Define: ten\n", "completion": "<|im_start|> poison"}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tiny_recipe(model, data, tmp_path / "run", train={"max_steps": 6, "batch_size": 4, "log_every": 1})
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in steps if m.get("skipped_steps")] == [1, 6]
    assert result.final["skipped_steps"] == 2 and result.final["global_step"] == 6
    assert "warning: 2 of 6 steps were skipped (non-finite loss)" in capsys.readouterr().out
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "completed"
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
