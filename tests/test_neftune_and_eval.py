"""train.neftune_noise_alpha (the HF Trainer's NEFTune) and evaluation during training
(eval.batch_size, eval.max_rows, train.eval_every) on tiny real models."""

from __future__ import annotations

import json

import torch
from transformers import TrainerCallback

from lora_cli.commands.train import run as run_training
from lora_cli.data.packing import Collator
from lora_cli.data.prepare import prepare_data
from lora_cli.model.attach import attach_lora
from lora_cli.model.loading import load_base_model, load_tokenizer
from lora_cli.run.paths import RunPaths
from lora_cli.training.arguments import training_arguments
from lora_cli.training.trainer import LoraTrainer
from tests.helpers import PAIRS, chat_rows, read_metrics, tiny_recipe, write_jsonl


class EmbeddingProbe(TrainerCallback):
    """At each step: the input embeddings of fixed ids, twice in train mode and once in eval mode."""

    def __init__(self, ids):
        self.ids, self.seen = ids, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        embeddings = model.get_input_embeddings()
        with torch.no_grad():
            model.train()
            first, second = embeddings(self.ids), embeddings(self.ids)
            model.eval()
            evaluated = embeddings(self.ids)
            model.train()
        self.seen.append((first, second, evaluated, embeddings.weight[self.ids].detach().clone()))


def test_neftune_noises_embeddings_in_training_steps_only(tiny_llama, tmp_path):
    alpha = 5.0
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=1))
    recipe = tiny_recipe(tiny_llama, data, tmp_path / "run",
                         train={"max_steps": 2, "save_every": 1000, "neftune_noise_alpha": alpha})
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer, seed=0)
    model = attach_lora(load_base_model(recipe.model), recipe.lora, quantized=False, gradient_checkpointing=False)
    ids = torch.tensor([prepared.train[0]["input_ids"]])
    probe = EmbeddingProbe(ids)
    args = training_arguments(recipe, RunPaths(tmp_path / "run"), has_validation=False)
    assert args.neftune_noise_alpha == alpha
    trainer = LoraTrainer(model=model, args=args, train_dataset=prepared.train,
                          data_collator=Collator(tokenizer.pad_token_id), callbacks=[probe])
    trainer.train()

    assert len(probe.seen) == 2
    length, hidden = ids.shape[1], model.get_input_embeddings().weight.shape[1]
    bound = alpha / (length * hidden) ** 0.5  # NEFTune: uniform noise in ±alpha / sqrt(L·d)
    for first, second, evaluated, plain in probe.seen:
        assert not torch.equal(first, second)  # fresh noise at every forward pass in training
        assert 0 < (first - plain).abs().max() <= bound * 1.0001
        assert torch.equal(evaluated, plain)  # none in evaluation
    with torch.no_grad():  # and none once training is over (eval, merge, generate)
        model.train()
        assert torch.equal(model.get_input_embeddings()(ids), model.get_input_embeddings().weight[ids])


def test_eval_uses_its_own_batch_size_and_the_first_max_rows(tiny_llama, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2))
    held_out = [{"messages": [{"role": "user", "content": f"{q} please"}, {"role": "assistant", "content": a}]}
                for q, a in PAIRS] * 2
    validation = write_jsonl(tmp_path / "validation.jsonl", held_out)
    recipe = tiny_recipe(tiny_llama, train, tmp_path / "run", data={"validation": str(validation)},
                         train={"max_steps": 4, "save_every": 1000, "eval_every": 2, "batch_size": 8},
                         eval={"batch_size": 5, "max_rows": 5})
    args = training_arguments(recipe, RunPaths(tmp_path / "x"), has_validation=True)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (8, 5)

    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    out = capsys.readouterr().out
    assert "eval: 5 validation rows (the first 5 of 16: eval.max_rows) in batches of 5, every 2 steps" in out
    assert [m["step"] for m in read_metrics(result.paths.root) if "eval_loss" in m] == [2, 4]

    # The final eval loss is the trained model's loss on exactly the first 5 rows (one batch of 5).
    tokenizer = load_tokenizer(recipe.model)
    rows = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed).validation

    def loss_on(examples) -> float:
        batch = Collator(tokenizer.pad_token_id)(examples)
        with torch.no_grad():
            return result.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       labels=batch["labels"]).loss.item()

    final = json.loads(result.paths.run_json.read_text())["final"]["eval_loss"]
    assert abs(final - loss_on(rows[:5])) < 1e-4
    assert abs(final - loss_on(rows)) > 1e-3  # (all 16 rows would give another figure)
