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


# Run in a child process: caps its address space once everything is imported, then trains a batch
# far too big for the cap, so the CPU allocator genuinely fails (no mocks).
_OOM_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch, transformers, peft
from lora_cli.errors import LoraError
from lora_cli.train import quiet_libraries, run_training
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
