"""`lora eval`: loss and perplexity of the base and of the adapter on held-out data, side by side.

Held-out data is the run's validation split, rebuilt from its recipe exactly as training built it
(same tokenizer, format, masking and seed), or `--data FILE` in any format training accepts. Rows
are never packed. Both models are the same loaded base: the adapter is switched off with peft's
`disable_adapter()` for the base numbers.

    loss        = sum over supervised tokens of -log p(token | prefix) / number of supervised tokens
    perplexity  = exp(loss)

Exact match (completion / alpaca / chat data): the greedy answer to each prompt (the tokens before
the last supervised stretch) against the reference (that stretch), both decoded without special
tokens and stripped of surrounding whitespace.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from lora_cli.errors import EXIT_RUNTIME, DataError, LoraError


class NonFiniteLoss(LoraError):
    """The loss came out NaN/inf (a diverged adapter): a run-time failure, and nothing is written."""

    exit_code = EXIT_RUNTIME


IGNORE_INDEX = -100
SAMPLES = 5  # exact match: answers kept in eval.json, to see what the numbers mean


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def eval_examples(recipe, tokenizer, paths, data: str | None, *, train_on_prompt: bool | None = None):
    """(examples, format, source description). `train_on_prompt` overrides the recipe's."""
    cfg = dataclasses.replace(recipe.data, packing=False)
    if train_on_prompt is not None:
        cfg = dataclasses.replace(cfg, train_on_prompt=train_on_prompt)
    from lora_cli.data import load_records, prepare_data, tokenize_records

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


def _warn_if_data_changed(paths, fingerprint: str, comparable: bool) -> None:
    from lora_cli.runs import read_run_json

    saved = read_run_json(paths).get("data", {}).get("report", {}).get("fingerprint")
    if comparable and saved and saved != fingerprint:
        info(f"warning: the data of {paths.root} changed since training; the validation split "
             "may not be the one the run held out (it may even contain rows it trained on)")


# --------------------------------------------------------------------------- loss


def token_nll(model, examples: list[dict], pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """(sum of -log p over supervised tokens, number of supervised tokens), in float64."""
    import torch
    import torch.nn.functional as F

    from lora_cli.data import Collator

    collate = Collator(pad_token_id)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]])
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            labels = batch["labels"][:, 1:].to(device)  # token t is predicted from tokens < t
            keep = labels != IGNORE_INDEX
            picked = logits[:, :-1][keep].float()
            total += float(F.cross_entropy(picked, labels[keep], reduction="sum").double())
            count += int(keep.sum())
    return total, count


def loss_and_perplexity(total: float, count: int) -> dict:
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else None}


# --------------------------------------------------------------------------- exact match


def qa_pairs(examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids): the reference is the last supervised stretch of each example."""
    pairs = []
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        end = max((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), default=None)
        if end is None:
            continue
        start = end
        while start > 1 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        pairs.append((ids[:start], ids[start : end + 1]))
    return pairs


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new: list[int], batch_size: int, eos: list[int]) -> list[list[int]]:
    """Greedy continuations, batched with left padding; each cut at its first EOS."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new[i] for i in chunk),
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            answers[i] = new[: min(stop, max_new[i])]
    return answers


def _eos_ids(model, tokenizer) -> list[int]:
    eos = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in eos:
                eos.append(int(token))
    return eos


def _normalize(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- the command


def run_eval(
    run: str | Path | None,
    *,
    data: str | None = None,
    as_json: bool = False,
    exact_match: bool = False,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate base vs adapter; write RUN/eval.json; print a table (or JSON). Returns the result."""
    from lora_cli.runs import atomic_write_json, load_run_recipe, resolve_run

    if batch_size < 1:
        raise LoraError(f"--batch-size must be at least 1, got {batch_size}", "Use --batch-size 8, or 1 to save memory.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LoraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", "Leave it out to use each reference's length.")
    if max_new_tokens is not None and not exact_match:
        info("note: --max-new-tokens only applies with --exact-match")
    paths = resolve_run(run)
    recipe = load_run_recipe(paths)
    if data is not None and not Path(data).exists() and Path(data).suffix:
        raise DataError(f"--data: file not found: {data}", "Check the path (relative paths are relative to the current directory).")
    check_can_write_eval(paths)  # before the work, not after it

    from lora_cli.train import quiet_libraries

    quiet_libraries()
    from lora_cli.generate import context_length
    from lora_cli.model import load_adapter, load_base_model, load_tokenizer, resolve_model_source

    source = resolve_model_source(recipe.model)
    tokenizer = load_tokenizer(recipe.model, source)
    examples, fmt, data_source = eval_examples(recipe, tokenizer, paths, data)
    if exact_match and fmt == "text":
        raise DataError(
            "--exact-match needs prompts with reference answers (completion, alpaca or chat data); this data is text",
            "Drop --exact-match, or pass --data with {prompt, completion} or {messages} rows.",
        )
    supervised = sum(1 for ex in examples for label in ex["labels"][1:] if label != IGNORE_INDEX)
    info(f"run: {paths.root}  base: {source.description}  data: {data_source} ({len(examples)} rows, {supervised} supervised tokens)")

    base = load_base_model(recipe.model, source)
    model = load_adapter(base, paths.adapter)
    import torch

    if torch.cuda.is_available() and recipe.model.quantization == "none":
        model.to("cuda")
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with model.disable_adapter():
        base_total, count = token_nll(model, examples, pad, batch_size)
    adapter_total, _ = token_nll(model, examples, pad, batch_size)
    # A NaN loss would print as "nan", exit 0 and put NaN (not JSON) into eval.json.
    for what, total in (("the base model", base_total), ("the adapter", adapter_total)):
        if not math.isfinite(total):
            raise NonFiniteLoss(
                f"{paths.root}: the loss of {what} is not finite ({total}): its outputs are "
                f"NaN or inf" + (", the run diverged" if what == "the adapter" else "") + "; eval.json was not written",
                "Retrain with a lower train.lr (`lora runs` and the run's metrics.jsonl show where the loss went bad)."
                if what == "the adapter" else "The base model's weights may be broken, or overflow in this dtype.",
            )
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
        pairs = qa_pairs(examples)
        eos = _eos_ids(model, tokenizer)
        prompts = [p for p, _ in pairs]
        context = context_length(model)
        limits = [max_new_tokens or len(ref) + 8 for _, ref in pairs]
        if context:
            limits = [max(1, min(n, context - len(p))) for n, (p, _) in zip(limits, pairs)]
        refs = [_normalize(tokenizer, ref) for _, ref in pairs]
        em = {"rows": len(pairs), "max_new_tokens": max_new_tokens}
        with model.disable_adapter():
            base_answers = greedy_answers(model, tokenizer, prompts, limits, batch_size, eos)
        adapter_answers = greedy_answers(model, tokenizer, prompts, limits, batch_size, eos)
        for name, answers in (("base", base_answers), ("adapter", adapter_answers)):
            matches = sum(_normalize(tokenizer, a) == r for a, r in zip(answers, refs))
            em[name] = {"matches": matches, "rate": matches / len(pairs) if pairs else 0.0}
        em["change"] = em["adapter"]["rate"] - em["base"]["rate"]
        em["samples"] = [
            {"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": r,
             "base": _normalize(tokenizer, b), "adapter": _normalize(tokenizer, a)}
            for p, r, b, a in list(zip(prompts, refs, base_answers, adapter_answers))[:SAMPLES]
        ]
        result["exact_match"] = em

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


class EvalWriteError(LoraError):
    """eval.json could not be written after the evaluation ran (disk full, ...)."""

    exit_code = EXIT_RUNTIME


def show_result(result: dict, as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print_table(result)


def check_can_write_eval(paths) -> None:
    """eval.json goes into the run directory: refuse a run directory that cannot take it before
    loading or computing anything (a read-only mount, no permission, eval.json a directory)."""
    import os
    import tempfile

    hint = "lora eval writes eval.json into the run directory: make it writable, or evaluate a copy of the run."
    if paths.eval_json.is_dir():
        raise LoraError(f"cannot write {paths.eval_json}: it is a directory", "Move it out of the way, then run `lora eval` again.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".eval.json.probe-", dir=paths.root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LoraError(f"cannot write {paths.eval_json}: {e.strerror or e}", hint) from None


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
    from rich.console import Console
    from rich.table import Table

    def num(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    def delta(value, percent, digits=4):
        if value is None:
            return "-"
        text = f"{value:+.{digits}f}"
        return text + (f" ({percent:+.1f}%)" if percent is not None else "")

    d, ch = result["data"], result["change"]
    table = Table(title=f"{result['run']}: {d['source']} ({d['rows']} rows, {d['supervised_tokens']} supervised tokens)")
    for column, justify in (("", "left"), ("base", "right"), ("adapter", "right"), ("change", "right")):
        table.add_column(column, justify=justify)
    for key, digits in (("loss", 4), ("perplexity", 2)):
        table.add_row(key, num(result["base"][key], digits), num(result["adapter"][key], digits),
                      delta(ch[key], ch[f"{key}_percent"], digits))
    if "exact_match" in result:
        em = result["exact_match"]
        table.add_row(
            "exact match",
            f"{em['base']['rate']:.1%} ({em['base']['matches']}/{em['rows']})",
            f"{em['adapter']['rate']:.1%} ({em['adapter']['matches']}/{em['rows']})",
            f"{100 * em['change']:+.1f} pts",
        )
    Console(highlight=False).print(table)
