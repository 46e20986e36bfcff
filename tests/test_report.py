"""`lora validate` / `train --dry-run`: marked recipe, data report, preview, warnings, estimate."""

from __future__ import annotations

import pytest

from lora_cli.data import stats as datastats
from lora_cli.data.prepare import prepare_data
from lora_cli.recipe.load import load_recipe
from lora_cli.recipe.schema import DataConfig
from lora_cli.recipe.show import dump_recipe_marked, recipe_origins
from tests.helpers import completion_rows, lora_in_process, write_jsonl

LONG = {"prompt": "Define: long\n", "completion": " ".join(["the quick brown fox"] * 20)}


@pytest.fixture(scope="module")
def report_recipe(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    rows = completion_rows(2)
    rows.insert(2, LONG)  # file row 3 (line 3): longer than max_length
    data = write_jsonl(tmp / "train.jsonl", rows)
    recipe = tmp / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}, max_length: 32}}\n")
    return recipe


def test_validate_prints_marked_recipe_report_preview_and_estimate(report_recipe, monkeypatch, capsys):
    code, out, err = lora_in_process(
        monkeypatch, capsys, "validate", report_recipe, "train.batch_size=4", "--preview", "1"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("  max_length: 32") and line.endswith("# recipe") for line in lines)
    assert any(line.startswith("  batch_size: 4") and line.endswith("# override") for line in lines)
    assert any(line.startswith("  r: 16") and line.endswith("# default") for line in lines)
    assert "lengths (tokens, before truncation): min" in out and "p95" in out
    assert any("|#" in line for line in lines)  # the histogram
    assert any("> max_length" in line for line in lines)  # bins beyond max_length are marked
    assert "truncated 1 of 17 rows" in out
    assert "truncated: " in out and "row 3 (line 3)" in out  # names the row
    assert "supervised" in out
    # pad == EOS here, but labels keep EOS: reported, not warned about.
    assert "EOS '<|endoftext|>' is supervised in 16 of 17 examples" in out
    assert "warning:" not in out
    assert "padding:" in out and "data.packing: true would leave" in out
    # preview: prompt masked, answer trained on (plain markers when not a terminal)
    assert "[masked]Define: fox\n[/]A quick brown animal.<|endoftext|>" in out
    assert "trainable LoRA parameters" in out and "QLoRA" in out


def test_dry_run_is_validate(report_recipe, monkeypatch, capsys):
    code, out, err = lora_in_process(monkeypatch, capsys, "train", report_recipe, "--dry-run", "--preview", "0")
    assert code == 0, err
    assert "recipe: valid" in out and "lengths (tokens" in out and "[masked]" not in out


def test_max_length_beyond_context_warns_or_stops(report_recipe, tiny_llama, monkeypatch, capsys):
    # RoPE (Llama): positions past the context compute, untrained: a warning
    code, out, err = lora_in_process(
        monkeypatch,
        capsys,
        "validate",
        report_recipe,
        f"model.name={tiny_llama}",
        "data.max_length=1000",
        "--preview",
        "0",
    )
    assert code == 0, err
    assert "warning: data.max_length 1000 is beyond the model's context of 256 tokens" in out
    assert "data.max_length=256" in out  # the fix
    # learned positions (GPT-2): a longer row cannot run at all, as `lora train` says too
    code, out, err = lora_in_process(
        monkeypatch, capsys, "validate", report_recipe, "data.max_length=1000", "--preview", "0"
    )
    assert code == 2 and "data.max_length: 1000 is beyond the model's context of 256 tokens (n_positions)" in err
    assert "data.max_length=256" in err and "Traceback" not in err


def test_chat_data_without_template_is_an_error_with_fix(tiny_gpt2, tmp_path, monkeypatch, capsys):
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}, max_length: 64}}\n")
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", recipe)
    assert code == 2 and "no chat template" in err.replace("has none", "no chat template") and "hint:" in err
    assert "Traceback" not in err


def test_missing_eos_is_warned_only_when_it_happens(tmp_path, llama_tokenizer, gpt2_tokenizer):
    """Conversations that end on a user turn never supervise EOS (ChatML's end-of-turn is not
    GPT-2's EOS): a warning with a fix. The Llama tokenizer, whose EOS is the end-of-turn, is fine."""
    from tests.tiny import CHATML_TEMPLATE

    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "bye"},
            ]
        }
    ] * 3
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    gpt2_chat = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    gpt2_chat.chat_template = CHATML_TEMPLATE
    gpt2_chat.pad_token = gpt2_chat.eos_token
    report = prepare_data(DataConfig(train=str(path), format="chat"), gpt2_chat, seed=0).report
    assert report.pad_is_eos and report.eos_supervised == 0
    assert len(report.warnings) == 1 and "3 of 3 examples have no supervised EOS" in report.warnings[0]
    assert "Fix:" in report.warnings[0]
    assert any(line.startswith("warning: 3 of 3") for line in report.lines())
    ok = prepare_data(DataConfig(train=str(path), format="chat"), llama_tokenizer, seed=0).report
    assert ok.warnings == [] and ok.eos_supervised == 3


def test_recipe_origins_and_marks(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora: {r: 4}\ndata: {max_length: 64}\n")
    origins = recipe_origins(path, ["data.max_length=128", "train.lr=1e-3"])
    assert origins == {"lora.r": "recipe", "data.max_length": "override", "train.lr": "override"}
    lines = dump_recipe_marked(load_recipe(path, ["data.max_length=128", "train.lr=1e-3"]), origins)
    assert "  max_length: 128" in [line.split("#")[0].rstrip() for line in lines]
    assert any(line.startswith("output_dir: runs/r") and line.endswith("# default (runs/<recipe name>)")
               for line in lines)


def test_datastats():
    assert datastats.summary([5, 1, 3, 2, 4]) == {"min": 1, "median": 3, "p95": 5, "max": 5}
    assert datastats.summary([]) == {}
    hist = datastats.histogram([1, 2, 9, 10, 16], max_length=8, bins=4)
    assert hist == [[1, 4, 2], [5, 8, 0], [9, 12, 2], [13, 16, 1]]
    lines = datastats.histogram_lines(hist, 8)
    assert lines[2].endswith("2  > max_length") and "#" not in lines[1]
    # a bin that straddles max_length says so: some of its rows are cut
    assert datastats.histogram_lines(hist, 10)[2].endswith("2  partly > max_length")
    assert not datastats.histogram_lines(hist, 12)[2].endswith("max_length")
    # whatever the shuffle, the 2 shares a batch with a 10: 8 padded of 40
    assert datastats.batch_padding([10, 10, 10, 2], 2, seed=0) == pytest.approx(0.2)
    assert datastats.batch_padding([4, 4, 4, 4], 2, seed=0) == 0.0


def test_train_prints_marked_recipe_before_loading_and_training(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """A real `lora train` (and its resume) prints the resolved recipe, each value marked as
    `lora validate` marks it, once, after the run directory is open and before the model loads."""
    import sys

    data = write_jsonl(tmp_path / "train.jsonl", completion_rows(1))
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_gpt2}, dtype: float32}}\ndata: {{train: {data}, max_length: 32}}\n"
        f"train: {{batch_size: 4, log_every: 1, save_every: 2}}\noutput_dir: {run}\n"
    )
    monkeypatch.setattr(sys, "stderr", sys.stdout)  # step lines go to stderr: one stream keeps the order

    def marked(out: str) -> list[str]:
        lines = out.splitlines()
        head = [n for n, line in enumerate(lines) if line.startswith("recipe (resolved; lora validate ")]
        assert len(head) == 1, out  # once
        first_step = next((n for n, line in enumerate(lines) if line.startswith("step ")), len(lines))
        model = next(n for n, line in enumerate(lines) if line.startswith("model: "))  # printed before the weights load
        assert head[0] < model < first_step
        return lines[head[0] : model]

    code, out, _ = lora_in_process(monkeypatch, capsys, "train", recipe, "train.max_steps=2")
    assert code == 0, out
    block = marked(out)
    assert any(line.startswith("  max_steps: 2") and line.endswith("# override") for line in block)
    assert any(line.startswith("  max_length: 32") and line.endswith("# recipe") for line in block)
    assert any(line.startswith("  r: 16") and line.endswith("# default") for line in block)
    assert "adapter saved to" in out

    assert any(line.startswith("step ") for line in out.splitlines())

    # Resuming the run directory: its saved recipe.yaml sets every value; the override (a
    # cadence, which resume allows) is marked. (A completed run has nothing to resume: without
    # its adapter it is a run stopped while saving it, which redoes its last steps.)
    import shutil

    shutil.rmtree(run / "adapter")
    code, out, _ = lora_in_process(monkeypatch, capsys, "train", run, "--resume", "train.log_every=2")
    assert code == 0, out
    block = marked(out)
    assert any(line.startswith("  log_every: 2") and line.endswith("# override") for line in block)
    assert any(line.startswith("  r: 16") and line.endswith("# recipe") for line in block)


def test_preview_labels_each_example_with_its_own_row(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """A row with nothing to train on gives no example: the ones after it keep their own labels."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "the last row"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}, format: text, max_length: 64}}\n")
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", recipe, "--preview", "3")
    assert code == 0, err
    labels = [line for line in out.splitlines() if line.startswith("--- ")]
    assert [label.split(",")[0] for label in labels] == [f"--- {data} row 1 (line 1)", f"--- {data} row 3 (line 3)"]
    assert out.index("row 3 (line 3), ") < out.index("he last row")  # (the first token is never trained on)


def test_settings_that_cannot_act_are_said(report_recipe, monkeypatch, capsys):
    code, out, err = lora_in_process(
        monkeypatch, capsys, "validate", report_recipe, "train.eval_every=2", "--preview", "0"
    )
    assert code == 0, err
    assert "note: train.eval_every is set but there is no validation data" in out
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", report_recipe, "--preview", "0")
    assert "note:" not in out
