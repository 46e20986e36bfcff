"""Bad input through the real command line: one short message naming the file / key / row, a hint
with the fix, the documented exit code, and never a traceback.

Every case is a real `python -m lora_cli` subprocess. Most fail before torch is imported; the
cases that need a tokenizer (data problems) use the tiny models. Cases run two at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import completion_rows


def _recipe(body: str = "", *, model: str = "{model}", data: str = "{tmp}/good.jsonl") -> str:
    """A valid recipe with `body` appended: YAML merges nothing, so a body repeats no section."""
    head = f"model:\n  name: {model}\ndata:\n  train: {data}\n  max_length: 64\n"
    return head + body


@dataclass
class Case:
    id: str
    args: list[str]  # after `python -m lora_cli`; {tmp}, {model}, {chat_model} are filled in
    code: int
    expect: list[str]  # each must appear in stderr (after filling in placeholders)
    files: dict[str, str | bytes] = field(default_factory=dict)  # name under tmp -> content
    env: dict[str, str] = field(default_factory=dict)


def R(id, recipe_text, code, expect, *extra, files=None, command="validate", env=None):
    """A case that runs `lora COMMAND {tmp}/ID.yaml EXTRA...` on `recipe_text`."""
    files = dict(files or {})
    files[f"{id}.yaml"] = recipe_text
    return Case(id, [command, f"{{tmp}}/{id}.yaml", *extra], code, expect, files, env or {})


GOOD_ROWS = "".join(json.dumps(r) + "\n" for r in completion_rows(repeat=1))

CASES = [
    # ---- the recipe file itself
    R(
        "malformed-yaml",
        "model:\n  name: x\n data: [1,\n",
        2,
        ["malformed-yaml.yaml", "malformed YAML: line 3, column", "hint: Fix the YAML syntax"],
    ),
    R("tab-indent", "model:\n\tname: x\n", 2, ["tab-indent.yaml", "line 2", "hint:"]),
    R(
        "not-a-mapping",
        "- just\n- a list\n",
        2,
        ["not-a-mapping.yaml", "must be a mapping of sections", "hint: Start from"],
    ),
    R(
        "python-tag",
        "model:\n  name: !!python/object/apply:os.getcwd []\n",
        2,
        ["python-tag.yaml", "line 2", "not allowed", "remove the !!tag"],
    ),
    Case("recipe-missing", ["validate", "{tmp}/nope.yaml"], 2, ["nope.yaml", "does not exist", "hint: Check the path"]),
    Case("recipe-is-dir", ["validate", "{tmp}"], 2, ["is a directory, not a recipe file"]),
    R(
        "recipe-not-utf8",
        b"model:\n  name: caf\xe9\n",
        2,
        ["recipe-not-utf8.yaml", "not UTF-8", "hint: Save the recipe as UTF-8"],
    ),
    # ---- keys and types
    R(
        "unknown-section",
        _recipe("trian:\n  lr: 1.0\n"),
        2,
        ["unknown-section.yaml", "line 6", "trian", "did you mean 'train'"],
    ),
    R("unknown-key", _recipe("train:\n  learning_rat: 1.0e-4\n"), 2, ["line 7", "learning_rat", "hint:"]),
    R("close-key", _recipe("lora:\n  alpah: 8\n"), 2, ["line 7", "alpah", "did you mean 'alpha'"]),
    R(
        "wrong-type-int",
        _recipe("lora:\n  r: eight\n"),
        2,
        ["line 7", "'lora.r' must be an integer, got 'eight'", "hint:"],
    ),
    R(
        "wrong-type-bool",
        _recipe().replace("  max_length: 64\n", "  max_length: 64\n  packing: sometimes\n"),
        2,
        ["line 6", "'data.packing' must be true or false", "hint:"],
    ),
    R("wrong-choice", _recipe("lora:\n  bias: some\n"), 2, ["line 7", "'lora.bias' must be one of 'none'", "hint:"]),
    R(
        "wrong-list-item",
        _recipe("train:\n  report_to: [slack]\n  epochs: 0\n"),
        2,
        [
            "2 problems",
            "line 7: 'train.report_to' must be a list of one of 'tensorboard'",
            "line 8: 'train.epochs' must be > 0",
        ],
    ),
    # ---- values out of range and incompatible options
    R("r-zero", _recipe("lora:\n  r: 0\n"), 2, ["line 7", "'lora.r' must be ≥ 1, got 0", "hint:"]),
    R("lr-zero", _recipe("train:\n  lr: 0\n"), 2, ["line 7", "'train.lr' must be > 0", "hint:"]),
    R("lr-negative", _recipe("train:\n  lr: -1.0e-4\n"), 2, ["'train.lr' must be > 0", "hint:"]),
    R("dropout-one", _recipe("lora:\n  dropout: 1.0\n"), 2, ["line 7", "'lora.dropout' must be ≥ 0 and < 1, got 1.0"]),
    R(
        "val-split-high",
        _recipe().replace("  max_length: 64\n", "  max_length: 64\n  val_split: 1.5\n"),
        2,
        ["line 6", "'data.val_split' must be ≥ 0 and < 1, got 1.5"],
    ),
    R(
        "val-split-negative",
        _recipe().replace("  max_length: 64\n", "  max_length: 64\n  val_split: -0.1\n"),
        2,
        ["'data.val_split'", "-0.1"],
    ),
    R("batch-size-zero", _recipe("train:\n  batch_size: 0\n"), 2, ["'train.batch_size' must be ≥ 1"]),
    R(
        "fp4-without-4bit",
        _recipe().replace("  name: {model}\n", "  name: {model}\n  quant_type: fp4\n"),
        2,
        ["line 3", "model.quant_type=fp4 needs model.quantization: 4bit"],
    ),
    R(
        "validation-and-split",
        _recipe().replace("  max_length: 64\n", "  max_length: 64\n  validation: {tmp}/good.jsonl\n  val_split: 0.1\n"),
        2,
        ["data.validation and data.val_split are both set"],
    ),
    R(
        "many-problems",
        _recipe("lora:\n  r: 0\n  dropout: 2\ntrain:\n  lr: 0\n"),
        2,
        ["3 problems", "lora.r", "lora.dropout", "train.lr"],
    ),
    # ---- overrides
    R(
        "override-no-equals",
        _recipe(),
        2,
        ["override 'train.lr' is not of the form key.path=value", "hint: Write overrides as"],
        "train.lr",
    ),
    R("override-unknown-key", _recipe(), 2, ["train.lrr", "did you mean 'lr'"], "train.lrr=1e-4"),
    R("override-wrong-type", _recipe(), 2, ["lora.r", "int", "abc"], "lora.r=abc"),
    R("override-out-of-range", _recipe(), 2, ["'lora.dropout' must be", "override"], "lora.dropout=1.5"),
    # ---- the command line
    Case("unknown-command", ["trian", "x.yaml"], 2, ["No such command", "trian"]),
    Case("unknown-option", ["validate", "x.yaml", "--fast"], 2, ["No such option", "--fast"]),
    Case("missing-argument", ["train"], 2, ["Missing argument 'recipe'", "-h' for help"]),
    # ---- run directories
    R(
        "resume-and-overwrite",
        _recipe(),
        2,
        ["--resume and --overwrite cannot be used together"],
        "--resume",
        "--overwrite",
        command="train",
    ),
    Case(
        "resume-missing-run", ["train", "--resume", "{tmp}/runs/never"], 2, ["nothing to resume", "runs/never", "hint:"]
    ),
    R(
        "resume-empty-output",
        _recipe("output_dir: {tmp}/runs/empty\n"),
        2,
        ["nothing to resume", "runs/empty", "Drop --resume"],
        "--resume",
        command="train",
    ),
    R(
        "existing-run",
        _recipe("output_dir: {tmp}/runs/exists\n"),
        2,
        ["runs/exists already exists", "--resume", "--overwrite"],
        command="train",
        files={
            "runs/exists/run.json": '{"status": "interrupted", "created_at_unix": 1}',
            "runs/exists/recipe.yaml": "model:\n  name: x\n",
            "runs/exists/metrics.jsonl": '{"step": 1, "loss": 2.0}\n',
        },
    ),  # it trained: not restarted silently
    Case(
        "merge-missing-run", ["merge", "{tmp}/runs/never"], 2, ["run directory", "runs/never does not exist", "hint:"]
    ),
    Case(
        "eval-no-adapter",
        ["eval", "{tmp}/runs/half"],
        2,
        ["runs/half has no finished adapter", "--resume"],
        files={"runs/half/run.json": '{"status": "interrupted"}', "runs/half/recipe.yaml": "model:\n  name: x\n"},
    ),
    # ---- models
    R(
        "model-dir-not-a-model",
        _recipe(model="{tmp}"),
        2,
        ["model.name", "not a model directory (no config.json)", "hint:"],
    ),
    R("model-is-a-file", _recipe(model="{tmp}/good.jsonl"), 2, ["model.name", "is a file, not a model directory"]),
    R(
        "model-not-found",
        _recipe(model="./models/nothere"),
        2,
        ["model.name: ./models/nothere is not an existing path", "hint:"],
    ),
    R("gguf-missing", _recipe(model="{tmp}/m.gguf"), 2, ["model.name: GGUF file", "m.gguf does not exist"]),
    R(
        "hub-offline",
        _recipe(model="nobody-here/no-such-model"),
        2,
        ["nobody-here/no-such-model", "HF_HUB_OFFLINE=1", "hint: Offline, name a local model directory"],
        env={"HF_HUB_OFFLINE": "1"},
    ),
    # ---- data (these load the tiny tokenizer)
    R("data-missing", _recipe(data="{tmp}/absent.jsonl"), 2, ["absent.jsonl", "hint:"]),
    R("data-empty", _recipe(data="{tmp}/empty.jsonl"), 2, ["empty.jsonl", "hint:"], files={"empty.jsonl": ""}),
    R(
        "data-bad-json",
        _recipe(data="{tmp}/badjson.jsonl"),
        2,
        ["badjson.jsonl", "line 2", "hint:"],
        files={"badjson.jsonl": GOOD_ROWS.splitlines()[0] + "\n{not json\n"},
    ),
    R(
        "data-missing-field",
        _recipe(data="{tmp}/nofield.jsonl").replace("  max_length: 64\n", "  max_length: 64\n  format: completion\n"),
        2,
        ["nofield.jsonl", "row 2", "completion", "hint:"],
        files={
            "nofield.jsonl": json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n"
        },
    ),
    R(
        "data-wrong-column-type",
        _recipe(data="{tmp}/types.jsonl"),
        2,
        ["types.jsonl", "row 1", "prompt", "hint:"],
        files={"types.jsonl": json.dumps({"prompt": 5, "completion": "b"}) + "\n"},
    ),
    R(
        "data-not-utf8",
        _recipe(data="{tmp}/latin1.jsonl"),
        2,
        ["latin1.jsonl", "UTF-8", "hint:"],
        files={"latin1.jsonl": b'{"text": "caf\xe9"}\n'},
    ),
    R(
        "chat-unknown-role",
        _recipe(model="{chat_model}", data="{tmp}/roles.jsonl"),
        2,
        ["roles.jsonl", "row 1", "robot", "hint:"],
        files={
            "roles.jsonl": json.dumps(
                {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
            + "\n"
        },
    ),
    R(
        "data-unknown-format",
        _recipe(data="{tmp}/weird.jsonl"),
        2,
        ["weird.jsonl", "row 1", "hint:"],
        files={"weird.jsonl": json.dumps({"question": "a", "answer": "b"}) + "\n"},
    ),
    # ---- preference tuning (train.method dpo / orpo)
    R("method-unknown", _recipe("train:\n  method: ppo\n"), 2,
      ["line 7", "'train.method' must be one of 'sft', 'dpo', 'orpo', got 'ppo'", "hint:"]),
    R("beta-zero", _recipe("train:\n  method: dpo\n  beta: 0\n"), 2, ["line 8", "'train.beta' must be > 0, got 0.0"]),
    R("beta-negative", _recipe("train:\n  method: orpo\n  beta: -0.5\n"), 2, ["'train.beta' must be > 0, got -0.5"]),
    R("method-format-mismatch", _recipe("  format: completion\ntrain:\n  method: dpo\n"), 2,
      ["train.method: dpo trains on preference pairs, but data.format is completion", "data.format: preference"]),
    R("format-method-mismatch", _recipe("  format: preference\n"), 2,
      ["data.format: preference needs train.method: dpo or orpo"]),
    R("method-packing", _recipe("  packing: true\ntrain:\n  method: dpo\n"), 2,
      ["data.packing does not apply to train.method: dpo", "data.packing: false"]),
    R("dpo-on-sft-rows", _recipe("train:\n  method: dpo\n"), 2,
      ["good.jsonl row 1 (line 1)", "trains on preference pairs, and this row is completion data",
       "hint: give rows with \"prompt\", \"chosen\" and \"rejected\""]),
    R("sft-on-preference-rows", _recipe(data="{tmp}/prefs.jsonl"), 2,
      ["prefs.jsonl row 1 (line 1): this is preference data", "hint: set train.method: dpo or orpo"],
      files={"prefs.jsonl": json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"}),
    R("pair-missing-fields", _recipe("train:\n  method: dpo\n", data="{tmp}/missing.jsonl"), 2,
      ["2 bad preference rows", "missing.jsonl row 2 (line 2): missing field 'chosen'",
       "missing.jsonl row 3 (line 3): missing field 'rejected'", "hint: preference rows need"],
      files={"missing.jsonl": "".join(json.dumps(r) + "\n" for r in (
          {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"},
          {"prompt": "a", "chosen": "b"}))}),
    R("pair-wrong-type", _recipe("train:\n  method: dpo\n", data="{tmp}/types.jsonl"), 2,
      ["types.jsonl row 2 (line 2): field 'chosen' must be a string (as in the first row), got a number"],
      files={"types.jsonl": json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
             + json.dumps({"prompt": "a", "chosen": 5, "rejected": "c"}) + "\n"}),
    R("pair-chat-wrong-type", _recipe("train:\n  method: orpo\n", model="{chat_model}", data="{tmp}/chat.jsonl"), 2,
      ["chat.jsonl row 2 (line 2): field 'rejected' must be a list of messages (as in the first row), got a string"],
      files={"chat.jsonl": "".join(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                               "chosen": [{"role": "assistant", "content": "hello"}],
                                               "rejected": r}) + "\n"
                                   for r in ([{"role": "assistant", "content": "go"}], "go"))}),
    R("pair-empty", _recipe("train:\n  method: dpo\n", data="{tmp}/empty-answer.jsonl"), 2,
      ["empty-answer.jsonl row 1 (line 1): field 'rejected' is empty"],
      files={"empty-answer.jsonl": json.dumps({"prompt": "a", "chosen": "b", "rejected": " "}) + "\n"}),
    R("pair-same-answers", _recipe("train:\n  method: dpo\n", data="{tmp}/same.jsonl"), 2,
      ["same.jsonl row 2 (line 2): chosen and rejected are the same answer", "hint: a preference pair needs two"],
      files={"same.jsonl": json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
             + json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n"}),
    # ---- lora export: refused before a run is even read, let alone a model loaded
    Case("export-unknown-format", ["export", "{tmp}/run", "--format", "onnx"], 2,
         ["--format onnx is not one of gguf, ollama", "hint:"]),
    Case("export-unknown-quant", ["export", "{tmp}/run", "--quant", "q3_0"], 2,
         ["--quant q3_0 is not one of", "hint: Written by lora: f32, f16"]),
    Case("export-adapter-only-kquant", ["export", "{tmp}/run", "--adapter-only", "--quant", "q4_k_m"], 2,
         ["llama.cpp applies LoRA files in f32, f16, bf16, q8_0 only", "hint:"]),
    Case("export-adapter-only-ollama", ["export", "{tmp}/run", "--adapter-only", "--format", "ollama"], 2,
         ["--adapter-only writes a GGUF LoRA file", "hint:"]),
    Case("export-kquant-without-llama-quantize", ["export", "{tmp}/run", "--quant", "q4_k_m"], 2,
         ["`llama-quantize`, which is not on PATH", "hint: Build llama.cpp"], env={"PATH": "/nonexistent"}),
    Case("export-missing-run", ["export", "{tmp}/no-such-run"], 2, ["{tmp}/no-such-run does not exist", "hint:"]),
    # ---- lora serve / chat
    Case("serve-missing-run", ["serve", "{tmp}/no-such-run"], 2, ["{tmp}/no-such-run does not exist", "hint:"]),
    Case("serve-bad-name", ["serve", "=runs/x"], 2, ["'=runs/x' is not RUN or NAME=RUN", "hint:"]),
    Case("serve-bad-port", ["serve", "--port", "70000", "{tmp}/run"], 2, ["--port must be in 0-65535", "hint:"]),
    Case("chat-missing-run", ["chat", "{tmp}/no-such-run"], 2, ["{tmp}/no-such-run does not exist", "hint:"]),
]


def _fill(text, tmp, models):
    if isinstance(text, bytes):
        return text
    return (
        text.replace("{tmp}", str(tmp))
        .replace("{model}", str(models["model"]))
        .replace("{chat_model}", str(models["chat_model"]))
    )


def _run(case: Case, tmp: Path, models: dict) -> subprocess.CompletedProcess:
    where = tmp / case.id
    where.mkdir()
    (where / "good.jsonl").write_text(GOOD_ROWS)
    for name, content in case.files.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content = _fill(content, where, models)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "LORA_ALLOCATOR": "system", **case.env}
    return subprocess.run(
        [sys.executable, "-m", "lora_cli", *[_fill(a, where, models) for a in case.args]],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def results(tiny_gpt2, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    models = {"model": tiny_gpt2, "chat_model": tiny_llama}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda c: _run(c, tmp, models), CASES))
    return {case.id: (case, proc, tmp / case.id) for case, proc in zip(CASES, procs)}


def test_there_are_at_least_30_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input_gets_a_clear_error(results, case_id):
    case, proc, where = results[case_id]
    err = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == case.code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    for text in case.expect:
        text = _fill(text, where, {"model": "", "chat_model": ""})
        assert " ".join(text.split()) in err, f"{text!r} not in:\n{proc.stderr[-3000:]}"
    assert len(proc.stderr.splitlines()) <= 25, "one short message, not a screenful"
