"""Scoring preference pairs: how strongly a model prefers each chosen answer to its rejected one.

For a pair (x, chosen y_w, rejected y_l), with log p(y | x) summed over the answer's tokens (DPO)
or averaged over them (ORPO, as TRL's ORPOTrainer scores them):

    margin                = beta * (log p(y_w | x) - log p(y_l | x))
    preference accuracy   = share of pairs with margin > 0: the model gives the chosen answer the
                            higher likelihood. Defined alike for the base and the adapter, so the
                            two compare.
    DPO's implicit reward = beta * (log p_adapter(y | x) - log p_base(y | x)), the reference being
                            the base (adapter off); reward accuracy = share of pairs whose chosen
                            answer gets the higher reward, reward margin = their mean difference.
                            The base's own rewards are 0 by definition, so only the adapter has them.
"""

from __future__ import annotations

import math


def answer_logps(model, pairs: list[dict], pad_token_id: int, batch_size: int) -> dict[str, list[float]]:
    """Per pair: log p of the chosen and of the rejected answer given the prompt, summed over
    their tokens, and their token counts. {"chosen", "rejected", "chosen_tokens", "rejected_tokens"}."""
    import torch

    rows = [(p["prompt_ids"] + p[f"{name}_ids"], len(p["prompt_ids"]))
            for p in pairs for name in ("chosen", "rejected")]
    sums = [0.0] * len(rows)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # less padding
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            ids = torch.tensor([rows[i][0] + [pad_token_id] * (width - len(rows[i][0])) for i in chunk], device=device)
            mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            # token t is predicted from tokens < t
            picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            for row, i in enumerate(chunk):
                full, prompt = len(rows[i][0]), rows[i][1]
                sums[i] = float(picked[row, prompt - 1 : full - 1].double().sum())
    lengths = [len(ids) - prompt for ids, prompt in rows]
    return {"chosen": sums[0::2], "rejected": sums[1::2], "chosen_tokens": lengths[0::2],
            "rejected_tokens": lengths[1::2]}


def preference_scores(logps: dict[str, list[float]], *, beta: float, average: bool) -> dict:
    """Preference accuracy and mean margin (module doc); `average`: per-token log-probabilities (ORPO)."""
    chosen, rejected = _scores(logps, average)
    margins = [beta * (c - r) for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": _share_positive(margins), "mean_margin": _mean(margins)}


def reward_scores(adapter: dict[str, list[float]], base: dict[str, list[float]], *, beta: float) -> dict:
    """DPO's implicit rewards of the adapter against the base (module doc)."""
    chosen = [beta * (a - b) for a, b in zip(adapter["chosen"], base["chosen"])]
    rejected = [beta * (a - b) for a, b in zip(adapter["rejected"], base["rejected"])]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"reward_accuracy": _share_positive(margins), "reward_margin": _mean(margins),
            "reward_chosen": _mean(chosen), "reward_rejected": _mean(rejected)}


def _scores(logps: dict, average: bool) -> tuple[list[float], list[float]]:
    if not average:
        return logps["chosen"], logps["rejected"]
    return ([s / max(n, 1) for s, n in zip(logps["chosen"], logps["chosen_tokens"])],
            [s / max(n, 1) for s, n in zip(logps["rejected"], logps["rejected_tokens"])])


def _share_positive(values: list[float]) -> float:
    return sum(v > 0 for v in values) / len(values) if values else 0.0


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0
