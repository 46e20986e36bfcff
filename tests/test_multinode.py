"""Beyond one machine, on CPU: two launchers acting as two nodes, FSDP with gloo, a lost node, an
elastic restart, checkpoints that another node cannot see.

Every run here is compared with one process training the same global batch (batch 8 = 2 ranks x
4) in this process: the ranks share accelerate's seeded order, so losses and adapters agree to
float rounding (tests/test_distributed.py explains why), also across a kill and a resume, which
continues exactly (optimizer, scheduler, RNG and data position come from the checkpoint).
Processes are killed right after checkpoint-4 appears: the run has 8 more steps to go then.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_cli.errors import ModelError
from lora_cli.run.checkpoints import incomplete_reason
from lora_cli.training import distributed
from tests.helpers import completion_rows, lora_in_process, read_metrics, tiny_recipe, write_jsonl
from tests.test_distributed import assert_loads_with_plain_peft

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
STEPS, SAVE_EVERY = 12, 4
FAILURE_SECONDS = 60  # a survivor of a lost node must have stopped by then (measured: ~5 s)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("multinode-data") / "train.jsonl", completion_rows(repeat=8))


@pytest.fixture(scope="module")
def reference(tiny_llama, train_file, tmp_path_factory):
    """One process, batch 8, uninterrupted: (losses by step, adapter directory)."""
    from lora_cli.commands.train import run as run_training

    out = tmp_path_factory.mktemp("reference") / "single"
    recipe = tiny_recipe(tiny_llama, train_file, out,
                         train={"max_steps": STEPS, "batch_size": 8, "log_every": 1, "seed": 42})
    run_dir = run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root
    return losses_by_step(run_dir), run_dir / "adapter"


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The loss of each step; a step trained again after a resume counts with its last value."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def write_recipe(path: Path, model_dir: Path, train_file: Path, output_dir: str) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 1.0e-2, "warmup_ratio": 0.0, "log_every": 1,
                  "scheduler": "constant", "seed": 42, "save_every": SAVE_EVERY},
        "output_dir": output_dir,
    }))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """`accelerate launch ARGS` in a session of its own (a node: its launcher and its ranks)."""
    log = cwd / name
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        cwd=cwd, stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def output(cwd: Path, name: str) -> tuple[str, str]:
    return (cwd / f"{name}.out").read_text(), (cwd / f"{name}.err").read_text()


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.is_dir():
        assert all(p.poll() is None for p in procs), "a launcher ended before " + path.name
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def kill_node(proc: subprocess.Popen) -> None:
    """A machine lost: its launcher and every process it started die at once (SIGKILL)."""
    import psutil

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def two_nodes(recipe: Path, cwd: Path, *extra: str, node1_cwd: Path | None = None, tag: str = "") -> list:
    """Two launchers on this host, as two machines would run them (multinode.yaml, one process
    each, machine ranks 0 and 1, gloo on 127.0.0.1); node 1 may run in another directory."""
    port = str(free_port())
    common = ["--config_file", str(CONFIGS / "multinode.yaml"), "--num_processes", "2",
              "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    return [
        start([*common, "--machine_rank", str(node), "-m", "lora_cli", "train", str(recipe), *extra],
              node1_cwd if node and node1_cwd else cwd, f"node{node}{tag}")
        for node in (0, 1)
    ]


def assert_matches_reference(run_dir: Path, reference) -> None:
    losses, adapter = reference
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    ours = losses_by_step(run_dir)
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert [ours[s] for s in sorted(ours)] == pytest.approx([losses[s] for s in sorted(losses)], abs=1e-4)
    # (the same weights to 1e-4: measured 4e-7 apart for FSDP vs DDP, 0 for a resumed DDP run)
    assert_loads_with_plain_peft(Path(json.loads((run_dir / "run.json").read_text())["model"]["name"]),
                                 run_dir / "adapter", adapter)


def test_two_nodes_lose_one_refuse_a_blind_resume_then_resume(tiny_llama, train_file, reference, tmp_path):
    """Two nodes train together; node 1 is lost after checkpoint-4: node 0 stops within
    FAILURE_SECONDS naming rank 1 on node 1. A resume where node 1 sees another disk (its own
    directory: no such run) is refused on every node before anything changes; the same launch
    command with --resume then finishes the run, equal to one uninterrupted process."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_llama, train_file, "runs/two-nodes")
    run_dir = tmp_path / "runs" / "two-nodes"
    node0, node1 = two_nodes(recipe, tmp_path)
    try:
        wait_for(run_dir / "checkpoints" / f"checkpoint-{SAVE_EVERY}", [node0, node1])
        kill_node(node1)
        lost_at = time.time()
        assert node0.wait(timeout=FAILURE_SECONDS) != 0
        print(f"node 0 stopped {time.time() - lost_at:.1f} s after node 1 was lost")
    finally:
        for proc in (node0, node1):
            if proc.poll() is None:
                kill_node(proc)
    out, err = output(tmp_path, "node0")
    assert "error: lost contact with rank 1 (node 1, host " in err and "it is no longer running" in err, err[-3000:]
    assert "--resume" in err  # the hint says how to go on
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert "adapter saved" not in out

    # Node 1 on a disk of its own: it would read a checkpoint that is not there.
    elsewhere = tmp_path / "node1-disk"
    elsewhere.mkdir()
    procs = two_nodes(recipe, tmp_path, "--resume", node1_cwd=elsewhere, tag="-blind")
    codes = [p.wait(timeout=240) for p in procs]
    out, err = output(tmp_path, "node0-blind")
    assert codes[0] != 0 and codes[1] != 0
    assert "does not see that checkpoint" in err and "rank 1 (node 1, host " in err, err[-3000:]
    assert "storage every node shares" in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"  # still resumable
    assert not (elsewhere / "runs").exists() or not any((elsewhere / "runs").rglob("run.json"))

    procs = two_nodes(recipe, tmp_path, "--resume", tag="-resumed")
    codes = [p.wait(timeout=300) for p in procs]
    out0, err0 = output(tmp_path, "node0-resumed")
    out1, err1 = output(tmp_path, "node1-resumed")
    assert codes == [0, 0], (err0 + err1)[-4000:]
    assert "resuming" in out0 and "from checkpoint-" in out0
    # Only node 0's rank 0 prints and writes the run: one adapter, saved once.
    assert (out0 + out1).count("adapter saved to") == 1 and "adapter saved to" in out0
    assert (out0 + out1).count("global batch: 8 examples per optimizer step") == 1
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"two-nodes"}
    assert_matches_reference(run_dir, reference)


def test_fsdp_on_cpu_restarts_a_killed_rank_and_matches_one_process(tiny_llama, train_file, reference, tmp_path):
    """configs/accelerate/fsdp.yaml on CPU (gloo, FSDP2) with --max_restarts 1: rank 1 is killed
    (SIGKILL) after checkpoint-4; torchrun restarts both ranks, which resume from that sharded
    checkpoint by themselves. The adapter equals one uninterrupted process's and loads with PEFT."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_llama, train_file, str(tmp_path / "runs" / "fsdp"))
    run_dir = tmp_path / "runs" / "fsdp"
    proc = start(["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2", "--max_restarts", "1",
                  "--monitor_interval", "0.5", "-m", "lora_cli", "train", str(recipe)], tmp_path, "fsdp")
    try:
        import psutil

        wait_for(run_dir / "checkpoints" / f"checkpoint-{SAVE_EVERY}", [proc])
        rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGKILL)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_node(proc)
    out, err = output(tmp_path, "fsdp")
    assert code == 0, err[-4000:]
    assert "engine fsdp" in out
    assert "restart 1 of this launch (--max_restarts): resuming the run it started" in out
    assert f"from checkpoint-{SAVE_EVERY}" in out or f"from checkpoint-{2 * SAVE_EVERY}" in out
    # FSDP really sharded (a sharded torch.distributed.checkpoint), not DDP under another name.
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert (newest / "pytorch_model_fsdp_0" / ".metadata").is_file() and incomplete_reason(newest) is None
    assert_matches_reference(run_dir, reference)


# --------------------------------------------------------------------------- no processes needed


def test_fsdp_version_on_cpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ModelError, match="FSDP on CPU needs fsdp_version: 2") as info:
        distributed.check_engine_supports("none", cuda=False)
    assert "configs/accelerate/fsdp.yaml" in info.value.hint
    distributed.check_engine_supports("none", cuda=True)  # FSDP1 on GPUs: fine
    monkeypatch.setenv("FSDP_VERSION", "2")
    distributed.check_engine_supports("none", cuda=False)
    with pytest.raises(ModelError, match="4bit with FSDP needs CUDA"):  # QLoRA stays CUDA-only
        distributed.check_engine_supports("4bit", cuda=False)


def test_sharded_checkpoint_layout_is_complete_only_with_its_metadata(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    for name in ("trainer_state.json", "scheduler.pt", "pytorch_model_fsdp_0/__0_0.distcp",
                 "optimizer_0/__0_0.distcp"):
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_text("{}")
    assert incomplete_reason(ckpt) == "missing adapter_model.safetensors, optimizer.pt"
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_text("x")
    (ckpt / "optimizer_0" / ".metadata").write_text("x")
    assert incomplete_reason(ckpt) is None


def test_estimate_per_process(tmp_path, monkeypatch, capsys):
    """8 processes: FSDP holds a fraction of DDP's weights and optimizer state; DDP holds what one
    process does, plus its gradient buckets."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=16,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tmp_path / 'm'}}}\ndata: {{train: x.jsonl, max_length: 128}}\n")
    tables = {}
    for engine in ("ddp", "fsdp", "zero3"):
        code, out, err = lora_in_process(monkeypatch, capsys, "estimate", recipe, "--num-processes", "8",
                                         "--engine", engine, "--json")
        assert code == 0, err
        data = json.loads(out)
        assert data["per_process"]["engine"] == engine and data["per_process"]["num_processes"] == 8
        tables[engine] = data["per_process"]["memory"]
    one = data["memory"]
    for method in ("full", "lora", "qlora"):
        assert tables["ddp"][method]["weights"] == one[method]["weights"]
        assert tables["ddp"][method]["gradients"] == 2 * one[method]["gradients"]
        assert tables["fsdp"][method]["weights"] < one[method]["weights"] / 2
        assert tables["fsdp"][method]["optimizer"] == pytest.approx(one[method]["optimizer"] / 8)
        assert tables["fsdp"][method]["total"] < tables["ddp"][method]["total"]
        assert tables["fsdp"] == tables["zero3"]
    code, out, _ = lora_in_process(monkeypatch, capsys, "estimate", recipe, "--num-processes", "4")
    assert code == 0 and "memory per process, 4 processes with ddp (the frozen base is not sharded" in out
