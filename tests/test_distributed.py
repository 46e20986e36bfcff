"""Several processes: `accelerate launch` and `lora train --num-processes`, two CPU ranks on gloo.

The two-process runs are real: torchrun starts two copies of `lora train`, DDP averages their
gradients. They are compared with a one-process run of the same global batch (2 × 4 vs 1 × 8):
accelerate's seedable sampler gives both the same shuffled order and rank r takes batches r, r+2,
..., so each optimizer step sees the same 8 examples and the loss curves agree to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_cli.errors import ModelError
from lora_cli.model import loading
from lora_cli.training import distributed, launch
from tests.helpers import completion_rows, lora_in_process, read_metrics, tiny_recipe, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
STEPS = 10  # crosses an epoch (64 examples / 8 per step): the reshuffle must agree as well


@pytest.fixture(scope="module")
def model_dir(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 without dropout: with GPT-2's default 0.1 each rank would draw its own
    dropout masks and no two runs with different process counts could agree exactly."""
    target = tmp_path_factory.mktemp("gpt2-no-dropout") / "model"
    shutil.copytree(tiny_gpt2, target)
    config = json.loads((target / "config.json").read_text())
    config.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ddp-data") / "train.jsonl", completion_rows(repeat=8))


def write_recipe(path: Path, model_dir: Path, train_file: Path, output_dir: Path, **train) -> Path:
    raw = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 1.0e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "scheduler": "constant", "seed": 42, **train},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def single_process_run(tmp: Path, model_dir: Path, train_file: Path, **model) -> Path:
    """The reference: one process, batch 8 (= 2 processes × batch 4), in this process."""
    from lora_cli.commands.train import run as run_training

    recipe = tiny_recipe(model_dir, train_file, tmp / "runs" / "single", model={"dtype": "float32", **model},
                         train={"max_steps": STEPS, "batch_size": 8, "log_every": 1, "seed": 42})
    return run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def assert_one_clean_run(run_dir: Path, out: str, reference: Path) -> None:
    """One adapter, written once; one copy of each message; the same losses as one process."""
    assert out.count("adapter saved to") == 1, out
    assert out.count("global batch: 8 examples per optimizer step (batch_size 4 × grad_accum 1 × 2 processes") == 1, out
    assert out.count("model: ") == 1, out
    assert {p.name for p in run_dir.parent.iterdir()} == {run_dir.name, reference.name}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(("adapter.", ".adapter"))], "no leftover staging dirs"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    metrics = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), "each step logged once, by rank 0 only"
    expected = [m["loss"] for m in read_metrics(reference) if "loss" in m]
    assert [m["loss"] for m in metrics] == pytest.approx(expected, abs=1e-4)
    # Token counts are of the whole global batch, summed over the ranks.
    reference_tokens = [(m["supervised_tokens"], m["tokens"]) for m in read_metrics(reference) if "loss" in m]
    assert [(m["supervised_tokens"], m["tokens"]) for m in metrics] == reference_tokens


def assert_loads_with_plain_peft(model_dir: Path, adapter: Path, reference_adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    ours, theirs = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(reference_adapter / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same weights as the one-process run learned
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3)


def test_accelerate_launch_two_processes_matches_one(model_dir, train_file, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml -m lora_cli train` on CPU."""
    reference = single_process_run(tmp_path, model_dir, train_file)
    recipe = write_recipe(tmp_path / "ddp.yaml", model_dir, train_file, tmp_path / "runs" / "ddp")
    result = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs" / "accelerate" / "ddp.yaml"),
            "--num_processes",
            "2",
            "-m",
            "lora_cli",
            "train",
            str(recipe),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_one_clean_run(tmp_path / "runs" / "ddp", result.stdout, reference)
    assert_loads_with_plain_peft(model_dir, tmp_path / "runs" / "ddp" / "adapter", reference / "adapter")


def test_num_processes_relaunch_qlora_matches_one(model_dir, train_file, tmp_path):
    """`lora train --num-processes 2` with a 4-bit base: each rank loads its own quantized copy."""
    reference = single_process_run(tmp_path, model_dir, train_file, quantization="4bit")
    recipe = write_recipe(tmp_path / "qlora.yaml", model_dir, train_file, tmp_path / "runs" / "qlora")
    result = run(
        [sys.executable, "-m", "lora_cli", "train", str(recipe), "model.quantization=4bit", "--num-processes", "2"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launching 2 processes" in result.stderr
    assert_one_clean_run(tmp_path / "runs" / "qlora", result.stdout, reference)
    assert_loads_with_plain_peft(model_dir, tmp_path / "runs" / "qlora" / "adapter", reference / "adapter")


def start_long_run(model_dir: Path, train_file: Path, tmp_path: Path):
    """A 2-process run that would take minutes; returns (launcher process, {rank: process})."""
    import psutil

    recipe = write_recipe(tmp_path / "long.yaml", model_dir, train_file, tmp_path / "runs" / "long", max_steps=100_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_cli", "train", str(recipe), "--num-processes", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = tmp_path / "runs" / "long" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # both ranks are training
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        env = child.environ()
        if "LOCAL_RANK" in env:
            ranks[int(env["RANK"])] = child
    assert sorted(ranks) == [0, 1]
    return proc, ranks


def assert_all_ended(proc, ranks, timeout=90) -> tuple[str, str]:
    import psutil

    out, err = proc.communicate(timeout=timeout)
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=5)
    assert not alive, f"ranks still running: {alive}"
    return out, err


def test_killed_rank_stops_all_with_its_error(model_dir, train_file, tmp_path):
    proc, ranks = start_long_run(model_dir, train_file, tmp_path)
    ranks[1].send_signal(signal.SIGKILL)
    out, err = assert_all_ended(proc, ranks)
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "rank 1 was killed by SIGKILL; the other processes were stopped" in err
    assert "Traceback" not in err, err[-3000:]
    run_dir = tmp_path / "runs" / "long"
    assert json.loads((run_dir / "run.json").read_text())["status"] != "completed"
    assert not (run_dir / "adapter").exists()


def test_ctrl_c_in_one_rank_stops_all_at_the_same_step(model_dir, train_file, tmp_path):
    proc, ranks = start_long_run(model_dir, train_file, tmp_path)
    ranks[1].send_signal(signal.SIGINT)
    out, err = assert_all_ended(proc, ranks)
    assert proc.returncode == 130, err[-3000:]
    # Both ranks stop after the same step (they agree on it), save one checkpoint and say how to resume.
    steps = {
        line.split("interrupted at step ")[1].split(";")[0]
        for line in err.splitlines()
        if "interrupted at step" in line
    }
    assert len(steps) == 1, err[-3000:]
    run_dir = tmp_path / "runs" / "long"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoints" / f"checkpoint-{steps.pop()}" / "trainer_state.json").is_file()
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_sigterm_to_the_outer_process_stops_every_rank(model_dir, train_file, tmp_path, sig):
    """`kill PID` of `lora train --num-processes 2` (what people and job tools send to the process
    they started): the launcher and both ranks stop as on Ctrl-C, with a checkpoint, exit 143.
    SIGHUP (the terminal closed) stops them the same way; Ctrl-C (SIGINT to it) with exit 130."""
    import psutil

    proc, ranks = start_long_run(model_dir, train_file, tmp_path)
    launcher = psutil.Process(proc.pid).children()
    try:
        proc.send_signal(sig)
        out, err = assert_all_ended(proc, ranks)
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-3000:]
        _, alive = psutil.wait_procs(launcher, timeout=5)
        assert not alive, f"launcher still running: {alive}"
    finally:  # never leave orphans training (the bug this test is about)
        for child in [*launcher, *ranks.values()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    run_dir = tmp_path / "runs" / "long"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and record["num_processes"] == 2
    steps = {
        line.split("interrupted at step ")[1].split(";")[0]
        for line in err.splitlines()
        if "interrupted at step" in line
    }
    assert len(steps) == 1, err[-3000:]
    assert (run_dir / "checkpoints" / f"checkpoint-{steps.pop()}" / "trainer_state.json").is_file()
    assert "Traceback" not in err, err[-3000:]


# --------------------------------------------------------------------------- no processes needed


def test_num_processes_below_one_is_refused(model_dir, train_file, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, train_file, tmp_path / "runs" / "r")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "--num-processes", "0")
    assert code == 2
    assert "--num-processes must be at least 1 (got 0)" in err and "hint:" in err
    assert not (tmp_path / "runs").exists()


def test_relaunch_command_line():
    argv = ["train", "r.yaml", "--num-processes", "2", "lora.r=4", "--num-processes=3", "--overwrite"]
    assert launch.strip_num_processes(argv) == ["train", "r.yaml", "lora.r=4", "--overwrite"]
    cmd = launch.relaunch_command(2, ["train", "r.yaml"], cuda=False)
    # On CPU accelerate's --cpu would start one process: its torchrun launcher (--multi_gpu) starts N.
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-4:] == ["-m", "lora_cli", "train", "r.yaml"]


ENGINES = {
    "ddp": {"WORLD_SIZE": "2"},
    "fsdp": {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
    "zero2": {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}


@pytest.mark.parametrize(
    "engine,quantization,cuda,refused",
    [
        ("ddp", "4bit", False, None),
        ("ddp", "8bit", True, None),
        ("fsdp", "none", True, None),
        ("fsdp", "4bit", True, None),
        ("fsdp", "8bit", True, "8bit is not supported with FSDP"),
        ("fsdp", "4bit", False, "4bit with FSDP needs CUDA"),
        ("zero2", "4bit", True, None),
        ("zero3", "4bit", True, None),
        ("zero3", "8bit", True, "8bit is not supported with DeepSpeed ZeRO-3"),
        ("zero2", "none", False, "DeepSpeed ZeRO-2 needs CUDA"),
    ],
)
def test_engine_and_quantization_support(monkeypatch, engine, quantization, cuda, refused):
    for key, value in ENGINES[engine].items():
        monkeypatch.setenv(key, value)
    if refused is None:
        distributed.check_engine_supports(quantization, cuda=cuda)
    else:
        with pytest.raises(ModelError, match=refused) as info:
            distributed.check_engine_supports(quantization, cuda=cuda)
        assert "Many GPUs" in info.value.hint or "--num-processes" in info.value.hint


def test_unsupported_combination_refused_before_anything_is_written(
    model_dir, train_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --config_file fsdp.yaml` sets it
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, train_file, tmp_path / "runs" / "r")
    code, _, err = lora_in_process(monkeypatch, capsys, "train", recipe, "model.quantization=8bit")
    assert code == 2
    assert "model.quantization: 8bit is not supported with FSDP" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_quantized_placement_and_storage(monkeypatch):
    import torch

    from lora_cli.model.loading import quantization_config
    from lora_cli.recipe.load import recipe_from_dict

    cfg = recipe_from_dict(
        {"model": {"name": "x", "quantization": "4bit", "dtype": "bfloat16"}, "data": {"train": "t.jsonl"}}
    ).model
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8
    assert loading.quantized_device_map(cuda=False) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert loading.quantized_device_map(cuda=True) == {"": 1}  # DDP: each rank on its own GPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert loading.quantized_device_map(cuda=True) is None  # FSDP places the shards itself
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.bfloat16  # = compute dtype


def _launch_arg_names() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    known = _launch_arg_names()
    fsdp = config.fsdp_config or {}
    for key in fsdp:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, f"{path.name}: unknown fsdp key {key}"
    for key in config.deepspeed_config or {}:
        assert key in known, f"{path.name}: unknown deepspeed key {key}"
    assert config.num_processes >= 2
    assert config.num_machines == (2 if path.name == "multinode.yaml" else 1)
    if config.num_machines > 1:  # a real port every machine reaches, not 0 (a free one on one machine)
        assert config.main_process_port > 0 and config.main_process_ip
    assert config.mixed_precision == "no", "the recipe's dtype decides, not the launcher"
    assert path.read_text().startswith("#"), "each file says what it is for"
    kind = str(config.distributed_type).split(".")[-1]
    assert kind == {"ddp.yaml": "MULTI_GPU", "multinode.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP"}.get(
        path.name, "DEEPSPEED"
    )
    if kind == "FSDP":  # FSDP2 (runs on CPU too: tests/test_multinode.py), fully sharded, rank 0 loads
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


def test_all_engine_configs_shipped():
    assert {p.name for p in ACCELERATE_CONFIGS} == {
        "ddp.yaml",
        "multinode.yaml",
        "fsdp.yaml",
        "deepspeed-zero2.yaml",
        "deepspeed-zero3.yaml",
    }


@pytest.mark.parametrize(
    "steps, batch",
    [(7, {"batch_size": 4}), (7, {"batch_size": 2, "grad_accum": 2}), (8, {"batch_size": 4})],
    ids=["b4", "b2x2", "b4-last-step-skipped"],
)
def test_a_nonfinite_batch_on_one_rank_is_skipped_by_every_rank(tiny_llama, tmp_path, steps, batch):
    """The poisoned Llama (tests/test_nonfinite.py): a batch holding its NaN token has a NaN loss.
    With 2 processes the bad batch is on one rank only. The ranks agree before the backward and
    all skip that step, so the run learns, logs and skips exactly what one process with the same
    global batch does. (Each rank used to decide alone after DDP had averaged the NaN gradients
    into all of them: the other rank stepped into NaN weights and the run failed.)"""
    from tests.test_nonfinite import _poisoned_llama

    model = _poisoned_llama(tiny_llama, tmp_path, "<|im_start|>")
    rows = completion_rows(repeat=2)
    rows[3] = {"prompt": "Define: ten\n", "completion": "<|im_start|> poison"}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    from lora_cli.commands.train import run as run_training

    # 16 rows, 8 per step: steps 1, 3, 5 and 8 hold the poisoned row.
    reference = run_training(
        tiny_recipe(
            model,
            data,
            tmp_path / "runs" / "single",
            train={"max_steps": steps, "batch_size": 8, "log_every": 1, "seed": 42},
        ),
        recipe_path=None,
        resume=False,
        overwrite=False,
    ).paths.root
    recipe = write_recipe(tmp_path / "ddp.yaml", model, data, tmp_path / "runs" / "ddp", max_steps=steps, **batch)
    result = run([sys.executable, "-m", "lora_cli", "train", str(recipe), "--num-processes", "2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "ddp"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    ours = [m for m in read_metrics(run_dir) if "loss" in m]
    theirs = [m for m in read_metrics(reference) if "loss" in m]
    assert [m["step"] for m in ours] == list(range(1, steps + 1))
    skipped = [m["step"] for m in theirs if m.get("skipped_steps")]
    assert (
        skipped == [1, 3, 5, 8][: 3 if steps == 7 else 4]
        and [m["step"] for m in ours if m.get("skipped_steps")] == skipped
    )
    assert all(m["loss"] == "nan" for m in ours if m.get("skipped_steps"))
    finite = [m["loss"] for m in ours if not m.get("skipped_steps")]
    assert finite == pytest.approx([m["loss"] for m in theirs if not m.get("skipped_steps")], abs=1e-4)
    assert f"warning: {len(skipped)} of {steps} steps were skipped" in result.stdout
    assert_loads_with_plain_peft(model, run_dir / "adapter", reference / "adapter")


def test_a_launched_process_ends_with_its_output_and_exit_code(model_dir, train_file, tmp_path):
    """A process of a multi-process launch ends by os._exit, past the interpreter's teardown where
    gloo now and then aborted a finished rank (lora_cli/cli.py, entry): what it printed still
    arrives (stdout into a pipe is block-buffered: it is flushed first) and its exit code is the
    command's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a launcher has it
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dir, train_file, tmp_path / "runs" / "r")
    valid = subprocess.run([sys.executable, "-m", "lora_cli", "validate", str(recipe)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.startswith("recipe: valid") and "estimate:" in valid.stdout, valid.stdout
    missing = subprocess.run([sys.executable, "-m", "lora_cli", "validate", str(tmp_path / "missing.yaml")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert missing.returncode == 2, missing.stderr
    assert "missing.yaml" in missing.stderr and "Traceback" not in missing.stderr
