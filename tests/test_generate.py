"""`lora generate` on tiny real runs: greedy = model.generate, adapter on/off, streaming, JSON, stdin."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.commands.generate import run as run_generate
from lora_cli.errors import EXIT_USAGE
from tests.helpers import chat_rows, completion_rows, lora_in_process, train_tiny_run

lora = lora_in_process  # the CLI in-process (tests/helpers.py)
train = train_tiny_run
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPT = "Define: fox\n"  # a prompt the run memorised ("A quick brown animal.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama):
    tmp = tmp_path_factory.mktemp("generate-runs")
    return {
        "plain": train(
            tmp, "gpt2-completion", tiny_gpt2, completion_rows(), train={"max_steps": 80, "save_every": 1000}
        ),
        "chat": train(
            tmp,
            "llama-chat",
            tiny_llama,
            chat_rows(),
            train={"max_steps": 20, "save_every": 1000},
            data={"system_prompt": "You are terse."},
        ),
        "gpt2": tiny_gpt2,
        "llama": tiny_llama,
    }


def reference_greedy(model_dir: Path, adapter: Path | None, ids: list[int], max_new_tokens: int) -> str:
    """model.generate on base (+ adapter), built with nothing but transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def gpt2_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


class Recorder(io.StringIO):
    """stdout that remembers every write, to see tokens arrive one piece at a time."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_greedy_equals_model_generate_and_base_differs(runs):
    ids = gpt2_ids(runs["gpt2"], PROMPT)
    out = io.StringIO()
    [adapter] = run_generate(PROMPT, run=runs["plain"], temperature=0, max_new_tokens=12, stream=False, stdout=out)
    expected = reference_greedy(runs["gpt2"], runs["plain"] / "adapter", ids, 12)
    assert adapter["output"] == expected
    assert out.getvalue() == expected + "\n"  # --no-stream: only the generated text
    assert adapter["adapter"] is True and adapter["tokens"] >= 1
    assert "quick brown" in adapter["output"]  # it learned the pattern

    [base] = run_generate(
        PROMPT, run=runs["plain"], base=True, temperature=0, max_new_tokens=12, stream=False, stdout=io.StringIO()
    )
    assert base["output"] == reference_greedy(runs["gpt2"], None, ids, 12)
    assert base["adapter"] is False
    assert base["output"] != adapter["output"]


def test_streaming_prints_the_same_text_as_no_stream(runs):
    streamed, plain = Recorder(), io.StringIO()
    run_generate(PROMPT, run=runs["plain"], temperature=0, max_new_tokens=12, stdout=streamed)
    run_generate(PROMPT, run=runs["plain"], temperature=0, max_new_tokens=12, stream=False, stdout=plain)
    assert streamed.getvalue() == plain.getvalue()
    assert len([w for w in streamed.writes if w]) > 2  # piece by piece, not all at the end


def test_sampling_with_a_seed_is_repeatable(runs):
    def sample(seed):
        [r] = run_generate(
            PROMPT,
            run=runs["plain"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            seed=seed,
            max_new_tokens=16,
            as_json=True,
            stdout=io.StringIO(),
        )
        return r["output"]

    first = sample(3)
    assert sample(3) == first
    assert len({sample(s) for s in (4, 5, 6)} | {first}) > 1  # it really samples


def test_json_and_prompts_from_stdin_and_file(runs, tmp_path, monkeypatch, capsys):
    code, out, err = lora(
        monkeypatch,
        capsys,
        "generate",
        "-",
        "--run",
        runs["plain"],
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        stdin="Define: fox\n\nDefine: dog\n",
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["Define: fox", "Define: dog"]
    for r in lines:
        assert set(r) >= {"prompt", "output", "model", "adapter", "tokens", "seconds"}
        assert r["adapter"] is True and r["model"] == str(runs["gpt2"]) and 1 <= r["tokens"] <= 6
    assert "run:" in err and "adapter on" in err

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Define: fox\nDefine: paris\n")
    code, out, err = lora(
        monkeypatch,
        capsys,
        "generate",
        "--file",
        prompts,
        "--run",
        runs["plain"],
        "--base",
        "--json",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["Define: fox", "Define: paris"]
    assert all(r["adapter"] is False for r in lines)


def test_model_flag_runs_a_merged_model_like_the_adapter(runs, tmp_path):
    from lora_cli.commands.merge import run as run_merge

    merged = tmp_path / "merged"
    run_merge(runs["plain"], output=merged)
    [via_run] = run_generate(
        PROMPT, run=runs["plain"], temperature=0, max_new_tokens=12, stream=False, stdout=io.StringIO()
    )
    [via_model] = run_generate(
        PROMPT, model=str(merged), temperature=0, max_new_tokens=12, stream=False, stdout=io.StringIO()
    )
    assert via_model["output"] == via_run["output"]
    assert via_model["adapter"] is False and via_model["model"] == str(merged)


def test_chat_run_uses_the_chat_template(runs, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs["llama"])
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Define: fox"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    [r] = run_generate(
        "Define: fox", run=runs["chat"], temperature=0, max_new_tokens=12, stream=False, stdout=io.StringIO()
    )
    assert r["output"] == reference_greedy(runs["llama"], runs["chat"] / "adapter", ids, 12)
    assert "prompt format: chat template" in capsys.readouterr().err
    run_generate(
        "Define: fox",
        run=runs["chat"],
        chat=False,
        temperature=0,
        max_new_tokens=12,
        stream=False,
        stdout=io.StringIO(),
    )
    assert "prompt format: plain text" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["hi", "--run", "RUN", "--model", "x"], "--run and --model cannot be used together"),
        (["hi", "--model", "GPT2", "--base"], "--model has no adapter"),
        (["--run", "RUN"], "no prompt given"),
        (["hi", "--file", "missing.txt", "--run", "RUN"], "give either PROMPT or --file"),
        (["--file", "missing.txt", "--run", "RUN"], "prompt file not found"),
        (["--file", ".", "--run", "RUN"], "--file . is a directory, not a prompt file"),
        (["", "--run", "RUN", "--temperature", "0"], "the prompt is empty"),  # plain text: no tokens at all
        (["  ", "--run", "RUN"], "the prompt is empty"),
        (["hi", "--run", "RUN", "--temperature", "-1"], "--temperature must be 0"),
        (["hi", "--run", "RUN", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["hi", "--run", "RUN", "--chat"], "has no chat template"),
        (["hi", "--model", "RUN"], "is a run directory, not a model"),
        (["hi", "--run", "nowhere"], "does not exist"),
        (["hi", "--model", "./no/such/model"], "--model: ./no/such/model is not an existing path"),
        (["hi"], "no runs found"),
    ],
)
def test_generate_usage_errors(args, message, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./runs here
    args = [str(runs["plain"]) if a == "RUN" else str(runs["gpt2"]) if a == "GPT2" else a for a in args]
    code, out, err = lora(monkeypatch, capsys, "generate", *args)
    assert code == EXIT_USAGE, err
    assert message in err and "hint:" in err and "Traceback" not in err
    assert out == ""


def test_long_generations_stop_at_the_context_length(runs, capsys):
    [r] = run_generate(
        "Define: dog\n",
        run=runs["plain"],
        base=True,
        temperature=0,
        max_new_tokens=1000,
        stream=False,
        stdout=io.StringIO(),
    )
    assert r["tokens"] <= 256 - 4  # the tiny GPT-2 has 256 positions
    assert "note: generating at most" in capsys.readouterr().err


def test_run_without_adapter_is_refused(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "unfinished"
    run.mkdir(parents=True)
    shutil.copy(runs["plain"] / "recipe.yaml", run / "recipe.yaml")
    code, _, err = lora(monkeypatch, capsys, "generate", "hi", "--run", run)
    assert code == EXIT_USAGE and "no finished adapter" in err


def test_cli_generate_latest_run(runs, tmp_path):
    """The real command line in a subprocess: latest run, generated text alone on stdout."""
    shutil.copytree(runs["plain"], tmp_path / "runs" / "gpt2-completion", ignore=shutil.ignore_patterns("checkpoints"))
    result = subprocess.run(
        [sys.executable, "-m", "lora_cli", "generate", PROMPT, "--temperature", "0", "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    expected = reference_greedy(runs["gpt2"], runs["plain"] / "adapter", gpt2_ids(runs["gpt2"], PROMPT), 12)
    assert result.stdout == expected + "\n"
    assert "using the latest run: runs/gpt2-completion" in result.stderr and "adapter on" in result.stderr
