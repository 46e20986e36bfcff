"""A run keeps meaning what it meant when it trained: relative paths in its recipe are those of
the directory training ran in, and its base is the one at the absolute path recorded then."""

from __future__ import annotations

import json
import shutil

from tests.helpers import completion_rows, lora_in_process, write_jsonl


def _train_with_relative_paths(workdir, model_dir, monkeypatch, capsys):
    shutil.copytree(model_dir, workdir / "base")
    write_jsonl(workdir / "train.jsonl", completion_rows())
    write_jsonl(workdir / "valid.jsonl", completion_rows()[:4])
    (workdir / "r.yaml").write_text(
        "model: {name: base, dtype: float32}\n"
        "data: {train: train.jsonl, validation: valid.jsonl, max_length: 64}\n"
        "train: {max_steps: 4, batch_size: 4, lr: 1.0e-2, log_every: 1}\n"
    )
    monkeypatch.chdir(workdir)
    code, out, err = lora_in_process(monkeypatch, capsys, "train", "r.yaml")
    assert code == 0, err
    code, _, err = lora_in_process(monkeypatch, capsys, "eval", "runs/r")
    assert code == 0, err
    return workdir / "runs" / "r", json.loads((workdir / "runs" / "r" / "eval.json").read_text())


def test_eval_from_elsewhere_uses_the_runs_own_base_and_data(tiny_gpt2, tiny_llama, tmp_path, monkeypatch, capsys):
    run, expected = _train_with_relative_paths(tmp_path / "project", tiny_gpt2, monkeypatch, capsys)
    # Elsewhere, another model and other data sit at the same relative paths.
    other = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama, other / "base")
    write_jsonl(other / "valid.jsonl", [{"prompt": "x", "completion": "something else entirely"}] * 4)
    monkeypatch.chdir(other)
    code, out, err = lora_in_process(monkeypatch, capsys, "eval", run)
    assert code == 0, err
    again = json.loads((run / "eval.json").read_text())
    assert again["base"] == expected["base"] and again["adapter"] == expected["adapter"]


def test_a_runs_deleted_base_is_named_not_looked_up_on_the_hub(tiny_gpt2, tmp_path, monkeypatch, capsys):
    run, _ = _train_with_relative_paths(tmp_path / "project", tiny_gpt2, monkeypatch, capsys)
    shutil.rmtree(tmp_path / "project" / "base")
    for command in (["eval", run], ["generate", "hello", "--run", run], ["merge", run]):
        code, out, err = lora_in_process(monkeypatch, capsys, *command)
        assert code == 2, (command, err)
        assert f"{tmp_path / 'project' / 'base'} no longer exists" in err and "Traceback" not in err
