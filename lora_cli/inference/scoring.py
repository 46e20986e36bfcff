"""Scoring a model on held-out examples: the loss on their supervised tokens, and greedy answers
to compare with reference answers.

    loss        = sum over supervised tokens of -log p(token | prefix) / number of supervised tokens
    perplexity  = exp(loss)

Exact match: the greedy answer to each prompt (the tokens before the last supervised stretch)
against the reference (that stretch), both decoded without special tokens and stripped.
"""

from __future__ import annotations

import math

from lora_cli.data.packing import Collator
from lora_cli.data.tokenize import IGNORE_INDEX


def token_nll(model, examples: list[dict], pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """(sum of -log p over supervised tokens, number of supervised tokens), in float64."""
    import torch
    import torch.nn.functional as F

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


def greedy_answers(
    model, tokenizer, prompts: list[list[int]], max_new: list[int], batch_size: int, eos: list[int]
) -> list[list[int]]:
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
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(max_new[i] for i in chunk),
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            answers[i] = new[: min(stop, max_new[i])]
    return answers


def answer_text(tokenizer, ids: list[int]) -> str:
    """An answer (or reference) as exact match compares it."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
