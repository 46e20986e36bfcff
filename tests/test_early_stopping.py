"""Early stopping (train.early_stopping_patience) and the best adapter (train.keep_best), judged by
the eval loss: a run on data it overfits stops before its last step and saves the adapter of its
best evaluation, which run.json names."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerState

from lora_cli.commands.train import run as run_training
from lora_cli.training.early_stopping import EarlyStopping
from tests.helpers import PAIRS, read_metrics, tiny_recipe, write_jsonl

MAX_STEPS = 60


def _logits(model_dir, adapter, ids):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_run_that_overfits_stops_early_and_saves_its_best_adapter(tiny_gpt2, tmp_path):
    # The validation answers contradict the training ones: the eval loss falls while the model
    # learns the format, then rises as it learns the training answers by heart.
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q + "\n", "completion": a} for q, a in PAIRS] * 4)
    validation = write_jsonl(tmp_path / "val.jsonl", [{"prompt": q + "\n", "completion": a.split()[0] + " other."}
                                                      for q, a in PAIRS])
    recipe = tiny_recipe(
        tiny_gpt2, train, tmp_path / "run",
        data={"validation": str(validation)},
        train={"max_steps": MAX_STEPS, "log_every": 2, "eval_every": 2, "early_stopping_patience": 2,
               "keep_best": True, "save_total_limit": 1},
    )
    result = run_training(recipe, recipe_path=None, resume=False, overwrite=False)
    run = result.paths.root
    final = json.loads((run / "run.json").read_text())["final"]
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(run) if "eval_loss" in m}
    best = min(evals, key=evals.get)

    assert final["stopped_early"] is True and final["global_step"] < MAX_STEPS
    # It stopped `patience` evaluations after the best, none of which improved on it.
    assert sorted(evals)[-3:] == [best, best + 2, best + 4] == [best, best + 2, final["global_step"]]
    assert final["best_step"] == best and final["best_eval_loss"] == evals[best] == final["eval_loss"]
    card = (run / "adapter" / "README.md").read_text()
    assert f"| adapter from step | {best} (lowest eval loss" in card and "| stopped early |" in card

    # The saved adapter is the best checkpoint's (which the rotation kept, save_total_limit 1
    # notwithstanding), not the last step's.
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"checkpoint-{best}", f"checkpoint-{final['global_step']}"]
    ids = torch.tensor([[5, 17, 42, 9, 3, 77, 12]])
    saved = _logits(tiny_gpt2, run / "adapter", ids)
    assert torch.equal(saved, _logits(tiny_gpt2, run / "checkpoints" / f"checkpoint-{best}", ids))
    last = _logits(tiny_gpt2, run / "checkpoints" / f"checkpoint-{final['global_step']}", ids)
    assert (saved - last).abs().max() > 1e-3
    with torch.no_grad():  # the model in memory was rolled back too
        assert torch.allclose(result.model.eval()(input_ids=ids).logits, saved, atol=1e-6)


def test_the_patience_counter_is_rebuilt_from_the_log_history_on_resume():
    """A resumed run's callback starts from the checkpoint's evaluations, judged as they were:
    each against the best before it, improvements smaller than the threshold not counted."""
    state = TrainerState()
    state.log_history = [{"loss": 3.0, "step": 1}, {"eval_loss": 2.0, "step": 2}, {"eval_loss": 1.5, "step": 4},
                         {"eval_loss": 1.6, "step": 6}, {"eval_loss": 1.45, "step": 8}]

    class Args:
        load_best_model_at_end, metric_for_best_model, eval_strategy = False, "eval_loss", "steps"

    callback = EarlyStopping(early_stopping_patience=3, early_stopping_threshold=0.1)
    callback.on_train_begin(Args, state, None)
    assert callback.early_stopping_patience_counter == 2  # 1.6 is worse, 1.45 better by less than 0.1
    callback = EarlyStopping(early_stopping_patience=3)
    callback.on_train_begin(Args, state, None)
    assert callback.early_stopping_patience_counter == 0  # 1.45 is the best so far


def test_validate_says_when_nothing_would_be_evaluated_before_the_end(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """Evaluations come at epoch ends without train.eval_every: a run shorter than an epoch would
    never act on early stopping or keep_best. lora validate (and lora train) say so."""
    from tests.helpers import lora_in_process

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q + "\n", "completion": a} for q, a in PAIRS] * 4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_gpt2}}}\ndata: {{train: {data}, val_split: 0.25, max_length: 32}}\n"
                      "train: {max_steps: 2, batch_size: 4, early_stopping_patience: 2, keep_best: true}\n")
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", recipe, "--preview", "0")
    assert code == 0, err
    assert ("note: train.early_stopping_patience and keep_best act on evaluations during training, and there "
            "is none: train.max_steps 2 ends the run within its first epoch (6 steps); set train.eval_every") in out
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", recipe, "--preview", "0", "train.eval_every=1")
    assert code == 0 and "act on evaluations" not in out, err
