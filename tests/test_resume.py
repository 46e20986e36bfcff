"""Resume: exact across an epoch boundary, refusals that name the change, atomic checkpoints, disk full."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import lora_cli.training.callbacks
import lora_cli.training.session
from lora_cli.commands.train import run as run_training
from lora_cli.errors import Interrupted, RunDirError, TrainingError
from lora_cli.run.checkpoints import latest_checkpoint
from lora_cli.run.paths import RunPaths
from tests.helpers import completion_rows, read_metrics, tiny_recipe, write_jsonl

# 32 rows / batch 8 = 4 steps per epoch; 3 epochs = 12 steps. The interrupt lands at step 6,
# in the middle of epoch 2, so the resumed run must restore the data order of a later epoch,
# the position inside it, the optimizer, the scheduler and the dropout RNG.
STEPS_PER_EPOCH = 4
INTERRUPT_AT = 6
TRAIN = {"max_steps": None, "epochs": 3, "log_every": 1, "lr": 5e-3, "scheduler": "linear", "warmup_ratio": 0.0}
LORA = {"dropout": 0.1}  # dropout makes the RNG state matter


def _recipe(model_dir, tmp_path, name, **overrides):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, completion_rows(repeat=4))
    sections = {"train": dict(TRAIN), "lora": dict(LORA)}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return tiny_recipe(model_dir, data, tmp_path / "runs" / name, **sections)


def _interrupting_callback(at_step: int):
    """StopOnSignalCallback that sends this process a real SIGINT at `at_step`: the same path as
    a user's Ctrl-C (signal handler -> finish the step -> save -> stop), at a deterministic step."""

    class InterruptAt(lora_cli.training.callbacks.StopOnSignalCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == at_step and self.received is None:
                os.kill(os.getpid(), signal.SIGINT)
            return super().on_step_end(args, state, control, **kwargs)

    return InterruptAt


def _train_until_ctrl_c(recipe, at_step: int) -> Interrupted:
    """Run `recipe` until a real Ctrl-C at `at_step` stops it; the Interrupted it raised."""
    mp = pytest.MonkeyPatch()
    mp.setattr(lora_cli.training.session, "StopOnSignalCallback", _interrupting_callback(at_step))
    try:
        with pytest.raises(Interrupted) as info:
            run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    finally:
        mp.undo()
    return info.value


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tiny_gpt2, tmp_path_factory):
    """An uninterrupted 3-epoch run, the reference for exact resume."""
    tmp = tmp_path_factory.mktemp("straight")
    result = run_training(_recipe(tiny_gpt2, tmp, "straight"), recipe_path=None, resume=False, overwrite=False)
    return result.paths.root


def _resume_refusal(recipe) -> RunDirError:
    with pytest.raises(RunDirError) as info:
        run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert info.value.exit_code == 2
    assert "--overwrite" in info.value.hint
    return info.value


@pytest.fixture(scope="module")
def interrupted_run(tiny_gpt2, tmp_path_factory):
    """The same recipe, interrupted by SIGINT at step 6 (mid epoch 2); not yet resumed."""
    tmp = tmp_path_factory.mktemp("interrupted")
    recipe = _recipe(tiny_gpt2, tmp, "interrupted")
    interrupted = _train_until_ctrl_c(recipe, INTERRUPT_AT)
    assert interrupted.exit_code == 130
    return tmp, recipe, interrupted


def test_interrupt_mid_epoch_two_saves_a_checkpoint(interrupted_run):
    tmp, recipe, error = interrupted_run
    run = tmp / "runs" / "interrupted"
    assert f"interrupted at step {INTERRUPT_AT}" in error.message
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert latest_checkpoint(RunPaths(run)) == run / "checkpoints" / f"checkpoint-{INTERRUPT_AT}"
    # No temporary checkpoint directories are left behind by the atomic save.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"checkpoint-{STEPS_PER_EPOCH}", f"checkpoint-{INTERRUPT_AT}"
    ]


def test_resume_across_epoch_boundary_matches_uninterrupted_run(straight_run, interrupted_run, capsys):
    tmp, recipe, _ = interrupted_run
    run = tmp / "runs" / "interrupted"
    # What a kill -9 during a save leaves behind: a staging directory, and (from a tool that writes
    # in place) a newer checkpoint-N without its optimizer state. Both must be skipped and said.
    ckpts = run / "checkpoints"
    (ckpts / ".tmp-checkpoint-7").mkdir()
    (ckpts / ".tmp-checkpoint-7" / "adapter_model.safetensors").write_bytes(b"partial")
    stray = ckpts / "checkpoint-8"
    shutil.copytree(ckpts / f"checkpoint-{INTERRUPT_AT}", stray)
    (stray / "optimizer.pt").unlink()
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    out = capsys.readouterr().out
    assert f"skipping incomplete checkpoint {ckpts / '.tmp-checkpoint-7'}" in out
    assert f"skipping incomplete checkpoint {stray} (missing optimizer.pt)" in out
    assert f"resuming {run} from checkpoint-{INTERRUPT_AT}" in out
    # The resumed run replaced the stray checkpoint-8 with a complete one and cleaned up.
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-12", "checkpoint-8"]
    assert latest_checkpoint(RunPaths(run)) == ckpts / "checkpoint-12"
    assert result.final["global_step"] == 3 * STEPS_PER_EPOCH

    expected, got = _adapter(straight_run), _adapter(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name

    # Every loss logged after the resume point equals the uninterrupted run's loss at that step.
    straight = {m["step"]: m["loss"] for m in read_metrics(straight_run) if "loss" in m}
    resumed = {}
    for m in read_metrics(run):
        if "loss" in m:
            resumed[m["step"]] = m["loss"]  # later lines (after the resume) win
    after = [s for s in straight if s > INTERRUPT_AT]
    assert after == list(range(INTERRUPT_AT + 1, 3 * STEPS_PER_EPOCH + 1))
    for step in after:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": {"name": "TINY_LLAMA"}}, "model.name"),
        ({"lora": {"r": 4}}, "lora.r: 8 -> 4"),
        ({"lora": {"alpha": 32}}, "lora.alpha: 16.0 -> 32.0"),
        ({"lora": {"target_modules": ["c_attn"]}}, "lora.target_modules"),
        ({"train": {"lr": 1e-3}}, "train.lr"),
    ],
)
def test_resume_refuses_a_change_that_alters_what_is_learned(straight_run, tiny_gpt2, tiny_llama, change, named):
    if "model" in change:
        change = {"model": {"name": str(tiny_llama)}}
    error = _resume_refusal(_recipe(tiny_gpt2, straight_run.parent.parent, "straight", **change))
    assert f"cannot resume {straight_run}" in error.message and named in error.message


def test_resume_refuses_edited_data_and_allows_log_cadence(straight_run, tiny_gpt2, capsys):
    from lora_cli.training.resume import check_resumable

    tmp = straight_run.parent.parent
    recipe = _recipe(tiny_gpt2, tmp, "straight", train={"log_every": 3})
    check_resumable(RunPaths(straight_run), recipe)  # a benign change: allowed, and said
    assert "resume: train.log_every changed (1 -> 3); allowed" in capsys.readouterr().out

    data = tmp / "train.jsonl"
    original = data.read_bytes()
    try:
        data.write_bytes(original + b'{"prompt": "Define: new\\n", "completion": "An edit."}\n')
        error = _resume_refusal(recipe)
    finally:
        data.write_bytes(original)
    assert "the training data changed" in error.message and str(data) in error.message


def test_resume_of_a_completed_run_does_nothing(straight_run, tiny_gpt2, monkeypatch, capsys):
    """As `make quickstart` reuses a finished run: no step past max_steps, the adapter untouched."""
    adapter = straight_run / "adapter" / "adapter_model.safetensors"
    before = (adapter.read_bytes(), adapter.stat().st_mtime_ns, (straight_run / "run.json").read_text(),
              sorted(p.name for p in (straight_run / "checkpoints").iterdir()))
    capsys.readouterr()
    result = run_training(_recipe(tiny_gpt2, straight_run.parent.parent, "straight"), recipe_path=None,
                          resume=True, overwrite=False)
    assert f"{straight_run} is already complete (step 12): nothing to do" in capsys.readouterr().out
    assert result.final["global_step"] == 3 * STEPS_PER_EPOCH
    from tests.helpers import lora_in_process

    code, out, err = lora_in_process(monkeypatch, capsys, "train", "--resume", straight_run)  # the command line: exit 0
    assert code == 0 and "already complete" in out, err
    assert before == (adapter.read_bytes(), adapter.stat().st_mtime_ns, (straight_run / "run.json").read_text(),
                      sorted(p.name for p in (straight_run / "checkpoints").iterdir()))


def test_resume_after_a_stop_on_the_last_step_trains_no_step_past_the_end(tiny_gpt2, tmp_path, capsys):
    """Stopped after the last step (6, mid epoch 2) had saved checkpoint-6, before the adapter was
    saved (here a Ctrl-C while the adapter is written; a Ctrl-C on the step itself completes the
    run). The Trainer resumed from checkpoint-6 would train a step 7 of 6: the last stretch is
    redone from checkpoint-4."""
    import peft.peft_model

    train = {"max_steps": 6, "epochs": 1, "save_every": 4}
    reference = run_training(_recipe(tiny_gpt2, tmp_path, "straight", train=train), recipe_path=None,
                             resume=False, overwrite=False).paths.root
    recipe = _recipe(tiny_gpt2, tmp_path, "last", train=train)
    real_save = peft.peft_model.safe_save_file

    def save_then_ctrl_c(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        if "checkpoint-" not in str(filename):  # the final adapter
            os.kill(os.getpid(), signal.SIGINT)

    mp = pytest.MonkeyPatch()
    mp.setattr(peft.peft_model, "safe_save_file", save_then_ctrl_c)
    try:
        with pytest.raises(Interrupted):
            run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    finally:
        mp.undo()
    run = tmp_path / "runs" / "last"
    assert not (run / "adapter").exists() and latest_checkpoint(RunPaths(run)).name == "checkpoint-6"
    capsys.readouterr()
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert f"resuming {run} from checkpoint-4" in capsys.readouterr().out
    assert result.final["global_step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    expected, got = _adapter(reference), _adapter(run)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


@pytest.mark.parametrize("max_steps, failing", [(4, "checkpoint-4"), (2, "the adapter")])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_gpt2, tmp_path, monkeypatch, max_steps, failing):
    """A real full disk cannot be made in CI: the second adapter write (checkpoint-4, or the final
    adapter after checkpoint-2) writes a partial file and then fails with ENOSPC, as the OS would."""
    import peft.peft_model

    real_save = peft.peft_model.safe_save_file
    calls = []

    def save_until_disk_full(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_until_disk_full)
    recipe = _recipe(tiny_gpt2, tmp_path, "full", train={"max_steps": max_steps, "save_every": 2})
    with pytest.raises(TrainingError) as info:
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert info.value.exit_code == 1
    assert info.value.message.startswith(f"disk full while saving {failing}")
    # No half-written adapter, and no temporary directory of the atomic write is left.
    assert not (ckpts.parent / "adapter").exists()
    assert not [p.name for p in ckpts.parent.iterdir() if p.name.startswith(".")]
    assert f"the previous checkpoint {ckpts / 'checkpoint-2'} is kept" in info.value.message
    assert "Free disk space" in info.value.hint
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-2"]  # no staging dir, no half checkpoint-4
    assert latest_checkpoint(RunPaths(ckpts.parent)) == ckpts / "checkpoint-2"
    assert load_file(str(ckpts / "checkpoint-2" / "adapter_model.safetensors"))
    assert json.loads((ckpts.parent / "run.json").read_text())["status"] == "failed"


def test_rotation_keeps_the_newest_complete_checkpoints(straight_run):
    # Epoch saves at steps 4, 8, 12 with save_total_limit 2; nothing staged is left behind.
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-8"]


# A child process that is killed with SIGKILL (kill -9) in the middle of writing checkpoint-4:
# the adapter file is half written when the kill lands, as on a pre-empted machine.
_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import peft.peft_model
from lora_cli.commands.train import run as run_training
from tests.helpers import completion_rows, tiny_recipe, write_jsonl

tmp, model = Path(sys.argv[1]), Path(sys.argv[2])
real_save = peft.peft_model.safe_save_file

def save_and_die(tensors, filename, *args, **kwargs):
    if "checkpoint-4" in str(filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(tensors, filename, *args, **kwargs)

peft.peft_model.safe_save_file = save_and_die
data = write_jsonl(tmp / "train.jsonl", completion_rows())
run_training(tiny_recipe(model, data, tmp / "run", train={"max_steps": 6, "save_every": 2}),
             recipe_path=None, resume=False, overwrite=False)
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_and_resume_works(tiny_gpt2, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "killed.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tiny_gpt2)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # The half-written save is under its staging name; the Trainer's "checkpoint-*" sees only step 2.
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert latest_checkpoint(RunPaths(run)) == ckpts / "checkpoint-2"

    resumed = subprocess.run([sys.executable, "-m", "lora_cli", "train", "--resume", str(run)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping incomplete checkpoint {ckpts / '.tmp-checkpoint-4'}" in resumed.stdout
    assert f"resuming {run} from checkpoint-2" in resumed.stdout
    assert json.loads((run / "run.json").read_text())["final"]["global_step"] == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_atomic_directory_replaces_a_directory_whole(tmp_path):
    from lora_cli.fsutil import atomic_directory

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # untouched, no temporary left
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        staged = os.stat(tmp).st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert os.stat(target).st_ino == staged  # the staged directory itself was moved into place


def test_resumed_run_reports_the_whole_runs_final_loss(straight_run, tiny_gpt2, tmp_path):
    """Interrupted at step 6 between two logs (log_every 5), then resumed: the final train loss is
    the mean over all 12 steps, as the uninterrupted run's, not over the resumed steps only."""
    recipe = _recipe(tiny_gpt2, tmp_path, "resumed", train={"log_every": 5})
    _train_until_ctrl_c(recipe, INTERRUPT_AT)
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    straight = json.loads((straight_run / "run.json").read_text())["final"]
    assert result.final["global_step"] == straight["global_step"] == 3 * STEPS_PER_EPOCH
    assert result.final["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    # ... which is the mean of the uninterrupted run's 12 logged step losses.
    losses = [m["loss"] for m in read_metrics(straight_run) if "loss" in m]
    assert len(losses) == 12 and straight["train_loss"] == pytest.approx(sum(losses) / 12, rel=1e-6)
    saved = json.loads((tmp_path / "runs" / "resumed" / "run.json").read_text())["final"]
    assert saved["train_loss"] == result.final["train_loss"]


def test_resume_drops_the_metrics_of_the_steps_it_redoes(tiny_gpt2, tmp_path):
    """Killed at step 5 after checkpoint-4 (checkpoint-5 never written), with a log line cut off:
    --resume redoes step 5, and metrics.jsonl holds each step once, as the uninterrupted run's
    (it used to hold steps 1-5, then 5-6 again, so loss.png doubled back)."""
    train = {"max_steps": 6, "epochs": 1, "save_every": 4}
    reference = run_training(_recipe(tiny_gpt2, tmp_path, "straight", train=train), recipe_path=None,
                             resume=False, overwrite=False).paths.root
    recipe = _recipe(tiny_gpt2, tmp_path, "killed", train=train)
    _train_until_ctrl_c(recipe, 5)
    run = tmp_path / "runs" / "killed"
    shutil.rmtree(run / "checkpoints" / "checkpoint-5")  # as if killed before it was saved
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a write cut off by the kill
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert [m["step"] for m in before if "loss" in m] == [1, 2, 3, 4, 5]
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert result.final["global_step"] == 6
    lines = (run / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]  # every line parses
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    expected = [m["loss"] for m in read_metrics(reference) if "loss" in m]
    assert [m["loss"] for m in metrics if "loss" in m] == pytest.approx(expected, rel=1e-5)


def test_resume_refuses_another_process_count(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """The global batch (batch_size × grad_accum × processes) and the data position a checkpoint
    resumes at depend on the process count: run.json records it, a resume with another is refused."""
    recipe = _recipe(tiny_gpt2, tmp_path, "procs", train={"max_steps": 4, "epochs": 1, "save_every": 2})
    _train_until_ctrl_c(recipe, 2)
    paths = RunPaths(tmp_path / "runs" / "procs")
    record = json.loads(paths.run_json.read_text())
    assert record["num_processes"] == 1
    # As a 2-process run (`--num-processes 2`) records itself; resumed here with one.
    paths.run_json.write_text(json.dumps({**record, "num_processes": 2}))
    with pytest.raises(RunDirError, match="trained with 2 processes, this resume has 1") as info:
        run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert info.value.exit_code == 2 and "--num-processes 2" in info.value.hint
    assert json.loads(paths.run_json.read_text())["status"] == "interrupted"  # untouched
    paths.run_json.write_text(json.dumps(record))
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert result.final["global_step"] == 4
