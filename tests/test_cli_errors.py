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


def _recipe(body: str = "", *, model: str = "{model}", data: str = "{tmp}/good.jsonl", data_keys: str = "") -> str:
    """A valid recipe with `body` appended: YAML merges nothing, so a body repeats no section.
    `data_keys` are more lines of the data section (indented)."""
    head = f"model:\n  name: {model}\ndata:\n  train: {data}\n  max_length: 64\n{data_keys}"
    return head + body


def _mix(*entries: str, data_keys: str = "", body: str = "") -> str:
    """A recipe whose data.train is the list of `entries` (each a YAML flow mapping)."""
    items = "".join(f"\n    - {e}" for e in entries)
    return f"model:\n  name: {{model}}\ndata:\n  max_length: 64\n{data_keys}  train:{items}\n" + body


def T(id, recipe_text, expect, files=None, env=None):
    """`lora train` on bad input a new user would give: the error alone, never under the recipe."""
    return R(id, recipe_text, 2, expect, files=files, command="train", env=env)


ONE_ROW = json.dumps({"prompt": "a", "completion": "b"}) + "\n"


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


FOUR_BIT = "  name: {model}\n  quantization: 4bit\n"
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
    # ---- training knobs: optimizer, LoRA variants, NEFTune, evaluation during training
    R("optimizer-unknown", _recipe("train:\n  optimizer: adam\n"), 2,
      ["line 7", "'train.optimizer' must be one of 'adamw_torch', 'adamw_torch_fused'", "hint:"]),
    R("adam-beta1-one", _recipe("train:\n  adam_beta1: 1.0\n"), 2,
      ["line 7", "'train.adam_beta1' must be ≥ 0 and < 1"]),
    R("adam-beta2-negative", _recipe("train:\n  adam_beta2: -0.5\n"), 2, ["'train.adam_beta2' must be ≥ 0 and < 1"]),
    R("adam-epsilon-zero", _recipe("train:\n  adam_epsilon: 0\n"), 2, ["'train.adam_epsilon' must be > 0, got 0"]),
    R("weight-decay-negative", _recipe("train:\n  weight_decay: -0.1\n"), 2, ["'train.weight_decay' must be ≥ 0"]),
    R("neftune-zero", _recipe("train:\n  neftune_noise_alpha: 0\n"), 2,
      ["line 7", "'train.neftune_noise_alpha' must be > 0, got 0"]),
    R("lora-init-unknown", _recipe("lora:\n  init: kaiming\n"), 2,
      ["line 7", "'lora.init' must be one of 'default', 'gaussian', 'pissa', 'olora', 'loftq'"]),
    R("lr-ratio-zero", _recipe("lora:\n  lr_ratio: 0\n"), 2, ["line 7", "'lora.lr_ratio' must be > 0, got 0"]),
    R("loftq-without-4bit", _recipe("lora:\n  init: loftq\n"), 2,
      ["line 7", "lora.init=loftq needs model.quantization: 4bit with model.quant_type: nf4"]),
    R("pissa-on-4bit", _recipe("lora:\n  init: pissa\n").replace("  name: {model}\n", FOUR_BIT), 2,
      ["line 8", "lora.init=pissa needs a full-precision base", "lora.init: loftq"]),
    R("loftq-with-dora",
      _recipe("lora:\n  init: loftq\n  use_dora: true\n").replace("  name: {model}\n", FOUR_BIT), 2,
      ["lora.init=loftq cannot be combined with lora.use_dora"]),
    R("eval-batch-size-zero", _recipe("eval:\n  batch_size: 0\n"), 2,
      ["line 7", "'eval.batch_size' must be ≥ 1, got 0"]),
    R("eval-max-rows-zero", _recipe("eval:\n  max_rows: 0\n"), 2, ["line 7", "'eval.max_rows' must be ≥ 1, got 0"]),
    # bitsandbytes that cannot be imported (a build without this machine's library): exit 2 before the model
    R("optimizer-8bit-unavailable", _recipe("train:\n  optimizer: adamw_8bit\n"), 2,
      ["train.optimizer: adamw_8bit cannot run on this machine", "bitsandbytes cannot be imported",
       "hint: pip install bitsandbytes, or use train.optimizer: adamw_torch"],
      command="train", files={"shim/bitsandbytes/__init__.py": "raise ImportError('libbitsandbytes: no such file')\n"},
      env={"PYTHONPATH": os.pathsep.join(["{tmp}/shim", os.environ.get("PYTHONPATH", "")])}),
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
    # ---- lora estimate --num-processes / --engine
    R("estimate-zero-processes", _recipe(), 2, ["--num-processes must be at least 1 (got 0)", "hint:"],
      "--num-processes", "0", command="estimate"),
    R("estimate-unknown-engine", _recipe(), 2, ["--engine must be one of ddp, fsdp, zero3 (got 'zero2')", "hint:"],
      "--num-processes", "2", "--engine", "zero2", command="estimate"),
    # ---- lora serve / chat
    Case("serve-missing-run", ["serve", "{tmp}/no-such-run"], 2, ["{tmp}/no-such-run does not exist", "hint:"]),
    Case("serve-bad-name", ["serve", "=runs/x"], 2, ["'=runs/x' is not RUN or NAME=RUN", "hint:"]),
    Case("serve-bad-port", ["serve", "--port", "70000", "{tmp}/run"], 2, ["--port must be in 0-65535", "hint:"]),
    Case("chat-missing-run", ["chat", "{tmp}/no-such-run"], 2, ["{tmp}/no-such-run does not exist", "hint:"]),
    # ---- data.train entries (a weighted mix, data/mixing.py)
    R("mix-weight-zero", _mix("{path: good.jsonl, weight: 1}", "{path: good.jsonl, weight: 0}"), 2,
      ["line 7", "'data.train[1].weight' must be > 0, got 0.0", "hint:"]),
    R("mix-weight-negative", _mix("{path: good.jsonl, weight: -0.5}"), 2, ["'data.train[0].weight' must be > 0"]),
    R("mix-weight-not-a-number", _mix("{path: good.jsonl, weight: lots}"), 2,
      ["'data.train[0].weight' must be a number or null, got 'lots'"]),
    R("mix-missing-path", _mix("{path: good.jsonl, weight: 1}", "{weight: 1}"), 2,
      ["line 7", "'data.train[1].path' is missing"]),
    R("mix-unknown-entry-key", _mix("{pth: good.jsonl, weight: 1}"), 2,
      ["unknown key 'data.train[0].pth' in data.train[0]: did you mean 'path'?"]),
    R("mix-entry-not-a-mapping", _mix("{path: good.jsonl, weight: 1}", "5"), 2,
      ["'data.train[1]' must be a file path or a mapping {path, weight, format, split, max_rows}, got 5"]),
    R("mix-some-weights", _mix("{path: good.jsonl, weight: 1}", "{path: good.jsonl}"), 2,
      ["'data.train[1]' has no weight, and 'data.train[0]' has one: give every entry a weight"]),
    R("mix-max-rows-zero", _mix("{path: good.jsonl, weight: 1, max_rows: 0}"), 2,
      ["'data.train[0].max_rows' must be ≥ 1, got 0"]),
    R("mix-bad-format", _mix("{path: good.jsonl, weight: 1, format: csv}"), 2,
      ["'data.train[0].format' must be one of 'auto', 'text'"]),
    R("mix-stopping-without-weights", _recipe(data_keys="  mix_stopping: all_exhausted\n"), 2,
      ["line 6", "data.mix_stopping applies to a weighted mix"]),
    R("mix-stopping-unknown", _mix("{path: good.jsonl, weight: 1}", data_keys="  mix_stopping: never\n"), 2,
      ["'data.mix_stopping' must be one of 'first_exhausted', 'all_exhausted', got 'never'"]),
    R("mix-path-not-found", _mix("{path: good.jsonl, weight: 1}", "{path: nothere.jsonl, weight: 1}"), 2,
      ["data file not found", "nothere.jsonl", "hint: check the path"]),
    R("mix-split-on-local-file", _mix("{path: good.jsonl, weight: 1, split: test}"), 2,
      ["data.train[0].split: good.jsonl is a local file, and split (test) applies to hub datasets", "hint:"]),
    R("mix-val-split-empties-a-source", _mix("{path: one.jsonl, weight: 1}", data_keys="  val_split: 0.5\n"), 2,
      ["would hold out 1 of the 1 row of one.jsonl", "hint:"], files={"one.jsonl": ONE_ROW}),
    # ---- early stopping and the best adapter
    R("early-stopping-without-validation", _recipe("train:\n  early_stopping_patience: 3\n"), 2,
      ["line 7", "train.early_stopping_patience needs validation data", "data.val_split"]),
    R("keep-best-without-validation", _recipe("train:\n  keep_best: true\n"), 2,
      ["line 7", "train.keep_best needs validation data"]),
    R("early-stopping-patience-zero", _recipe("train:\n  early_stopping_patience: 0\n"), 2,
      ["'train.early_stopping_patience' must be ≥ 1, got 0"]),
    R("early-stopping-threshold-negative",
      _recipe("train:\n  early_stopping_patience: 2\n  early_stopping_threshold: -0.1\n",
              data_keys="  val_split: 0.2\n"), 2,
      ["'train.early_stopping_threshold' must be ≥ 0, got -0.1"]),
    R("early-stopping-threshold-alone", _recipe("train:\n  early_stopping_threshold: 0.1\n",
                                                data_keys="  val_split: 0.2\n"), 2,
      ["train.early_stopping_threshold needs train.early_stopping_patience"]),
    R("keep-best-not-a-bool", _recipe("train:\n  keep_best: maybe\n"), 2,
      ["'train.keep_best' must be true or false, got 'maybe'"]),
    R("keep-best-saves-elsewhere",
      _recipe("train:\n  keep_best: true\n  eval_every: 10\n  save_every: 25\n", data_keys="  val_split: 0.2\n"),
      2, ["train.keep_best saves a checkpoint at every evaluation", "train.eval_every (10)"]),
    # ---- `lora train` as a new user meets it: the error alone, before the recipe and the model
    T("train-data-path-typo", _recipe(data="data/trian.jsonl"), ["data file not found", "data/trian.jsonl"]),
    T("train-data-no-extension", _recipe(data="good"), ["data file not found: good", "did you mean good.jsonl"]),
    T("train-model-missing", _recipe(model="./models/my-model"),
      ["model.name: ./models/my-model is not an existing path", "hint:"]),
    T("train-model-no-config", _recipe(model="{tmp}/mymodel"), ["not a model directory (no config.json)"],
      files={"mymodel/weights.txt": "x"}),
    T("train-data-empty", _recipe(data="{tmp}/empty.jsonl"), ["empty.jsonl: no rows"], files={"empty.jsonl": ""}),
    T("train-data-one-json-document", _recipe(data="{tmp}/doc.jsonl"),
      ["doc.jsonl", "one JSON document spread over many lines"],
      files={"doc.jsonl": '[\n  {"prompt": "a", "completion": "b"}\n]\n'}),
    T("train-chat-unknown-role", _recipe(model="{chat_model}", data="{tmp}/roles.jsonl"), ["roles.jsonl row 1", "bot"],
      files={"roles.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "bot", "content": "yo"}]}) + "\n"}),
    T("train-chat-without-template", _recipe(data="{tmp}/chat.jsonl"), ["needs a tokenizer with a chat template"],
      files={"chat.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}) + "\n"}),
    T("train-row-too-long", _recipe(data="{tmp}/long.jsonl", data_keys="  too_long: error\n"),
      ["long.jsonl row 1", "longer than max_length 64", "hint:"],
      files={"long.jsonl": json.dumps({"prompt": "a", "completion": "word " * 200}) + "\n"}),
    T("train-validation-missing", _recipe(data_keys="  validation: {tmp}/val.jsonl\n"),
      ["data file not found", "val.jsonl"]),
    T("train-max-length-past-positions", _recipe().replace("max_length: 64", "max_length: 4096"),
      ["data.max_length: 4096 is beyond the model's context of 256 tokens"]),
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "LORA_ALLOCATOR": "system",
           **{key: _fill(value, where, models) for key, value in case.env.items()}}
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
    output = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(output) <= 40, f"the error fits on one screen, not under the recipe:\n{proc.stdout[:3000]}"
