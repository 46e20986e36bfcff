"""Ctrl-C during `lora train`: finish the step, save a checkpoint, exit 130; --resume finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


def test_second_ctrl_c_during_a_save_aborts_and_keeps_the_last_good_checkpoint(tiny_gpt2, tmp_path, monkeypatch):
    """Ctrl-C at step 3 starts a save of checkpoint-3; a second Ctrl-C while that save writes its
    weights aborts at once (exit 130). checkpoint-2 stays complete, nothing half-written is left,
    and --resume continues from checkpoint-2."""
    import peft.peft_model

    import lora_cli.training.callbacks
    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from lora_cli.errors import Interrupted
    from lora_cli.run.checkpoints import latest_checkpoint
    from lora_cli.run.paths import RunPaths
    from lora_cli.training.checkpoints import check_loads_safely
    from tests.helpers import completion_rows, tiny_recipe

    class CtrlCAtStep3(lora_cli.training.callbacks.StopOnSignalCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and self.received is None:
                os.kill(os.getpid(), signal.SIGINT)  # the real handler runs, as for a user's Ctrl-C
            return super().on_step_end(args, state, control, **kwargs)

    real_save = peft.peft_model.safe_save_file

    def save_then_ctrl_c(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if "checkpoint-3" in str(filename):
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C, mid-save

    monkeypatch.setattr(lora_cli.training.session, "StopOnSignalCallback", CtrlCAtStep3)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_then_ctrl_c)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 4, "save_every": 2})
    try:
        with pytest.raises(Interrupted) as info:
            run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    finally:
        monkeypatch.undo()
    assert info.value.exit_code == 130
    assert "second Ctrl-C" in info.value.message and "--resume" in info.value.hint
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert latest_checkpoint(RunPaths(run)) == run / "checkpoints" / "checkpoint-2"
    check_loads_safely(run / "checkpoints" / "checkpoint-2")

    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert result.final["global_step"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_gpt2, tmp_path, monkeypatch):
    """A pre-empting scheduler sends SIGTERM: same save as Ctrl-C, exit code 128 + 15."""
    import lora_cli.training.callbacks
    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from lora_cli.errors import Interrupted
    from lora_cli.run.checkpoints import latest_checkpoint
    from lora_cli.run.paths import RunPaths
    from tests.helpers import completion_rows, tiny_recipe

    class TermAtStep3(lora_cli.training.callbacks.StopOnSignalCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and self.received is None:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().on_step_end(args, state, control, **kwargs)

    monkeypatch.setattr(lora_cli.training.session, "StopOnSignalCallback", TermAtStep3)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 10})
    with pytest.raises(Interrupted) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert info.value.exit_code == 143
    assert "interrupted at step 3" in info.value.message
    assert latest_checkpoint(RunPaths(tmp_path / "run")) == tmp_path / "run" / "checkpoints" / "checkpoint-3"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is removed again


def test_ctrl_c_during_the_final_adapter_save_leaves_no_half_adapter(tiny_gpt2, tmp_path, monkeypatch):
    import peft.peft_model

    from lora_cli.commands.train import run as run_training
    from lora_cli.errors import Interrupted
    from tests.helpers import completion_rows, tiny_recipe

    real_save = peft.peft_model.safe_save_file

    def save_then_ctrl_c(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if "checkpoint-" not in str(filename):  # the final adapter, written after training ended
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_then_ctrl_c)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2, "save_every": 2})
    with pytest.raises(Interrupted) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert info.value.exit_code == 130 and "--resume" in info.value.hint
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not (run / "adapter").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary adapter left
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-2"]


def test_ctrl_c_after_the_adapter_is_saved_leaves_the_run_completed(tiny_gpt2, tmp_path, monkeypatch):
    """A Ctrl-C while the loss plot is drawn (after the adapter and run.json say completed)."""
    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from lora_cli.errors import Interrupted
    from tests.helpers import completion_rows, tiny_recipe

    def ctrl_c_while_plotting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the KeyboardInterrupt arrives here

    monkeypatch.setattr(lora_cli.training.session, "write_loss_plot", ctrl_c_while_plotting)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    with pytest.raises(Interrupted) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = tmp_path / "run"
    assert "adapter is saved" in info.value.message and "--resume" not in (info.value.hint or "")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["final"]["global_step"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_runs_shows_the_step_an_interrupted_run_reached(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """Interrupted at step 3 between log lines (every 5 steps): `lora runs` says 3, not 1."""
    import lora_cli.training.callbacks
    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from lora_cli.errors import Interrupted
    from tests.helpers import completion_rows, lora_in_process, tiny_recipe

    class CtrlCAtStep3(lora_cli.training.callbacks.StopOnSignalCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and self.received is None:
                os.kill(os.getpid(), signal.SIGINT)
            return super().on_step_end(args, state, control, **kwargs)

    monkeypatch.setattr(lora_cli.training.session, "StopOnSignalCallback", CtrlCAtStep3)
    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "runs" / "int", train={"max_steps": 10, "log_every": 5})
    with pytest.raises(Interrupted):
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    monkeypatch.undo()
    capsys.readouterr()  # the training's own output
    code, out, err = lora_in_process(monkeypatch, capsys, "runs", "--dir", tmp_path / "runs", "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    assert listed["status"] == "interrupted" and listed["steps"] == 3


def test_a_signal_during_the_ranks_agreement_waits_for_the_next_step(monkeypatch):
    """Under DDP the ranks agree at each step's end on whether any got a signal (one all-reduce).
    A signal that arrives while a rank waits in that collective is handled as soon as it returns,
    after the others agreed without it: that rank must not stop alone (the others would wait for
    it forever in the next step's gradient all-reduce). It stops one step later, with them."""
    import signal

    from transformers import TrainerControl

    import lora_cli.training.distributed
    from lora_cli.training.callbacks import StopOnSignalCallback

    stopper = StopOnSignalCallback()
    signal_now = {"pending": True}

    def agree_max(value):  # what every rank contributed: no signal yet; this rank's arrives now
        if signal_now.pop("pending", False):
            stopper._handle(signal.SIGINT, None)
        return value

    monkeypatch.setattr(lora_cli.training.distributed, "agree_max", agree_max)
    first = stopper.on_step_end(None, None, TrainerControl())
    assert not first.should_training_stop and not first.should_save and not stopper.stopped
    assert stopper.received == signal.SIGINT  # remembered for the next agreement
    second = stopper.on_step_end(None, None, TrainerControl())
    assert second.should_training_stop and second.should_save and stopper.stopped


def test_ctrl_c_on_the_last_step_completes_the_run(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """A Ctrl-C agreed at the end of the last step: nothing is left to train, so the adapter is
    saved and the run is complete (it used to exit 130, and --resume retrained from step 0)."""
    from safetensors.torch import load_file

    import lora_cli.training.callbacks
    import lora_cli.training.session
    from lora_cli.commands.train import run as run_training
    from tests.helpers import completion_rows, tiny_recipe

    class CtrlCAtStep4(lora_cli.training.callbacks.StopOnSignalCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4 and self.received is None:
                os.kill(os.getpid(), signal.SIGINT)
            return super().on_step_end(args, state, control, **kwargs)

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows())
    reference = run_training(tiny_recipe(tiny_gpt2, data, tmp_path / "straight", train={"max_steps": 4}),
                             recipe_path=None, resume=False, overwrite=False).final
    monkeypatch.setattr(lora_cli.training.session, "StopOnSignalCallback", CtrlCAtStep4)
    capsys.readouterr()
    result = run_training(tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 4}),
                          recipe_path=None, resume=False, overwrite=False)
    out = capsys.readouterr().out
    assert "Ctrl-C came after the last step (4/4): the training is complete; saving the adapter" in out
    assert "adapter saved to" in out
    run = tmp_path / "run"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["final"]["global_step"] == 4
    assert result.final["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch_equal(ours[k], theirs[k]) for k in ours)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is removed again


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
