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


def test_a_runs_deleted_data_is_named_not_replaced_by_a_file_of_the_same_name_here(
    tiny_gpt2, tmp_path, monkeypatch, capsys
):
    run, _ = _train_with_relative_paths(tmp_path / "project", tiny_gpt2, monkeypatch, capsys)
    (tmp_path / "project" / "valid.jsonl").unlink()
    other = tmp_path / "elsewhere"
    write_jsonl(other / "valid.jsonl", [{"text": "something else entirely"}] * 4)
    monkeypatch.chdir(other)
    before = (run / "eval.json").read_text()
    code, out, err = lora_in_process(monkeypatch, capsys, "eval", run)
    assert code == 2, err
    assert str(tmp_path / "project" / "valid.jsonl") in err and "Traceback" not in err
    assert (run / "eval.json").read_text() == before


def test_resume_from_another_directory_reads_the_runs_own_files(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """A run stopped early, resumed by its directory from elsewhere: same base, same data."""
    shutil.copytree(tiny_gpt2, tmp_path / "project" / "base")
    write_jsonl(tmp_path / "project" / "train.jsonl", completion_rows())
    (tmp_path / "project" / "r.yaml").write_text(
        "model: {name: base, dtype: float32}\ndata: {train: train.jsonl, max_length: 64}\n"
        "train: {max_steps: 4, batch_size: 4, save_every: 2, log_every: 1}\n"
    )
    monkeypatch.chdir(tmp_path / "project")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", "r.yaml")
    assert code == 0, err
    run = tmp_path / "project" / "runs" / "r"
    # as if stopped after the checkpoint at step 2
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    status = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = lora_in_process(monkeypatch, capsys, "train", run, "--resume")
    assert code == 0, err + out
    assert "resuming" in out and (run / "adapter" / "adapter_model.safetensors").is_file()
