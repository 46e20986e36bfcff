"""`lora eval`: loss and perplexity of the base and of the adapter on held-out data, side by side
(inference/scoring.py defines both); with --exact-match, greedy answers against the references.
For a preference run (train.method dpo / orpo), on held-out pairs: preference accuracy and mean
margin of base and adapter, DPO's implicit rewards, and the loss on the chosen answers
(inference/preference_scoring.py).

Held-out data is the run's validation split, rebuilt from its recipe exactly as training built it
(same tokenizer, format, masking and seed), or `--data FILE` in any format training accepts. Rows
are never packed. Both models are the same loaded base: the adapter is switched off with peft's
`disable_adapter()` for the base numbers. Writes RUN/eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lora_cli.console import info, quiet_libraries
from lora_cli.data.formats import detect_format
from lora_cli.data.preference import as_sft_examples, prepare_preferences, tokenize_pairs
from lora_cli.data.prepare import prepare_data
from lora_cli.data.records import load_records
from lora_cli.data.tokenize import IGNORE_INDEX, tokenize_records
from lora_cli.errors import DataError, EvalWriteError, LoraError, NonFiniteLoss
from lora_cli.fsutil import atomic_write_json, cannot_write_in
from lora_cli.inference.generation import eos_token_ids
from lora_cli.inference.preference_scoring import answer_logps, preference_scores, reward_scores
from lora_cli.inference.scoring import answer_text, greedy_answers, loss_and_perplexity, qa_pairs, token_nll
from lora_cli.model.adapters import load_adapter
from lora_cli.model.facts import model_context
from lora_cli.model.loading import load_base_model, load_tokenizer, place_for_inference
from lora_cli.model.sources import resolve_model_source
from lora_cli.run.lookup import resolve_run
from lora_cli.run.paths import RunPaths
from lora_cli.run.recipes import load_run_recipe
from lora_cli.run.record import read_record

SAMPLES = 5  # exact match: answers kept in eval.json, to see what the numbers mean


def run(
    run: str | Path | None,
    *,
    data: str | None = None,
    as_json: bool = False,
    exact_match: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate base vs adapter; write RUN/eval.json; print a table (or JSON). Returns the result."""
    if batch_size < 1:
        raise LoraError(
            f"--batch-size must be at least 1, got {batch_size}", "Use --batch-size 8, or 1 to save memory."
        )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LoraError(
            f"--max-new-tokens must be at least 1, got {max_new_tokens}", "Leave it out to use each reference's length."
        )
    if max_new_tokens is not None and not exact_match:
        info("note: --max-new-tokens only applies with --exact-match")
    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    if data is not None and not Path(data).exists() and Path(data).suffix:
        raise DataError(
            f"--data: file not found: {data}", "Check the path (relative paths are relative to the current directory)."
        )
    check_can_write_eval(paths)  # before the work, not after it

    quiet_libraries()
    source = resolve_model_source(recipe.model)
    tokenizer = load_tokenizer(recipe.model, source)
    if recipe.train.method != "sft":
        if exact_match:
            raise LoraError(
                f"--exact-match compares answers of supervised runs; {paths.root} is a train.method: "
                f"{recipe.train.method} run",
                "Drop --exact-match: lora eval reports preference accuracy and margins for this run.",
            )
        return _write_and_show(paths, _evaluate_pairs(recipe, paths, source, tokenizer, data, batch_size), as_json)
    examples, fmt, data_source = eval_examples(recipe, tokenizer, paths, data)
    if exact_match and fmt == "text":
        raise DataError(
            "--exact-match needs prompts with reference answers (completion, alpaca or chat data); this data is text",
            "Drop --exact-match, or pass --data with {prompt, completion} or {messages} rows.",
        )
    supervised = sum(1 for ex in examples for label in ex["labels"][1:] if label != IGNORE_INDEX)
    info(
        f"run: {paths.root}  base: {source.description}  "
        f"data: {data_source} ({len(examples)} rows, {supervised} supervised tokens)"
    )

    model, pad = _run_model(recipe, paths, source, tokenizer)
    with model.disable_adapter():
        base_total, count = token_nll(model, examples, pad, batch_size)
    adapter_total, _ = token_nll(model, examples, pad, batch_size)
    _check_finite(paths, base_total, adapter_total)
    result = {
        "run": str(paths.root),
        "base": loss_and_perplexity(base_total, count),
        "adapter": loss_and_perplexity(adapter_total, count),
    }
    result["change"] = _change(result["base"], result["adapter"], ("loss", "perplexity"))
    result["data"] = {"source": data_source, "format": fmt, "rows": len(examples), "supervised_tokens": count}

    if exact_match:
        if recipe.data.train_on_prompt:  # the prompts were supervised too: re-mask them to find the answers
            examples, _, _ = eval_examples(recipe, tokenizer, paths, data, train_on_prompt=False)
        result["exact_match"] = _exact_match(model, tokenizer, examples, max_new_tokens, batch_size)
    return _write_and_show(paths, result, as_json)


def _run_model(recipe, paths: RunPaths, source, tokenizer):
    """The run's base with its adapter, ready to score; and the pad id batches use."""
    base = load_base_model(recipe.model, source)
    model = load_adapter(base, paths.adapter)
    place_for_inference(model, quantized=recipe.model.quantization != "none")
    model.eval()
    return model, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _check_finite(paths: RunPaths, base_total: float, adapter_total: float) -> None:
    # A NaN loss would print as "nan", exit 0 and put NaN (not JSON) into eval.json.
    for what, total in (("the base model", base_total), ("the adapter", adapter_total)):
        if not math.isfinite(total):
            raise NonFiniteLoss(
                f"{paths.root}: the loss of {what} is not finite ({total}): its outputs are "
                f"NaN or inf" + (", the run diverged" if what == "the adapter" else "") + "; eval.json was not written",
                "Retrain with a lower train.lr (`lora runs` and the run's metrics.jsonl show where the loss went bad)."
                if what == "the adapter"
                else "The base model's weights may be broken, or overflow in this dtype.",
            )


def _evaluate_pairs(recipe, paths: RunPaths, source, tokenizer, data: str | None, batch_size: int) -> dict:
    """A preference run: both models on held-out pairs (inference/preference_scoring.py)."""
    method, beta = recipe.train.method, recipe.train.beta
    pairs, fmt, data_source = eval_pairs(recipe, tokenizer, paths, data)
    chosen = as_sft_examples(pairs)
    info(f"run: {paths.root}  base: {source.description}  data: {data_source} ({len(pairs)} pairs)")
    model, pad = _run_model(recipe, paths, source, tokenizer)
    with model.disable_adapter():
        base_logps = answer_logps(model, pairs, pad, batch_size)
        base_total, count = token_nll(model, chosen, pad, batch_size)
    adapter_logps = answer_logps(model, pairs, pad, batch_size)
    adapter_total, _ = token_nll(model, chosen, pad, batch_size)
    _check_finite(paths, base_total, adapter_total)
    average = method == "orpo"  # ORPO scores answers by their per-token log-probability
    result = {
        "run": str(paths.root),
        "method": method,
        "beta": beta,
        "base": {**loss_and_perplexity(base_total, count), **preference_scores(base_logps, beta=beta, average=average)},
        "adapter": {**loss_and_perplexity(adapter_total, count),
                    **preference_scores(adapter_logps, beta=beta, average=average)},
    }
    if method == "dpo":
        result["adapter"].update(reward_scores(adapter_logps, base_logps, beta=beta))
    result["change"] = _change(result["base"], result["adapter"], PAIR_KEYS)
    result["data"] = {"source": data_source, "format": fmt, "rows": len(pairs), "supervised_tokens": count,
                      "loss_on": "chosen answers"}
    return result


PAIR_KEYS = ("loss", "perplexity", "preference_accuracy", "mean_margin")


def _write_and_show(paths: RunPaths, result: dict, as_json: bool) -> dict:
    try:
        atomic_write_json(paths.eval_json, result)
    except OSError as e:  # the numbers are shown all the same: the work is not lost
        show_result(result, as_json)
        raise EvalWriteError(
            f"cannot write {paths.eval_json}: {e.strerror or e}; the results above were not saved",
            "Free some disk space or make the run directory writable, then run `lora eval` again "
            "(or keep the numbers above, e.g. with --json > FILE).",
        ) from None
    show_result(result, as_json)
    if not as_json:
        info(f"written to {paths.eval_json}")
    return result


def _exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int | None, batch_size: int) -> dict:
    """Greedy answers of the base and of the adapter against each example's reference answer."""
    pairs = qa_pairs(examples)
    eos = eos_token_ids(model, tokenizer)
    prompts = [p for p, _ in pairs]
    context = model_context(model.config)
    limits = [max_new_tokens or len(ref) + 8 for _, ref in pairs]
    if context:
        limits = [max(1, min(n, context - len(p))) for n, (p, _) in zip(limits, pairs)]
    refs = [answer_text(tokenizer, ref) for _, ref in pairs]
    em = {"rows": len(pairs), "max_new_tokens": max_new_tokens}
    with model.disable_adapter():
        base_answers = greedy_answers(model, tokenizer, prompts, limits, batch_size, eos)
    adapter_answers = greedy_answers(model, tokenizer, prompts, limits, batch_size, eos)
    for name, answers in (("base", base_answers), ("adapter", adapter_answers)):
        matches = sum(answer_text(tokenizer, a) == r for a, r in zip(answers, refs))
        em[name] = {"matches": matches, "rate": matches / len(pairs) if pairs else 0.0}
    em["change"] = em["adapter"]["rate"] - em["base"]["rate"]
    em["samples"] = [
        {
            "prompt": tokenizer.decode(p, skip_special_tokens=False),
            "reference": r,
            "base": answer_text(tokenizer, b),
            "adapter": answer_text(tokenizer, a),
        }
        for p, r, b, a in list(zip(prompts, refs, base_answers, adapter_answers))[:SAMPLES]
    ]
    return em


# --------------------------------------------------------------------------- data


def eval_examples(recipe, tokenizer, paths, data: str | None, *, train_on_prompt: bool | None = None):
    """(examples, format, source description). `train_on_prompt` overrides the recipe's."""
    cfg = dataclasses.replace(recipe.data, packing=False)
    if train_on_prompt is not None:
        cfg = dataclasses.replace(cfg, train_on_prompt=train_on_prompt)
    if data is not None:
        path = Path(data)
        # Said here: the loader's own message is worded for a recipe's list of data files.
        if path.is_file() and not path.read_bytes().strip():
            raise DataError(f"--data {data}: no rows (the file is empty)", "Pass a file with held-out rows.")
        records = load_records(data)
        examples, counts = tokenize_records(records, cfg, tokenizer, source=str(data))
        return examples, counts.format, str(data)
    if not cfg.validation and cfg.val_split == 0:
        raise DataError(
            f"{paths.root} has no validation data: its recipe sets neither data.validation nor data.val_split",
            "Pass held-out rows with --data FILE (any format train accepts), or train with data.val_split: 0.1.",
        )
    try:
        prepared = prepare_data(cfg, tokenizer, seed=recipe.train.seed)
    except DataError as e:
        raise DataError(
            f"rebuilding the validation split of {paths.root}: {e.message}",
            (e.hint + "; " if e.hint else "") + "or pass held-out rows with --data FILE",
        ) from None
    if not prepared.validation:
        raise DataError(f"{paths.root}: the validation split is empty", "Pass held-out rows with --data FILE.")
    _warn_if_data_changed(paths, prepared.report.fingerprint, train_on_prompt is None)
    return prepared.validation, prepared.report.format, f"validation split: {prepared.report.validation_from}"


def _warn_if_data_changed(paths: RunPaths, fingerprint: str, comparable: bool) -> None:
    data = read_record(paths).data
    saved = data.tokens_fingerprint if data is not None else None
    if comparable and saved and saved != fingerprint:
        info(
            f"warning: the data of {paths.root} changed since training; the validation split "
            "may not be the one the run held out (it may even contain rows it trained on)"
        )


def eval_pairs(recipe, tokenizer, paths, data: str | None) -> tuple[list[dict], str, str]:
    """A preference run's held-out pairs: --data FILE, or the validation split rebuilt."""
    cfg = recipe.data
    if data is not None:
        if Path(data).is_file() and not Path(data).read_bytes().strip():
            raise DataError(f"--data {data}: no rows (the file is empty)", "Pass a file with held-out pairs.")
        records = load_records(data)
        if detect_format(records[0], f"--data {data} row 1") != "preference":
            raise DataError(
                f"--data {data}: {paths.root} is a train.method: {recipe.train.method} run, and these rows are "
                f"not preference pairs (columns: {', '.join(map(str, records[0]))})",
                "Pass held-out {prompt, chosen, rejected} rows.",
            )
        pairs, counts = tokenize_pairs(records, cfg, tokenizer, source=str(data))
        return pairs, counts.format, str(data)
    if not cfg.validation and cfg.val_split == 0:
        raise DataError(
            f"{paths.root} has no validation data: its recipe sets neither data.validation nor data.val_split",
            "Pass held-out pairs with --data FILE ({prompt, chosen, rejected} rows), or train with "
            "data.val_split: 0.1.",
        )
    try:
        prepared = prepare_preferences(cfg, tokenizer, seed=recipe.train.seed, method=recipe.train.method)
    except DataError as e:
        raise DataError(
            f"rebuilding the validation split of {paths.root}: {e.message}",
            (e.hint + "; " if e.hint else "") + "or pass held-out pairs with --data FILE",
        ) from None
    _warn_if_data_changed(paths, prepared.report.fingerprint, True)
    return prepared.validation, prepared.report.format, f"validation split: {prepared.report.validation_from}"


# --------------------------------------------------------------------------- output


def check_can_write_eval(paths: RunPaths) -> None:
    """eval.json goes into the run directory: refuse a run directory that cannot take it before
    loading or computing anything (a read-only mount, no permission, eval.json a directory)."""
    hint = "lora eval writes eval.json into the run directory: make it writable, or evaluate a copy of the run."
    if paths.eval_json.is_dir():
        raise LoraError(
            f"cannot write {paths.eval_json}: it is a directory", "Move it out of the way, then run `lora eval` again."
        )
    problem = cannot_write_in(paths.root, "eval.json")
    if problem is not None:
        raise LoraError(f"cannot write {paths.eval_json}: {problem.strerror or problem}", hint) from None


def show_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


def _change(base: dict, adapter: dict, keys) -> dict:
    out = {}
    for key in keys:
        b, a = base[key], adapter[key]
        if a is None or b is None:
            out[key], out[f"{key}_percent"] = None, None
            continue
        out[key] = a - b
        out[f"{key}_percent"] = 100 * (a - b) / b if b else None
    return out


def print_table(result: dict) -> None:
    def num(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    def delta(value, percent, digits=4):
        if value is None:
            return "-"
        text = f"{value:+.{digits}f}"
        return text + (f" ({percent:+.1f}%)" if percent is not None else "")

    d, ch = result["data"], result["change"]
    table = Table(
        title=f"{result['run']}: {d['source']} ({d['rows']} rows, {d['supervised_tokens']} supervised tokens)"
    )
    for column, justify in (("", "left"), ("base", "right"), ("adapter", "right"), ("change", "right")):
        table.add_column(column, justify=justify)
    for key, digits in (("loss", 4), ("perplexity", 2)):
        table.add_row(
            key,
            num(result["base"][key], digits),
            num(result["adapter"][key], digits),
            delta(ch[key], ch[f"{key}_percent"], digits),
        )
    if "preference_accuracy" in result["base"]:
        table.add_row("preference accuracy", f"{result['base']['preference_accuracy']:.1%}",
                      f"{result['adapter']['preference_accuracy']:.1%}",
                      f"{100 * ch['preference_accuracy']:+.1f} pts")
        table.add_row("mean margin", num(result["base"]["mean_margin"]), num(result["adapter"]["mean_margin"]),
                      delta(ch["mean_margin"], None))
    if "reward_accuracy" in result["adapter"]:  # DPO's implicit reward: the base's is 0 by definition
        table.add_row("reward accuracy (vs base)", "-", f"{result['adapter']['reward_accuracy']:.1%}", "-")
        table.add_row("reward margin (vs base)", "-", num(result["adapter"]["reward_margin"]), "-")
    if "exact_match" in result:
        em = result["exact_match"]
        table.add_row(
            "exact match",
            f"{em['base']['rate']:.1%} ({em['base']['matches']}/{em['rows']})",
            f"{em['adapter']['rate']:.1%} ({em['adapter']['matches']}/{em['rows']})",
            f"{100 * em['change']:+.1f} pts",
        )
    Console(highlight=False).print(table)
