"""`lora eval` on a tiny real run: base vs adapter loss, checked against an independent computation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.commands.eval import run as run_eval
from lora_cli.commands.train import run as run_training
from lora_cli.errors import EXIT_USAGE
from tests.helpers import PAIRS, chat_rows, completion_rows, lora_in_process, tiny_recipe, write_jsonl

lora = lora_in_process  # the CLI in-process (tests/helpers.py)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    """32 learnable completion rows, a quarter held out (8 rows: one eval batch)."""
    tmp = tmp_path_factory.mktemp("eval-run")
    data = write_jsonl(tmp / "train.jsonl", completion_rows())
    recipe = tiny_recipe(
        tiny_gpt2, data, tmp / "runs" / "gpt2", data={"val_split": 0.25},
        train={"max_steps": 80, "batch_size": 8, "eval_every": 1000, "save_every": 1000},
    )
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    return result.paths.root


@pytest.fixture(scope="module")
def heldout(run):
    """Rows in the same format: five memorised pairs and one the run never saw."""
    rows = [{"prompt": q + "\n", "completion": a} for q, a in PAIRS[:5]]
    rows.append({"prompt": "Define: cat\n", "completion": "An animal that naps."})
    return write_jsonl(run.parent.parent / "heldout.jsonl", rows), rows


def models(model_dir: Path, adapter: Path):
    """(plain base, base + adapter), loaded with nothing but transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return base, PeftModel.from_pretrained(other, adapter).eval()


def independent_loss(model, tokenizer, rows: list[dict]) -> tuple[float, int]:
    """Token-weighted mean of -log p over the answer tokens (+ EOS), one row at a time."""
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for t in range(len(prompt), ids.shape[1]):  # token t is predicted at position t - 1
            total -= float(logp[t - 1, ids[0, t]])
            count += 1
    return total / count, count


def independent_greedy(model, tokenizer, row: dict) -> str:
    """The greedy answer, at most as long as the reference (+ EOS) and 8 tokens more, as promised."""
    ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
    limit = len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1 + 8
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_eval_on_the_validation_split(run, capsys):
    result = run_eval(run, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert printed == saved == json.loads(json.dumps(result))

    assert set(saved) >= {"base", "adapter", "change", "data"} and "exact_match" not in saved
    for side in ("base", "adapter"):
        assert set(saved[side]) == {"loss", "perplexity"}
        assert saved[side]["perplexity"] == pytest.approx(math.exp(saved[side]["loss"]), rel=1e-12)
    assert saved["adapter"]["loss"] < saved["base"]["loss"]
    change = saved["change"]
    assert change["loss"] == pytest.approx(saved["adapter"]["loss"] - saved["base"]["loss"])
    assert change["loss_percent"] == pytest.approx(100 * change["loss"] / saved["base"]["loss"])
    assert change["perplexity"] < 0
    assert saved["data"]["rows"] == 8 and saved["data"]["supervised_tokens"] > 0
    assert "val_split 0.25" in saved["data"]["source"]

    # The rebuilt split is the one training held out: the Trainer's own final eval loss (one
    # batch of 8 rows, so also token-weighted) is the same number.
    trained = json.loads((run / "run.json").read_text())["final"]["eval_loss"]
    assert saved["adapter"]["loss"] == pytest.approx(trained, abs=1e-4)


def test_eval_numbers_agree_with_an_independent_computation(run, heldout, tiny_gpt2):
    from transformers import AutoTokenizer

    path, rows = heldout
    result = run_eval(run, data=str(path), as_json=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    base, adapted = models(tiny_gpt2, run / "adapter")
    base_loss, count = independent_loss(base, tokenizer, rows)
    adapter_loss, _ = independent_loss(adapted, tokenizer, rows)

    assert result["data"] == {
        "source": str(path),
        "format": "completion",
        "rows": len(rows),
        "supervised_tokens": count,
    }
    assert result["base"]["loss"] == pytest.approx(base_loss, abs=1e-4)
    assert result["adapter"]["loss"] == pytest.approx(adapter_loss, abs=1e-4)
    assert result["adapter"]["perplexity"] == pytest.approx(math.exp(adapter_loss), rel=1e-4)
    assert result["adapter"]["loss"] < result["base"]["loss"]

    # Padding does not change the numbers: one row per batch gives the same result.
    one_by_one = run_eval(run, data=str(path), as_json=True, batch_size=1)
    assert one_by_one["adapter"]["loss"] == pytest.approx(result["adapter"]["loss"], abs=1e-5)
    assert one_by_one["base"]["loss"] == pytest.approx(result["base"]["loss"], abs=1e-5)


def test_exact_match_agrees_with_independent_greedy_answers(run, heldout, tiny_gpt2):
    from transformers import AutoTokenizer

    path, rows = heldout
    result = run_eval(run, data=str(path), exact_match=True, batch_size=4)  # batches of mixed prompt lengths
    em = json.loads((run / "eval.json").read_text())["exact_match"]
    assert em == json.loads(json.dumps(result["exact_match"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    base, adapted = models(tiny_gpt2, run / "adapter")
    for name, model in (("base", base), ("adapter", adapted)):
        answers = [independent_greedy(model, tokenizer, r) for r in rows]
        matches = sum(a == r["completion"].strip() for a, r in zip(answers, rows))
        assert em[name] == {"matches": matches, "rate": matches / len(rows)}
        # Batched, left-padded greedy decoding gives the same answers as one prompt at a time.
        assert [s[name] for s in em["samples"]] == answers[: len(em["samples"])]
    assert em["rows"] == len(rows)
    assert em["adapter"]["rate"] > em["base"]["rate"]
    assert em["change"] == pytest.approx(em["adapter"]["rate"] - em["base"]["rate"])


def test_exact_match_on_chat_data(tmp_path_factory, tiny_llama):
    """Chat rows: the prompt is the conversation up to the last assistant turn, rendered by the template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("eval-chat")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows())
    recipe = tiny_recipe(tiny_llama, data, tmp / "runs" / "chat", train={"max_steps": 30, "save_every": 1000})
    chat_run = run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root
    rows = chat_rows(repeat=1)[:4]
    result = run_eval(chat_run, data=str(write_jsonl(tmp / "heldout.jsonl", rows)), exact_match=True, batch_size=4)
    em = result["exact_match"]
    assert result["data"]["format"] == "chat" and em["rows"] == 4

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), chat_run / "adapter"
    ).eval()
    matches = 0
    for row, sample in zip(rows, em["samples"]):
        user, answer = row["messages"][0], row["messages"][1]["content"]
        prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        assert sample["prompt"] == prompt and sample["reference"] == answer
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        limit = len(tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]) + 8
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=limit,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        greedy = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert sample["adapter"] == greedy
        matches += greedy == answer
    assert em["adapter"]["matches"] == matches


def test_eval_table(run, monkeypatch, capsys):
    code, out, err = lora(monkeypatch, capsys, "eval", run)
    assert code == 0, err
    for word in ("base", "adapter", "change", "loss", "perplexity", "%"):
        assert word in out
    assert "written to" in err and str(run) in err


def test_eval_usage_errors(run, heldout, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = lora(monkeypatch, capsys, "eval")
    assert code == EXIT_USAGE and "no runs found" in err

    code, _, err = lora(monkeypatch, capsys, "eval", run, "--data", "missing.jsonl")
    assert code == EXIT_USAGE and "not found" in err and "hint:" in err

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one two three"}])
    code, _, err = lora(monkeypatch, capsys, "eval", run, "--data", text, "--exact-match")
    assert code == EXIT_USAGE and "--exact-match needs prompts" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = lora(monkeypatch, capsys, "eval", run, "--data", empty)
    assert code == EXIT_USAGE and "--data" in err and "the file is empty" in err and "the list" not in err

    code, _, err = lora(monkeypatch, capsys, "eval", run, "--batch-size", "0")
    assert code == EXIT_USAGE and "--batch-size" in err

    # A run trained without validation data: say how to give some.
    no_val = tmp_path / "runs" / "no-val"
    no_val.mkdir(parents=True)
    (no_val / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace("val_split: 0.25", "val_split: 0.0"))
    (no_val / "adapter").symlink_to(run / "adapter")
    code, out, err = lora(monkeypatch, capsys, "eval", no_val)
    assert code == EXIT_USAGE and "no validation data" in err and "--data FILE" in err
    assert out == "" and "Traceback" not in err
    assert not (no_val / "eval.json").exists()


def test_eval_warns_when_the_data_changed_since_training(run, tmp_path, capsys):
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    rows = completion_rows()
    rows[0] = {"prompt": "Define: new\n", "completion": "Not what was trained on."}
    recipe["data"]["train"] = str(write_jsonl(tmp_path / "changed.jsonl", rows))
    copy = tmp_path / "runs" / "changed"
    copy.mkdir(parents=True)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (copy / "run.json").write_text((run / "run.json").read_text())
    (copy / "adapter").symlink_to(run / "adapter")
    run_eval(copy)
    assert "changed since training" in capsys.readouterr().err


def test_cli_eval_json(run, heldout, tmp_path):
    path, rows = heldout
    result = subprocess.run(
        [sys.executable, "-m", "lora_cli", "eval", str(run), "--data", str(path), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["data"]["rows"] == len(rows)
    assert printed["adapter"]["loss"] < printed["base"]["loss"]
    assert f"run: {run}" in result.stderr


def test_eval_that_cannot_write_eval_json_says_so_and_keeps_the_numbers(run, tmp_path, monkeypatch, capsys):
    """A run directory that cannot take eval.json is refused before any work (exit 2); a write that
    fails at the end (disk full) still shows the numbers, then exits 1: never a traceback."""
    import errno
    import shutil

    import lora_cli.commands.eval

    copy = tmp_path / "runs" / "copy"
    copy.mkdir(parents=True)
    for name in ("recipe.yaml", "run.json"):
        shutil.copy(run / name, copy / name)
    (copy / "adapter").symlink_to(run / "adapter")

    (copy / "eval.json").mkdir()
    code, out, err = lora(monkeypatch, capsys, "eval", copy)
    assert code == EXIT_USAGE and f"cannot write {copy / 'eval.json'}: it is a directory" in err, err
    assert out == "" and "run:" not in err and "Traceback" not in err
    (copy / "eval.json").rmdir()

    before = {"loss": 1.0}
    (copy / "eval.json").write_text(json.dumps(before))

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lora_cli.commands.eval, "atomic_write_json", disk_full)
    code, out, err = lora(monkeypatch, capsys, "eval", copy)
    assert code == 1, err
    assert "perplexity" in out and "adapter" in out  # the table, all the same
    assert f"cannot write {copy / 'eval.json'}: No space left on device" in err and "hint:" in err
    assert "Traceback" not in err
    assert json.loads((copy / "eval.json").read_text()) == before
