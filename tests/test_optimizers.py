"""train.optimizer on tiny real runs: the checkpoint holds the named optimizer's state with the
recipe's hyperparameters, `lora estimate` counts that state to the byte, 8-bit states are
smaller, and --resume restores them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lora_cli.commands.train import run as run_training
from lora_cli.training.memory import estimate_memory
from lora_cli.training.optimizers import OPTIMIZERS
from tests.helpers import chat_rows, read_metrics, tiny_recipe, write_jsonl

# r=64 on the tiny Llama (hidden 64): every LoRA tensor has >= 4096 elements, so bitsandbytes
# keeps all of them in 8 bits (smaller ones stay in 32: the estimate test covers those too).
LORA = {"r": 64, "alpha": 64}
HYPER = {"weight_decay": 0.01, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}


def tensors(value):
    """Every tensor in a (nested) optimizer state."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)


def state_bytes(optimizer_state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(optimizer_state["state"]))


def state_keys(optimizer_state: dict) -> set[str]:
    keys = set()
    for per_param in optimizer_state["state"].values():
        keys |= set(per_param)
        keys |= set(per_param.get("__bnb_optimizer_quant_state__", {}))
    return keys


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """One 2-step run per optimizer, its checkpoint-2 optimizer state loaded."""
    tmp = tmp_path_factory.mktemp("optimizers")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(repeat=2))
    out = {}
    for name in OPTIMIZERS:
        recipe = tiny_recipe(tiny_llama, data, tmp / name, lora=LORA,
                             train={"optimizer": name, "max_steps": 2, "save_every": 2, "lr": 1e-3, **HYPER})
        run_training(recipe, recipe_path=None, resume=False, overwrite=False)
        state = torch.load(tmp / name / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=False)
        out[name] = (recipe, state)
    return out


# what identifies each optimizer's state: its keys (bitsandbytes: the quantized states and maps)
EXPECTED_KEYS = {
    "adamw_torch": {"exp_avg", "exp_avg_sq"},
    "adamw_torch_fused": {"exp_avg", "exp_avg_sq"},
    "adafactor": {"exp_avg_sq_row", "exp_avg_sq_col", "RMS"},
    "sgd": set(),
    "adamw_8bit": {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"},
    "lion_8bit": {"state1", "qmap1", "absmax1"},
    "paged_adamw_8bit": {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_checkpoint_holds_the_named_optimizers_state_and_the_estimate_counts_it(runs, name):
    recipe, state = runs[name]
    keys = state_keys(state) - {"step", "__bnb_optimizer_quant_state__"}
    assert keys == EXPECTED_KEYS[name], keys
    group = state["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3)
    decays = {g["weight_decay"] for g in state["param_groups"]}
    assert 0.01 in decays  # (the Trainer's second group, without decay, holds biases and norms)
    if OPTIMIZERS[name].betas:
        assert tuple(group["betas"]) == (0.8, 0.95)
    if OPTIMIZERS[name].epsilon:
        assert group["eps"] == 1e-6
    assert bool(group.get("fused")) is (name == "adamw_torch_fused")
    if name.endswith("8bit"):
        # tensors of 4096 elements or more in 8 bits (k_proj / v_proj's B is smaller: 32 bits)
        dtypes = [s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in state["state"].values()]
        assert dtypes.count(torch.uint8) > 0.7 * len(dtypes)
    # lora estimate: the optimizer row is this state, to the byte
    assert estimate_memory(recipe).memory["lora"]["optimizer"] == state_bytes(state)


def test_8bit_states_are_smaller(runs):
    measured = {name: state_bytes(state) for name, (_, state) in runs.items()}
    assert measured["sgd"] == 0
    # AdamW: 8 bytes per parameter; 8-bit: about 2, plus the block maxima and maps
    assert measured["adamw_8bit"] < 0.4 * measured["adamw_torch"]
    assert measured["paged_adamw_8bit"] == measured["adamw_8bit"]
    assert measured["lion_8bit"] < 0.55 * measured["adamw_8bit"]
    assert measured["adafactor"] < 0.1 * measured["adamw_torch"]


def test_estimate_keeps_small_tensors_in_32_bits(tiny_llama, tmp_path):
    """At r=8 every LoRA tensor is under bitsandbytes' 4096 elements: no saving at all."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=1))
    small = {name: estimate_memory(tiny_recipe(tiny_llama, data, tmp_path / "x", train={"optimizer": name}))
             for name in ("adamw_torch", "adamw_8bit")}
    lora = {name: est.memory["lora"]["optimizer"] for name, est in small.items()}
    trainable = small["adamw_torch"].shape.trainable_params
    assert lora["adamw_8bit"] == 8 * trainable
    assert lora["adamw_torch"] == 8 * trainable + 4 * small["adamw_torch"].shape.lora_tensors
    # full fine-tuning: 8-bit for the large matrices, 32 bits for the embeddings
    full = {name: est.memory["full"]["optimizer"] for name, est in small.items()}
    assert full["adamw_8bit"] < 0.6 * full["adamw_torch"]


def test_resume_restores_the_8bit_optimizer_state(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2))
    recipe = tiny_recipe(tiny_llama, data, tmp_path / "straight", lora=LORA,
                         train={"optimizer": "adamw_8bit", "max_steps": 4, "save_every": 2, "log_every": 1})
    straight = run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root

    def resumed(name: str, *, fresh_moments: bool) -> dict:
        """The straight run cut back to its step-2 checkpoint, then resumed to the end."""
        run = tmp_path / name
        shutil.copytree(straight, run)
        shutil.rmtree(run / "checkpoints" / "checkpoint-4")
        shutil.rmtree(run / "adapter")
        record = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
        if fresh_moments:  # the control: the same resume, the optimizer's state emptied
            saved = run / "checkpoints" / "checkpoint-2" / "optimizer.pt"
            torch.save({**torch.load(saved, weights_only=False), "state": {}}, saved)
        again = tiny_recipe(tiny_llama, data, run, lora=LORA,
                            train={"optimizer": "adamw_8bit", "max_steps": 4, "save_every": 2, "log_every": 1})
        return run_training(again, recipe_path=None, resume=True, overwrite=False).model.state_dict()

    from safetensors.torch import load_file

    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    losses = [m["loss"] for m in read_metrics(straight) if "loss" in m]
    assert losses[-1] < losses[0]

    def lora_weights(state: dict) -> dict:
        return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}

    restored = lora_weights(resumed("restored", fresh_moments=False))
    fresh = lora_weights(resumed("fresh", fresh_moments=True))
    assert expected.keys() == restored.keys()
    assert max((restored[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6
    # without its moments the same two steps land elsewhere: the state mattered
    assert max((fresh[k] - v).abs().max().item() for k, v in expected.items()) > 1e-4
