"""`lora merge` on tiny real runs: LoRA (Llama, chat) and QLoRA (GPT-2, Conv1D layers in 4 bits)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.commands.merge import run as run_merge
from lora_cli.errors import EXIT_RUNTIME, EXIT_USAGE, MergeError, RunDirError
from tests.helpers import (
    chat_rows,
    completion_rows,
    copy_run,
    lora_in_process,
    train_tiny_run,
    without_cpu_bf16_repacking,
)

REPO = Path(__file__).resolve().parent.parent
lora = lora_in_process  # the CLI in-process (tests/helpers.py)
train = train_tiny_run
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama):
    tmp = tmp_path_factory.mktemp("merge-runs")
    short = {"max_steps": 20, "save_every": 1000}
    return {
        "lora": train(tmp, "llama-chat", tiny_llama, chat_rows(), train=short),
        "qlora": train(tmp, "gpt2-qlora", tiny_gpt2, completion_rows(), train=short, model={"quantization": "4bit"}),
        "gpt2": tiny_gpt2,
        "llama": tiny_llama,
    }



def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(["Define: fox\nA quick brown animal. Define: paris\nThe capital"], return_tensors="pt").input_ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def base_plus_adapter(model_dir: Path, adapter: Path, *, four_bit: bool = False):
    """The unmerged reference, built with nothing but transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return PeftModel.from_pretrained(without_cpu_bf16_repacking(base), adapter)


def load_plain(directory: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_plain_model_dir(directory: Path) -> None:
    names = {p.name for p in directory.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not names & PEFT_FILES, names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())


def test_merge_lora_matches_base_plus_adapter(runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path)
    result = run_merge(run)
    merged_dir = run / "merged"
    assert result.output == merged_dir and result.onto is None and result.dtype == "float32"
    assert result.max_diff <= result.tolerance
    assert_plain_model_dir(merged_dir)

    ids = probe_ids(runs["llama"])
    reference = logits(base_plus_adapter(runs["llama"], run / "adapter"), ids)
    merged = load_plain(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits(merged, ids) - reference).abs().max() < 1e-4
    # The adapter did something, so the comparison means something.
    assert (logits(load_plain(runs["llama"]), ids) - reference).abs().max() > 1e-3

    # The tokenizer travels with the model, chat template included.
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(runs["llama"])
    saved = AutoTokenizer.from_pretrained(merged_dir)
    assert saved.chat_template == original.chat_template and saved.chat_template
    assert saved.eos_token == original.eos_token


def test_merge_refuses_to_overwrite_and_is_idempotent(runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path)
    run_merge(run)
    weights = run / "merged" / "model.safetensors"
    first = sha256(weights)
    with pytest.raises(RunDirError, match="already exists") as info:
        run_merge(run)
    assert "--overwrite" in info.value.hint
    assert sha256(weights) == first
    run_merge(run, overwrite=True)
    assert sha256(weights) == first  # the same inputs give the same bytes
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # Never over the run or its adapter, and never over a directory that is not a model.
    for bad in (run / "adapter", run, run.parent):
        with pytest.raises(RunDirError, match="would replace the run"):
            run_merge(run, output=bad, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a model written by `lora merge`"):
        run_merge(run, output=other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


def tree_digest(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_never_replaces_the_base_model_or_a_model_it_did_not_write(runs, tmp_path, monkeypatch, capsys):
    """--overwrite replaces an earlier merge output only: not the run's own base model (the run would
    then load base + adapter folded twice), nor any other model, nor files a user put beside it."""
    import yaml

    base = tmp_path / "models" / "my-llama"
    shutil.copytree(runs["llama"], base)
    (base / "NOTES.txt").write_text("my notes")
    run = copy_run(runs["lora"], tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(base)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = tree_digest(base)

    other_model = tmp_path / "models" / "gpt2"  # a model directory, but no merge wrote it
    shutil.copytree(runs["gpt2"], other_model)
    (run / "checkpoints").mkdir()
    for output, message in [
        (base, "would replace the run's base model"),
        (base.parent, "would replace the run's base model"),
        (run / "checkpoints" / "m", "would replace the run"),
        (run / "adapter" / "m", "would replace the run"),
        (other_model, "is not a model written by `lora merge`"),
    ]:
        code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", output, "--overwrite")
        assert code == EXIT_USAGE, (output, err)
        assert message in err and "hint:" in err and "Traceback" not in err, (output, err)
    assert tree_digest(base) == before
    assert (other_model / "config.json").is_file() and not (run / "checkpoints" / "m").exists()

    # Its own output is recognised by the marker listing what it wrote...
    out_dir = tmp_path / "merged"
    run_merge(run, output=out_dir)
    marker = json.loads((out_dir / "lora_merge.json").read_text())
    assert set(marker["files"]) | {"lora_merge.json"} == {p.name for p in out_dir.iterdir()}
    run_merge(run, output=out_dir, overwrite=True)
    # ...and a file the user added there is not deleted.
    (out_dir / "eval-notes.md").write_text("mine")
    code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", out_dir, "--overwrite")
    assert code == EXIT_USAGE and "eval-notes.md" in err and "did not write" in err
    assert (out_dir / "eval-notes.md").read_text() == "mine"
    # A merge written before the marker existed is still recognised by its model card.
    (out_dir / "eval-notes.md").unlink()
    (out_dir / "lora_merge.json").unlink()
    run_merge(run, output=out_dir, overwrite=True)
    assert (out_dir / "lora_merge.json").is_file()


def test_merge_bfloat16(runs, tmp_path):
    run = copy_run(runs["lora"], tmp_path)
    out = tmp_path / "merged-bf16"
    result = run_merge(run, dtype="bfloat16", output=out)
    assert result.dtype == "bfloat16" and 0 < result.saved_max_diff <= result.tolerance
    merged = load_plain(out, dtype=None)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids = probe_ids(runs["llama"])
    reference = logits(base_plus_adapter(runs["llama"], run / "adapter"), ids)
    diff = (logits(merged, ids) - reference).abs().max()
    assert 0 < diff <= result.tolerance  # rounded, but within the promised tolerance


def test_merge_qlora_folds_into_the_dequantized_base(runs, tmp_path):
    run = copy_run(runs["qlora"], tmp_path)
    result = run_merge(run)
    assert result.onto == "quantized"
    merged_dir = run / "merged"
    assert_plain_model_dir(merged_dir)

    ids = probe_ids(runs["gpt2"])
    merged = logits(load_plain(merged_dir), ids)  # plain GPT-2: Conv1D weights in their own layout
    as_trained = logits(base_plus_adapter(runs["gpt2"], run / "adapter", four_bit=True), ids)
    on_original = logits(base_plus_adapter(runs["gpt2"], run / "adapter"), ids)
    # It reproduces exactly what was trained (the 4-bit base + adapter)...
    assert (merged - as_trained).abs().max() < 1e-4
    # ...which is measurably not the original full-precision base + adapter.
    assert (merged - on_original).abs().max() > 1e-3


def test_merge_qlora_onto_original(runs, tmp_path, capsys):
    run = copy_run(runs["qlora"], tmp_path)
    out = tmp_path / "onto-original"
    result = run_merge(run, onto="original", output=out)
    assert result.onto == "original"
    err = capsys.readouterr().err
    assert "--onto original" in err and "differs from what was trained" in err
    assert_plain_model_dir(out)

    ids = probe_ids(runs["gpt2"])
    merged = logits(load_plain(out), ids)
    on_original = logits(base_plus_adapter(runs["gpt2"], run / "adapter"), ids)
    assert (merged - on_original).abs().max() < 1e-4


def test_merge_refuses_non_finite_weights_and_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    run = copy_run(runs["lora"], tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)

    code, out, err = lora(monkeypatch, capsys, "merge", run)
    assert code == EXIT_RUNTIME, err
    assert "non-finite" in err and "nothing was saved" in err and "hint:" in err
    assert "Traceback" not in err
    assert not (run / "merged").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    with pytest.raises(MergeError):
        run_merge(run)


def test_merge_usage_errors(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = lora(monkeypatch, capsys, "merge")
    assert code == EXIT_USAGE and "no runs found" in err and "lora train" in err

    run = copy_run(runs["lora"], tmp_path)
    code, _, err = lora(monkeypatch, capsys, "merge", run, "--dtype", "float64")
    assert code == EXIT_USAGE and "--dtype float64" in err and "bfloat16" in err
    code, _, err = lora(monkeypatch, capsys, "merge", run, "--onto", "nowhere")
    assert code == EXIT_USAGE and "--onto" in err

    shutil.rmtree(run / "adapter")  # an unfinished run
    code, _, err = lora(monkeypatch, capsys, "merge", run)
    assert code == EXIT_USAGE and "no finished adapter" in err and "--resume" in err
    code, _, err = lora(monkeypatch, capsys, "merge", tmp_path / "runs" / "missing")
    assert code == EXIT_USAGE and "does not exist" in err
    assert "Traceback" not in err


def test_cli_merge_latest_run(runs, tmp_path):
    """`lora merge` with no RUN: the latest run in ./runs, said on stderr; exit 0."""
    run = copy_run(runs["qlora"], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lora_cli", "merge"], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=ENV
    )
    assert result.returncode == 0, result.stderr
    assert f"using the latest run: runs/{run.name}" in result.stderr
    assert "verify: max |logits(merged) - logits(4bit base + adapter, as trained)|" in result.stdout
    assert "merged model saved to runs/" in result.stdout
    assert_plain_model_dir(run / "merged")
    again = subprocess.run(
        [sys.executable, "-m", "lora_cli", "merge", f"runs/{run.name}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=ENV,
    )
    assert again.returncode == EXIT_USAGE
    assert "already exists" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_merge_overwrite_keeps_user_files_in_a_merge_without_a_valid_marker(runs, tmp_path, monkeypatch, capsys):
    """A merge made before lora_merge.json existed (or whose marker is damaged) is recognised by its
    model card, but which files it wrote is unknown: anything a merge does not write is the user's."""
    run = copy_run(runs["lora"], tmp_path)
    out_dir = tmp_path / "older-merge"
    run_merge(run, output=out_dir)
    (out_dir / "NOTES.txt").write_text("my notes")
    (out_dir / "gguf").mkdir()
    (out_dir / "gguf" / "model.gguf").write_text("x")
    capsys.readouterr()
    for marker in (None, "{bad", '{"files": "README.md"}'):
        if marker is None:
            (out_dir / "lora_merge.json").unlink()
        else:
            (out_dir / "lora_merge.json").write_text(marker)
        code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", out_dir, "--overwrite")
        assert code == EXIT_USAGE, (marker, err)
        assert "did not write" in err and "NOTES.txt" in err and "gguf/" in err and "Traceback" not in err, err
        assert "verify:" not in out
        assert (out_dir / "NOTES.txt").read_text() == "my notes" and (
            out_dir / "gguf" / "model.gguf"
        ).read_text() == "x"
    # Once they are moved out, the older merge is replaced as before.
    (out_dir / "NOTES.txt").unlink()
    shutil.rmtree(out_dir / "gguf")
    run_merge(run, output=out_dir, overwrite=True)
    assert json.loads((out_dir / "lora_merge.json").read_text())["files"]


def test_merge_refuses_an_output_it_cannot_write_before_any_work(runs, tmp_path, monkeypatch, capsys):
    import transformers

    run = copy_run(runs["lora"], tmp_path)
    (tmp_path / "afile").write_text("a file")
    for output, message in [
        (tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file, not a directory"),
        (tmp_path / "afile" / "a" / "b", f"{tmp_path / 'afile'} is a file, not a directory"),
        (Path("/proc/lora-merged-x"), "cannot create anything in /proc"),
    ]:
        code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", output)
        assert code == EXIT_USAGE, (output, err)
        assert f"cannot write --output {output}: " in err and message in err and "hint:" in err, err
        assert "Traceback" not in err and out == ""  # refused before loading or verifying anything
    assert (tmp_path / "afile").read_text() == "a file"

    # A write that fails at the end (disk full): exit 1 with a message, the old merge kept, no leftovers.
    out_dir = tmp_path / "out" / "merged"
    run_merge(run, output=out_dir)
    before = tree_digest(out_dir)
    capsys.readouterr()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(args[0]) if args else None)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", out_dir, "--overwrite")
    assert code == EXIT_RUNTIME, err
    assert f"saving the merged model to {out_dir} failed: No space left on device" in err and "Traceback" not in err
    assert tree_digest(out_dir) == before
    assert [p.name for p in out_dir.parent.iterdir()] == ["merged"]


def test_merge_never_writes_inside_the_base_model_directory(runs, tmp_path, monkeypatch, capsys):
    import yaml

    base = tmp_path / "models" / "my-llama"
    shutil.copytree(runs["llama"], base)
    run = copy_run(runs["lora"], tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(base)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = tree_digest(base)
    names = {p.name for p in base.iterdir()}
    for output in (base / "sub", base / "a" / "b"):
        code, out, err = lora(monkeypatch, capsys, "merge", run, "-o", output)
        assert code == EXIT_USAGE, err
        assert "is inside the run's base model directory" in err and "hint:" in err and "Traceback" not in err
    assert tree_digest(base) == before and {p.name for p in base.iterdir()} == names


def test_merge_overwrite_refuses_a_merge_another_run_trained_on(runs, tmp_path, monkeypatch, capsys):
    """runs/B was trained on runs/A/merged: re-merging A over it would change B's base under B."""
    from tests.helpers import chat_rows

    run_a = copy_run(runs["lora"], tmp_path)
    run_merge(run_a)
    run_b = train(tmp_path, "on-merged", run_a / "merged", chat_rows(1), train={"max_steps": 2, "save_every": 1000})
    before = tree_digest(run_a / "merged")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (tmp_path, elsewhere):  # found under ./runs and beside run A
        monkeypatch.chdir(cwd)
        code, out, err = lora(monkeypatch, capsys, "merge", run_a, "--overwrite")
        assert code == EXIT_USAGE, err
        assert f"is the base model of run {run_b}" in err and "--output" in err and "Traceback" not in err, err
    assert tree_digest(run_a / "merged") == before
    # Another output is fine.
    run_merge(run_a, output=tmp_path / "merged-2")
