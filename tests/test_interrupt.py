"""Ctrl-C during `lora train`: finish the step, save a checkpoint, exit 130; --resume finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers import chat_rows, write_jsonl


def test_sigint_saves_checkpoint_and_resume_finishes(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=8))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  name: {tiny_llama}\ndata:\n  train: {data}\n  max_length: 64\n"
        "train:\n  max_steps: 400\n  batch_size: 2\n  log_every: 1\n  lr: 1.0e-3\n"
    )
    run = tmp_path / "runs" / "recipe"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_cli", "train", str(recipe)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Wait until training has really started (a metrics line exists), then press Ctrl-C.
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err  # says how to continue
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted"
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "a checkpoint was saved on Ctrl-C"
    saved_step = int(checkpoints[-1].name.split("-")[1])
    assert 0 < saved_step < 400
    assert not (run / "adapter").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", "--resume", str(run), "train.max_steps=" + str(saved_step + 3)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    # Changing max_steps changes the schedule: resume refuses and names the key.
    assert resumed.returncode == 2 and "train.max_steps" in resumed.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", "--resume", str(run), "train.log_every=50"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from checkpoint-{saved_step}" in resumed.stdout
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["final"]["global_step"] == 400
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
