"""LoRA dropout and input cast folded into lora_A (lora_cli/model/lean_dropout.py): same training,
less memory, and on the CPU masks drawn faster than F.dropout's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli.model.lean_dropout import DropoutThenLinear, cpu_dropout_mask, fold_lora_dropout

ROOT = Path(__file__).resolve().parents[1]


def _peft_model(model_dir, *, dropout: float, checkpointing: bool = False, dora: bool = False, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # init_lora_weights=False: B is not zero, so lora_A gets a gradient from the first step
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                        init_lora_weights=False, use_dora=dora, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _train_steps(model, steps: int = 3) -> tuple[list[float], list[dict]]:
    """A few AdamW steps on fixed random batches, seeding the global RNG as the Trainer does."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    vocab = model.config.vocab_size
    losses, grads = [], []
    torch.manual_seed(123)  # the dropout masks come from here
    for step in range(steps):
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


class SameMasksDropout(torch.nn.Module):
    """peft's dropout module drawing the folded layer's CPU masks: plain peft given the same masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        dropped, scale = cpu_dropout_mask(x, self.p)
        return x.masked_fill(dropped, 0) * scale


def _with_same_masks(model):
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = SameMasksDropout(dropout.p)
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.3), (torch.bfloat16, 0.3), (torch.bfloat16, 0.0)],
                         ids=["float32", "bfloat16", "bfloat16-no-dropout"])
def test_folded_dropout_trains_like_peft(tiny_model, checkpointing, dtype, dropout):
    """The folded layer against peft's own, given the same masks (peft's dropout module swapped for
    one drawing `cpu_dropout_mask`'s): the losses and every gradient agree, so the backward pass
    redraws the forward's masks. Only the order of the scaling differs (after lora_A when folded),
    hence rounding tolerances (below); with no dropout there is nothing to reorder: bit for bit.
    A bfloat16 base trains float32 adapters (peft's default): there the cast is folded too."""
    plain = _with_same_masks(_peft_model(tiny_model, dropout=dropout, checkpointing=checkpointing, dtype=dtype))
    folded = _peft_model(tiny_model, dropout=dropout, checkpointing=checkpointing, dtype=dtype)
    assert {p.dtype for n, p in folded.named_parameters() if "lora_" in n} == {torch.float32}
    assert fold_lora_dropout(folded) > 0

    plain_losses, plain_grads = _train_steps(plain)
    folded_losses, folded_grads = _train_steps(folded)

    if dropout == 0:  # nothing reordered: bit for bit
        steps, loss_rtol, grad_rtol = 3, 0.0, 0.0
    elif dtype == torch.float32:  # measured: 2e-6 of the largest gradient
        steps, loss_rtol, grad_rtol = 3, 1e-5, 1e-5
    else:  # bfloat16 rounds the sum of base and adapter, amplifying the reordering (measured on
        # the tiny Llama at the first step: 1.5% of the largest gradient, 2e-4 of the loss; with
        # F.dropout's masks instead: 200% and 5e-3); later steps compound it: the first is compared
        steps, loss_rtol, grad_rtol = 1, 1e-3, 5e-2
    for ours, theirs in zip(folded_losses[:steps], plain_losses[:steps]):
        assert abs(ours - theirs) <= loss_rtol * abs(theirs), (folded_losses, plain_losses)
    for ours, theirs in zip(folded_grads[:steps], plain_grads[:steps]):
        assert ours.keys() == theirs.keys()
        for name in ours:  # relative to the tensor's largest gradient
            assert (ours[name] - theirs[name]).abs().max().item() <= grad_rtol * theirs[name].abs().max().item(), name
    if dropout > 0:  # and the dropout is really on: a second forward in training mode gives another loss
        ids = torch.randint(0, folded.config.vocab_size, (2, 16))
        with torch.no_grad():
            assert folded(input_ids=ids, labels=ids).loss != folded(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_cpu_dropout_masks_drop_at_the_rate_asked(p):
    """Each of the four 16-bit draws in a 64-bit word drops at p (a word drawn over int64's
    default range would keep its top bit 0 and drop one element in four far less often), the
    kept elements are scaled to an unbiased mean, and the masks follow the seeded generator."""
    x = torch.ones(1_000_003)  # not a multiple of 4: the last word is partly used
    torch.manual_seed(7)
    dropped, scale = cpu_dropout_mask(x, p)
    sigma = (p * (1 - p) / (x.numel() / 4)) ** 0.5
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - p) < 6 * sigma, lane
    rate = round(p * 65536) / 65536
    assert abs(rate - p) < 1e-5 and scale * (1 - rate) == pytest.approx(1, abs=1e-12)
    kept_mean = x.masked_fill(dropped, 0).mul(scale).mean().item()
    assert abs(kept_mean - 1) < 6 * (p / (1 - p) / x.numel()) ** 0.5
    torch.manual_seed(7)
    assert torch.equal(cpu_dropout_mask(x, p)[0], dropped)
    assert not torch.equal(cpu_dropout_mask(x, p)[0], dropped)


def test_folded_dropout_is_off_in_eval_and_saves_the_standard_adapter(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folded = _peft_model(tiny_llama, dropout=0.5)
    fold_lora_dropout(folded)
    folded.eval()
    ids = torch.randint(0, folded.config.vocab_size, (2, 16))
    with torch.no_grad():
        first, second = folded(input_ids=ids).logits, folded(input_ids=ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    folded.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not any(isinstance(m, DropoutThenLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, first, rtol=0, atol=1e-6)


def test_left_alone_without_dropout_or_cast_or_with_dora(tiny_llama):
    assert fold_lora_dropout(_peft_model(tiny_llama, dropout=0.0)) == 0  # nothing to fold
    assert fold_lora_dropout(_peft_model(tiny_llama, dropout=0.1, dora=True)) == 0
    assert fold_lora_dropout(_peft_model(tiny_llama, dropout=0.1, dora=True, dtype=torch.bfloat16)) == 0


def _peak_training_mb(tmp_path: Path, name: str, *, plain: bool, dtype: str = "float32", dropout: float = 0.1) -> float:
    from tests.test_estimate import build_memory_model

    model_dir = tmp_path / "model"
    if not (model_dir / "config.json").exists():
        build_memory_model(model_dir)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"model: {{name: {model_dir}, dtype: {dtype}}}\n"
        f"lora: {{r: 8, alpha: 16, dropout: {dropout}}}\n"
        f"data: {{train: {model_dir}/data.jsonl, max_length: 256}}\n"
        "train: {max_steps: 2, batch_size: 4, log_every: 1, save_every: 1000}\n"
        f"output_dir: {tmp_path}/{name}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, str(ROOT / "tests" / "memprobe.py"), str(recipe)] + (
        ["--plain-lora-dropout"] if plain else []
    )
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def test_folded_dropout_lowers_peak_training_memory(tmp_path):
    """`lora train` with dropout 0.1 on a 12M Llama (4 layers, batch 4 x 256): peak RSS with
    the folded dropout vs peft's own. peft keeps, per adapted linear, the dropped-out input
    (4 bytes) and its mask (1 byte) per input feature and token: q,k,v,o,gate,up read 512
    features, down 1376, so 4 layers x 1024 tokens x 4448 x 5 bytes = 87 MB."""
    expected_mb = 4 * 1024 * (6 * 512 + 1376) * 5 / 2**20
    plain = _peak_training_mb(tmp_path, "plain", plain=True)
    folded = _peak_training_mb(tmp_path, "folded", plain=False)
    print(
        f"peak above imports: peft dropout {plain:.0f} MB, folded {folded:.0f} MB "
        f"(expected saving {expected_mb:.0f} MB)"
    )
    assert plain - folded > 0.6 * expected_mb, (plain, folded)


def _saved_by_lora_a(model, ids) -> list[tuple[torch.dtype, int]]:
    """(dtype, elements) of each activation autograd keeps for lora_A's backward pass in one
    training forward (its weight, a parameter, left out)."""
    params = {p.data_ptr() for p in model.parameters()}
    inside, saved = [False], []

    def keep(tensor):
        if inside[0] and tensor.data_ptr() not in params:
            saved.append((tensor.dtype, tensor.numel()))
        return tensor

    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
            module.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return saved


def test_folded_cast_keeps_no_float32_copy_of_a_bfloat16_base(tiny_llama):
    """A bfloat16 base, dropout off: peft keeps a float32 copy of each adapted linear's input
    for lora_A's backward (4 bytes per input feature and token); folded, lora_A keeps only a
    reference to the bfloat16 input. Counted with autograd's saved-tensor hooks, which is exact
    (peak RSS moves by tens of MB from run to run)."""
    plain = _peft_model(tiny_llama, dropout=0.0, dtype=torch.bfloat16)
    folded = _peft_model(tiny_llama, dropout=0.0, dtype=torch.bfloat16)
    assert fold_lora_dropout(folded) > 0
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))
    inputs = sorted(ids.numel() * m.in_features for name, m in plain.named_modules() if name.endswith("lora_A.default"))
    assert sorted(_saved_by_lora_a(plain, ids)) == sorted((torch.float32, n) for n in inputs)
    assert sorted(_saved_by_lora_a(folded, ids)) == sorted((torch.bfloat16, n) for n in inputs)
