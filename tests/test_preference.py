"""Preference tuning (train.method dpo / orpo) on the tiny Llama: a learnable synthetic task
(the chosen answer ends with " yes", the rejected one with " no"; the random base prefers " no"),
held-out pairs on other prompts, the reference = the adapter-off base, exact Ctrl-C + --resume,
and the pairs' tokens, report and preview."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.commands.eval import run as run_eval
from lora_cli.commands.train import run as run_training
from lora_cli.data.preference import prepare_preferences, tokenize_pairs
from lora_cli.errors import Interrupted
from lora_cli.inference.generation import encode_prompt
from lora_cli.inference.preference_scoring import answer_logps, preference_scores
from lora_cli.model.attach import attach_lora
from lora_cli.recipe.load import recipe_from_dict
from lora_cli.run.paths import RunPaths
from lora_cli.training.arguments import training_arguments
from lora_cli.training.memory import estimate_memory
from lora_cli.training.preference import preference_trainer
from tests.helpers import lora_in_process, read_metrics, tiny_recipe, write_jsonl
from tests.test_resume import _train_until_ctrl_c

TRAIN_WORDS = ["fox", "dog", "one", "ten", "model", "paris", "world", "word"]
HELD_OUT_WORDS = ["two", "three", "cat", "tiny", "quick", "brown", "lazy", "time"]
TRAIN = {"max_steps": 12, "batch_size": 8, "lr": 5e-3, "log_every": 2, "eval_every": 6}


def pairs(words, chosen=" yes", rejected=" no"):
    return [{"prompt": f"Define: {w}\n", "chosen": f"a {w}{chosen}", "rejected": f"a {w}{rejected}"} for w in words]


def _preference_run(model, tmp, method: str, **train):
    data = write_jsonl(tmp / "train.jsonl", pairs(TRAIN_WORDS) * 2)
    held_out = write_jsonl(tmp / "held_out.jsonl", pairs(HELD_OUT_WORDS))
    recipe = tiny_recipe(model, data, tmp / "runs" / method, train={**TRAIN, "method": method, **train},
                         data={"validation": str(held_out)})
    return run_training(recipe, recipe_path=None, resume=False, overwrite=False).paths.root


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, tmp_path_factory):
    return _preference_run(tiny_llama, tmp_path_factory.mktemp("dpo"), "dpo")


def test_dpo_raises_held_out_preference_accuracy_above_the_base(dpo_run, capsys):
    result = run_eval(dpo_run, as_json=True)
    base, adapter = result["base"], result["adapter"]
    assert result["method"] == "dpo" and result["data"]["rows"] == len(HELD_OUT_WORDS)
    assert base["preference_accuracy"] <= 0.5  # the task: the random base prefers " no"
    assert adapter["preference_accuracy"] >= 0.875 > base["preference_accuracy"]
    assert adapter["mean_margin"] > 0 > base["mean_margin"]
    assert adapter["reward_accuracy"] >= 0.875 and adapter["reward_margin"] > 0
    assert {"loss", "perplexity"} <= base.keys() and "reward_accuracy" not in base
    assert json.loads((dpo_run / "eval.json").read_text()) == result


def test_dpo_adapter_reloads_with_the_rewards_it_trained_to(dpo_run, capsys):
    """eval.json's rewards come from the saved adapter reloaded with PeftModel onto a fresh base;
    TRL computed the same rewards in memory at the last step of training."""
    last_eval = [m for m in read_metrics(dpo_run) if "eval_rewards/margins" in m][-1]
    assert last_eval["step"] == TRAIN["max_steps"]
    adapter = run_eval(dpo_run, as_json=True)["adapter"]
    assert adapter["reward_margin"] == pytest.approx(last_eval["eval_rewards/margins"], abs=1e-4)
    assert adapter["reward_chosen"] == pytest.approx(last_eval["eval_rewards/chosen"], abs=1e-4)
    assert adapter["reward_accuracy"] == pytest.approx(last_eval["eval_rewards/accuracies"])


def test_dpo_metrics_have_the_methods_own_keys(dpo_run):
    train_lines = [m for m in read_metrics(dpo_run) if "loss" in m]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "supervised_tokens"):
        assert all(key in m for m in train_lines), key
    assert train_lines[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts as the base
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]
    record = json.loads((dpo_run / "run.json").read_text())
    assert record["status"] == "completed" and record["data"]["report"]["format"] == "preference"


def test_orpo_raises_held_out_preference_accuracy_above_the_base(tiny_llama, tmp_path, capsys):
    run = _preference_run(tiny_llama, tmp_path, "orpo", lr=1e-2)
    assert any("nll_loss" in m for m in read_metrics(run))
    result = run_eval(run, as_json=True)
    assert result["adapter"]["preference_accuracy"] > result["base"]["preference_accuracy"]
    assert result["adapter"]["preference_accuracy"] >= 0.875
    assert "reward_accuracy" not in result["adapter"]  # ORPO has no reference model


def test_the_reference_is_the_adapter_off_base(tiny_llama, tmp_path):
    """No second model and no copy of the adapter: after training steps the reference
    log-probabilities are still exactly those of the untouched base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    recipe = tiny_recipe(tiny_llama, tmp_path / "unused.jsonl", tmp_path / "run",
                         train={"method": "dpo", "max_steps": 2})
    train, _ = tokenize_pairs(pairs(TRAIN_WORDS), recipe.data, tokenizer, source="pairs")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base_tensors = len(list(base.parameters()))
    model = attach_lora(base, recipe.lora, quantized=False, gradient_checkpointing=False)
    trainer = preference_trainer("dpo", model=model, args=training_arguments(recipe, RunPaths(tmp_path / "run"),
                                 has_validation=False), beta=0.1, max_length=64, train=train, validation=None,
                                 tokenizer=tokenizer, callbacks=[])
    assert list(model.peft_config) == ["default"] and trainer.ref_model is None
    lora_tensors = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
    assert len(list(model.parameters())) == base_tensors + lora_tensors  # one base, one adapter
    trainer.train()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert any(bool(p.abs().sum() > 0) for p in lora_b)  # the adapter moved

    batch = trainer._prepare_inputs(trainer.data_collator(train))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    expected = answer_logps(fresh, train, tokenizer.pad_token_id, batch_size=len(train))
    assert torch.allclose(ref_chosen, torch.tensor(expected["chosen"]), atol=1e-4)
    assert torch.allclose(ref_rejected, torch.tensor(expected["rejected"]), atol=1e-4)
    policy = answer_logps(model.eval(), train, tokenizer.pad_token_id, batch_size=len(train))
    assert preference_scores(policy, beta=0.1, average=False)["mean_margin"] > \
        preference_scores(expected, beta=0.1, average=False)["mean_margin"]


def test_dpo_ctrl_c_and_resume_end_with_the_uninterrupted_adapter(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs(TRAIN_WORDS) * 2)  # 2 steps per epoch
    train = {"method": "dpo", "max_steps": 6, "log_every": 1, "lr": 5e-3, "scheduler": "linear"}
    straight = tiny_recipe(tiny_llama, data, tmp_path / "runs" / "straight", train=train)
    run_training(straight, recipe_path=None, resume=False, overwrite=False)
    recipe = tiny_recipe(tiny_llama, data, tmp_path / "runs" / "interrupted", train=train)
    stopped = _train_until_ctrl_c(recipe, 3)  # mid epoch 2
    assert isinstance(stopped, Interrupted) and "interrupted at step 3" in stopped.message
    result = run_training(recipe, recipe_path=None, resume=True, overwrite=False)
    assert result.final["global_step"] == 6
    expected = load_file(str(tmp_path / "runs" / "straight" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(result.paths.root / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    straight_losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "runs" / "straight") if "loss" in m}
    resumed_losses = {m["step"]: m["loss"] for m in read_metrics(result.paths.root) if "loss" in m}
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], abs=1e-5), step


# --------------------------------------------------------------------------- data, report, estimate


def _cfg(**kw):
    return SimpleNamespace(**{"max_length": 64, "too_long": "truncate", "system_prompt": None,
                              "train_on_prompt": False, **kw})


def test_pairs_are_tokenized_as_generate_encodes_prompts(llama_tokenizer):
    tok = llama_tokenizer
    (plain,), _ = tokenize_pairs([{"prompt": "Define: fox\n", "chosen": "a fox yes", "rejected": "a fox no"}],
                                 _cfg(), tok, source="p")
    assert plain["prompt_ids"] == encode_prompt(tok, "Define: fox\n", chat=False)
    assert plain["chosen_ids"] == tok("a fox yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chat_row = {"prompt": [{"role": "user", "content": "Define: fox"}],
                "chosen": [{"role": "assistant", "content": "a fox yes"}],
                "rejected": [{"role": "assistant", "content": "a fox no"}]}
    (chat,), counts = tokenize_pairs([chat_row], _cfg(system_prompt="Be brief."), tok, source="c")
    assert counts.format == "preference-chat"
    assert chat["prompt_ids"] == encode_prompt(tok, "Define: fox", chat=True, system_prompt="Be brief.")
    assert tok.decode(chat["chosen_ids"]) == "a fox yes<|im_end|>\n"  # the template's end of turn (= EOS)


def test_truncation_cuts_both_answers_and_drops_pairs_that_differ_only_past_max_length(llama_tokenizer):
    tok = llama_tokenizer
    prompt = tok("Define: fox\n", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "Define: fox\n", "chosen": "one two three four five six yes", "rejected": "one two no"},
            {"prompt": "Define: fox\n", "chosen": "one two three four five six seven", "rejected": "one two three "
             "four five six eight"}]
    room = 6
    kept, counts = tokenize_pairs(rows, _cfg(max_length=len(prompt) + room), tok, source="t")
    assert len(kept) == 1 and counts.truncated == 1 and counts.dropped == 1
    assert len(kept[0]["chosen_ids"]) == room and len(kept[0]["rejected_ids"]) <= room
    assert "differ only past max_length" in counts.dropped_where[0]


def test_validate_reports_pairs_and_previews_them_masked(tiny_llama, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(TRAIN_WORDS))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"model:\n  name: {tiny_llama}\ndata:\n  train: {data}\n  val_split: 0.25\n"
                      "train:\n  method: dpo\n  beta: 0.2\n")
    code, out, err = lora_in_process(monkeypatch, capsys, "validate", recipe, "--preview", "1")
    assert code == 0, err
    assert "format preference (plain text) (auto-detected), for train.method: dpo" in out
    assert "train: 6 pairs" in out and "validation: 2 pairs" in out
    assert "chosen lengths" in out and "rejected lengths" in out
    assert "chosen: [masked]Define: fox\n[/]a fox yes" in out
    assert "rejected: [masked]Define: fox\n[/]a fox no" in out
    assert "(x2: chosen and rejected rows, train.method dpo)" in out


def test_prepared_validation_split_is_the_one_eval_rebuilds(llama_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(TRAIN_WORDS + HELD_OUT_WORDS))
    cfg = recipe_from_dict({"data": {"train": str(data), "val_split": 0.25}, "train": {"method": "dpo"}}).data
    first = prepare_preferences(cfg, llama_tokenizer, seed=3)
    again = prepare_preferences(cfg, llama_tokenizer, seed=3)
    assert first.report.fingerprint == again.report.fingerprint
    assert len(first.validation) == 4 and len(first.train) == 12


def test_estimate_counts_chosen_and_rejected_rows(tiny_llama, tmp_path):
    def acts(method: str, batch: int) -> float:
        raw = {"model": {"name": str(tiny_llama), "dtype": "float32"}, "data": {"max_length": 64},
               "train": {"method": method, "batch_size": batch}}
        return estimate_memory(recipe_from_dict(raw)).memory["lora"]["activations"]

    # DPO's batch of B pairs runs 2B rows: about the activations of an sft batch of 2B (the
    # loss terms differ: TRL's log-probability tiles vs our chunked loss)
    assert acts("dpo", 4) > 1.5 * acts("sft", 4)
    assert acts("dpo", 4) == pytest.approx(acts("sft", 8), rel=0.25)
    assert acts("orpo", 4) > acts("dpo", 4)  # ORPO keeps the full logits
