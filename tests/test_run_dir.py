"""The run directory's promises: --overwrite deletes only a run of ours, never a live one; output_dir
as a user writes it (`~`, a file by mistake); a run that failed before its first step is reusable;
broken run.json files are named, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli.commands.train import run as run_training
from lora_cli.errors import RunDirError
from lora_cli.run.lookup import find_latest_run, resolve_run
from lora_cli.run.paths import RunPaths
from lora_cli.run.processes import pid_start_time as _pid_start_time
from tests.helpers import completion_rows, lora_in_process, tiny_recipe, write_jsonl

OURS = {"name": "old", "status": "failed", "created_at_unix": 1.0}


def _recipe_file(path: Path, model: Path, data: Path, output_dir: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"model: {{name: {model}, dtype: float32}}\ndata: {{train: {data}, max_length: 64}}\n"
                    f"train: {{max_steps: 2, batch_size: 8}}\noutput_dir: {output_dir}\n")
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_never_deletes_what_the_user_made(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """A project folder holding the user's own recipe.yaml, data and notes is not a run."""
    proj = tmp_path / "proj"
    data = write_jsonl(proj / "mydata.jsonl", completion_rows())
    (proj / "sub").mkdir()
    (proj / "sub" / "notes.txt").write_text("notes")
    recipe = _recipe_file(proj / "recipe.yaml", tiny_gpt2, data, str(proj))
    before = _tree(proj)
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--overwrite")
    assert code == 2 and "not a lora run directory" in err and "Traceback" not in err
    assert _tree(proj) == before

    # Even beside a run.json of ours: the recipe being run and its data are never deleted.
    (proj / "run.json").write_text(json.dumps(OURS))
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--overwrite")
    assert code == 2 and "which this run reads" in err and "recipe.yaml" in err
    # The recipe elsewhere, the data still inside.
    outside = _recipe_file(tmp_path / "r.yaml", tiny_gpt2, data, str(proj))
    code, _, err = lora_in_process(monkeypatch, capsys, "train", outside, "--overwrite")
    assert code == 2 and "mydata.jsonl" in err and "which this run reads" in err
    assert (proj / "recipe.yaml").is_file() and (proj / "sub" / "notes.txt").is_file()

    # `output_dir: .` (or an ancestor of the current directory) is never deleted.
    monkeypatch.chdir(proj)
    dot = _recipe_file(tmp_path / "dot.yaml", tiny_gpt2, tmp_path / "elsewhere.jsonl", ".")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", dot, "--overwrite")
    assert code == 2 and "current directory" in err
    code, _, err = lora_in_process(monkeypatch, capsys, "train", dot, f"output_dir={tmp_path}", "--overwrite")
    assert code == 2 and "current directory" in err
    assert (proj / "recipe.yaml").is_file() and (proj / "mydata.jsonl").is_file()


def test_overwrite_keeps_a_run_that_holds_files_lora_did_not_write(tiny_gpt2, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = _recipe_file(tmp_path / "r.yaml", tiny_gpt2, data, str(tmp_path / "runs" / "r"))
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe)
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    (run / "my-notes.md").write_text("why this run matters")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--overwrite")
    assert code == 2 and "my-notes.md" in err and "did not write" in err
    assert (run / "my-notes.md").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    (run / "my-notes.md").unlink()
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--overwrite")
    assert code == 0, err


def test_a_run_still_training_is_never_replaced_or_resumed(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    paths = RunPaths(tmp_path / "run")
    record = json.loads(paths.run_json.read_text())
    # Another process, alive, recorded as the one training this run (as `lora train` records itself).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        paths.run_json.write_text(json.dumps({**record, "status": "running", "pid": other.pid,
                                              "pid_started": _pid_start_time(other.pid)}))
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirError, match=f"still training \\(process {other.pid}") as info:
                run_training(recipe, recipe_path=None, **{"resume": False, "overwrite": False, **flags})
            assert info.value.exit_code == 2 and f"kill -INT {other.pid}" in info.value.hint
        assert (paths.adapter / "adapter_config.json").is_file()
    finally:
        other.kill()
        other.wait()
    # The process is gone: a stale "running" is an interrupted run, and may be replaced.
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    assert result.final["global_step"] == 2
    assert json.loads(paths.run_json.read_text())["status"] == "completed"


def test_output_dir_under_home_is_expanded(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, "~/tilde-run", train={"max_steps": 2, "save_every": 2})
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = tmp_path / "home" / "tilde-run"
    assert result.paths.root == run
    # Everything in one place: run.json, the adapter and the Trainer's checkpoints.
    assert (run / "run.json").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "~").exists()


def test_output_dir_that_is_a_file(tiny_gpt2, tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("hi")
    recipe = _recipe_file(tmp_path / "r.yaml", tiny_gpt2, write_jsonl(tmp_path / "d.jsonl", completion_rows()), "x")
    for output_dir in ("afile", "afile/sub"):
        code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, f"output_dir={tmp_path / output_dir}")
        assert code == 2 and "output_dir" in err and "not a directory" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "hi"


def test_a_run_that_failed_before_its_first_step_is_started_again(tiny_gpt2, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"foo": "no known format"}] * 8)
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    from lora_cli.errors import DataError

    with pytest.raises(DataError):
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    write_jsonl(data, completion_rows())  # the data fixed; the same command again, no --overwrite
    capsys.readouterr()
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert "stopped before its first step" in capsys.readouterr().out
    assert result.final["global_step"] == 2
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and "error" not in record  # a fresh run.json
    # A run that did train is still never replaced without --overwrite.
    with pytest.raises(RunDirError, match="already exists"):
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "holds an array"),
    ('{"status": "completed", "created_at_unix": null}', "'created_at_unix' is null"),
    ('{"status": "completed", "created_at_unix": "2026-11-25"}', "'created_at_unix' is a string"),
    ('{"status": "completed", "created_at_unix": 9e9, "model": "tiny/gpt2"}', "'model' is a string"),
    ('{"status": "completed", ', "not valid JSON"),
])
def test_a_broken_run_json_is_listed_and_named_never_a_crash(content, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, created in (("a", 1.0), ("b", 2.0)):
        (tmp_path / "runs" / name / "adapter").mkdir(parents=True)
        (tmp_path / "runs" / name / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / "runs" / name / "recipe.yaml").write_text("model: {name: m}\ndata: {train: d.jsonl}\n")
        (tmp_path / "runs" / name / "run.json").write_text(
            json.dumps({"status": "completed", "created_at_unix": created, "model": {"name": "m"}}))
    (tmp_path / "runs" / "b" / "run.json").write_text(content)  # b is the newest run
    code, out, err = lora_in_process(monkeypatch, capsys, "runs", "--json")
    assert code == 0, err
    listed = {r["name"]: r for r in json.loads(out)}
    assert listed["b"]["status"] == "broken" and problem in listed["b"]["problem"]
    assert listed["a"]["status"] == "completed" and listed["a"]["problem"] is None
    code, out, err = lora_in_process(monkeypatch, capsys, "runs")
    assert code == 0 and "broken" in out, err
    # The latest-run default takes b (its directory is the newest), and says it is broken,
    # rather than silently acting on the older a.
    assert find_latest_run().root == Path("runs/b")
    with pytest.raises(RunDirError, match="the latest run runs/b is broken") as info:
        resolve_run(None)
    assert problem in info.value.message
    code, _, err = lora_in_process(monkeypatch, capsys, "eval", "runs/b")
    assert code == 2 and problem in err and "Traceback" not in err


def test_resume_never_trains_into_a_folder_that_is_not_a_run(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """The user's project folder (their own recipe.yaml and notes, no run.json of ours) is not a
    run: --resume refuses it and changes nothing, and "already exists" does not suggest --resume."""
    proj = tmp_path / "proj"
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = _recipe_file(proj / "recipe.yaml", tiny_gpt2, data, str(proj))
    recipe.write_text("# my precious comments: keep!\n" + recipe.read_text())
    (proj / "notes.txt").write_text("hello")
    before = {p.name: p.read_bytes() for p in proj.iterdir()}
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--resume")
    assert code == 2 and "not a lora run directory" in err and "Traceback" not in err, err
    code, _, err = lora_in_process(monkeypatch, capsys, "train", proj, "--resume")
    assert code == 2 and "not a lora run directory" in err, err
    assert {p.name: p.read_bytes() for p in proj.iterdir()} == before
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe)
    assert code == 2 and "not a lora run directory" in err and "--resume" not in err, err
    assert {p.name: p.read_bytes() for p in proj.iterdir()} == before


def test_a_run_just_starting_is_never_taken_for_one_that_stopped(tiny_gpt2, tmp_path):
    """Two `lora train` on one output_dir at the same moment: the second never deletes the first's
    brand-new directory. The first run.json already says "running" with the live pid."""
    import os

    from lora_cli.run.lifecycle import prepare_run_dir

    paths = prepare_run_dir(tmp_path / "fresh", resume=False, overwrite=False)
    claim = json.loads(paths.run_json.read_text())
    assert claim["status"] == "running" and claim["pid"] == os.getpid()
    assert [p.name for p in paths.root.iterdir()] == ["run.json"]  # nothing left beside it

    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("written by the first run")
    # A run.json with no status yet (as an older first write left it): a run starting, not a dead one.
    (run / "run.json").write_text(json.dumps({"name": "run", "created_at_unix": 1.0}))
    with pytest.raises(RunDirError, match="already exists"):
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    # "running" with a live pid (another process, as it records itself): refused, never deleted.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (run / "run.json").write_text(json.dumps({"status": "running", "pid": other.pid, "created_at_unix": 1.0,
                                                  "pid_started": _pid_start_time(other.pid)}))
        with pytest.raises(RunDirError, match="still training"):
            run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    finally:
        other.kill()
        other.wait()
    assert (run / "recipe.yaml").read_text() == "written by the first run"
    # Its process gone before the first step: now it is started again.
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    assert result.final["global_step"] == 2


def test_a_reused_or_dead_pid_is_not_a_live_run(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """run.json says "running", but its process is gone (kill -9) or its pid now belongs to an
    unrelated process: `lora runs` says interrupted, and the run may be replaced or resumed."""
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "runs" / "k9", train={"max_steps": 2})
    run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    capsys.readouterr()
    paths = RunPaths(tmp_path / "runs" / "k9")
    record = json.loads(paths.run_json.read_text())
    assert isinstance(record["pid_started"], int)  # recorded with the pid (Linux)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        for pid, started in ((dead.pid, record["pid_started"]), (other.pid, _pid_start_time(other.pid) - 1)):
            paths.run_json.write_text(json.dumps({**record, "status": "running", "pid": pid, "pid_started": started}))
            code, out, err = lora_in_process(monkeypatch, capsys, "runs", "--json")
            assert code == 0, err
            (listed,) = json.loads(out)
            assert listed["status"] == "interrupted" and listed["process_gone"] is True
            code, out, err = lora_in_process(monkeypatch, capsys, "runs")
            assert "interrupted (process gone)" in out
        result = run_training(recipe, recipe_path=None, resume=False, overwrite=True)
        assert result.final["global_step"] == 2
    finally:
        other.kill()
        other.wait()


def test_overwrite_keeps_user_files_inside_the_runs_own_folders(tiny_gpt2, tmp_path):
    """adapter/ and merged/ are the run's, but a file of the user's inside them is not: --overwrite
    refuses, naming it. A merged/ that `lora merge` wrote (its lora_merge.json lists every file) goes."""
    data = write_jsonl(tmp_path / "d.jsonl", completion_rows())
    recipe = tiny_recipe(tiny_gpt2, data, tmp_path / "run", train={"max_steps": 2})
    run = run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root
    (run / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="adapter/notes.txt"):
        run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    (run / "adapter" / "notes.txt").unlink()
    (run / "merged").mkdir()
    (run / "merged" / "model-q4.gguf").write_text("gguf")  # no lora_merge.json: not `lora merge`'s
    with pytest.raises(RunDirError, match="merged/"):
        run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    (run / "merged" / "config.json").write_text("{}")
    (run / "merged" / "lora_merge.json").write_text(json.dumps({"files": ["config.json"]}))
    with pytest.raises(RunDirError, match="merged/model-q4.gguf"):
        run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    assert (run / "merged" / "model-q4.gguf").read_text() == "gguf"
    (run / "merged" / "model-q4.gguf").unlink()
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=True)
    assert result.final["global_step"] == 2 and not (run / "merged").exists()
