"""The chunked supervised-only loss (lora_cli/training/loss.py) equals the model's own loss, value and gradient."""

from __future__ import annotations

import pytest
import torch

from lora_cli.training import loss as chunked


def test_frozen_head_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))

    ours = chunked.frozen_head_cross_entropy(hidden, head, targets)
    (ours * 0.5).backward()  # a non-unit upstream gradient must scale ours too
    grad_ours = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (reference * 0.5).backward()

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, hidden.grad, rtol=1e-5, atol=1e-6)


def _peft_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.config.use_cache = False  # as in training (lora_cli/model/attach.py); packed rows need it
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _batch(vocab: int, packed: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two examples in row 0, position ids restart at 0 where the second one begins
        batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] + [list(range(12))] * 2)
        labels[0, 6] = -100
    else:
        mask = torch.ones_like(ids)
        mask[2, 9:] = 0
        batch["attention_mask"] = mask
    return batch


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_supervised_loss_equals_model_loss(tiny_model, packed):
    model = _peft_model(tiny_model)
    hf_model = model.get_base_model()
    head = chunked.plain_head(hf_model)
    assert head is not None, "tiny gpt2 / llama are plain-head architectures"
    batch = _batch(hf_model.config.vocab_size, packed)
    trainable = [p for p in model.parameters() if p.requires_grad]

    for n_items in (None, 40):  # the model's mean, and the Trainer's grad-accumulation divisor
        extra = {} if n_items is None else {"num_items_in_batch": n_items}
        reference = model(**batch, **extra).loss
        grads_reference = torch.autograd.grad(reference, trainable)
        ours = chunked.supervised_loss(model, hf_model, head, batch, n_items)
        grads_ours = torch.autograd.grad(ours, trainable)

        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_ours, grads_reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert type(hf_model.get_output_embeddings()) is torch.nn.Linear, "the head is put back"


def test_trainable_or_unlisted_heads_use_the_model_loss(tiny_gpt2):
    hf_model = _peft_model(tiny_gpt2).get_base_model()
    hf_model.get_output_embeddings().weight.requires_grad_(True)
    assert chunked.plain_head(hf_model) is None  # a trained head needs its weight gradient
    hf_model.get_output_embeddings().weight.requires_grad_(False)
    hf_model.config.model_type = "gemma2"  # soft-capped logits: not lm_head(hidden)
    assert chunked.plain_head(hf_model) is None


def test_trainer_uses_it_for_training_and_evaluation_with_the_same_result(tiny_llama, tmp_path):
    """LoraTrainer's loss (train step and evaluate) equals the Trainer's own, on a padded batch."""
    from transformers import TrainingArguments

    from lora_cli.data.packing import Collator
    from lora_cli.training.trainer import LoraTrainer

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 2 + list(range(5, 3 + n))} for n in (5, 9, 7, 12)]
    results = {}
    for chunked_loss in (True, False):
        model = _peft_model(tiny_llama)
        trainer_cls = LoraTrainer
        trainer_cls.use_chunked_loss = chunked_loss
        args = TrainingArguments(output_dir=str(tmp_path / str(chunked_loss)), per_device_eval_batch_size=2,
                                 report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = trainer_cls(model=model, args=args, eval_dataset=rows, data_collator=Collator(0, count_tokens=True))
        assert (trainer._plain_head(model) is not None) == chunked_loss
        batch = trainer._prepare_inputs(Collator(0)(rows))
        results[chunked_loss] = (trainer.evaluate()["eval_loss"], float(trainer.compute_loss(model, batch).detach()))
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-6)
