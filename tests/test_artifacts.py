"""What a run leaves to look at: adapter/README.md, loss.png, TensorBoard events, `lora runs`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_cli.artifacts.loss_plot import write_loss_plot
from tests.helpers import chat_rows, lora_in_process, train_tiny_run, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    import importlib.util

    tmp = tmp_path_factory.mktemp("artifacts")
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # optional extra
    return train_tiny_run(
        tmp, "card", tiny_llama, chat_rows(4),
        data={"val_split": 0.25}, train={"max_steps": 10, "eval_every": 5, "report_to": trackers},
    )


def test_model_card(run_dir):
    text = (run_dir / "adapter" / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    run = json.loads((run_dir / "run.json").read_text())
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert front["base_model"] == run["model"]["name"]
    assert f"{run['params']['trainable']:,}" in text  # trainable parameters
    assert f"{run['final']['train_loss']:.4f}" in text and f"{run['final']['eval_loss']:.4f}" in text
    assert "PeftModel.from_pretrained" in text and "lora merge" in text
    assert "format `chat`" in text and "r=8" in text
    # the card lives in the adapter directory and does not stop it loading with plain peft
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_loss_plot_and_tensorboard(run_dir):
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".loss.png*"))  # no temporary left behind
    pytest.importorskip("tensorboard")
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "eval/loss" in acc.Tags()["scalars"]


def test_loss_plot_never_fails(tmp_path, monkeypatch):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}])
    assert "no loss" in write_loss_plot(write_jsonl(tmp_path / "empty.jsonl", [{"step": 1}]), tmp_path / "a.png")
    assert "cannot read" in write_loss_plot(tmp_path / "missing.jsonl", tmp_path / "b.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = write_loss_plot(metrics, tmp_path / "c.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "c.png").exists()


def test_runs_lists_runs_with_eval_change(run_dir, monkeypatch, capsys):
    runs_root = run_dir.parent
    code, _, err = lora_in_process(monkeypatch, capsys, "eval", run_dir)
    assert code == 0, err
    # a second, unfinished run: listed with what is known
    other = runs_root / "broken"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"status": "failed", "created_at_unix": 4e9, "model": {"name": "m"}}))
    code, out, err = lora_in_process(monkeypatch, capsys, "runs", "--dir", runs_root, "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [r["name"] for r in listed] == ["card", "broken"]  # oldest first
    card = listed[0]
    final = json.loads((run_dir / "run.json").read_text())["final"]
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert card["status"] == "completed" and card["steps"] == 10 == final["global_step"]
    assert card["train_loss"] == final["train_loss"] and card["eval_loss"] == final["eval_loss"]
    assert card["eval_change"]["change"] == pytest.approx(evaluated["adapter"]["loss"] - evaluated["base"]["loss"])
    assert listed[1]["status"] == "failed" and listed[1]["steps"] is None
    code, out, err = lora_in_process(monkeypatch, capsys, "runs", "--dir", runs_root)
    assert code == 0 and "card" in out and "completed" in out and "->" in out and "failed" in out
    code, _, err = lora_in_process(monkeypatch, capsys, "runs", "--dir", runs_root / "nope")
    assert code == 2 and "no run directory" in err


def test_missing_tensorboard_fails_before_loading_the_model(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}}}\ntrain: {{report_to: [tensorboard]}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    hide = ("import sys; sys.modules['tensorboard'] = None; from lora_cli.cli import main; "
            f"sys.argv = ['lora', 'train', {str(recipe)!r}]; main()")
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "tensorboard" in done.stderr and "pip install tensorboard" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # nothing started
