"""Packing several examples into one row, and the collator that pads batches.

Each packed row's position_ids restart at 0 where an example starts: with no attention_mask,
transformers (sdpa, use_cache=False) reads those restarts as sequence boundaries, so examples never
attend to each other (tests/test_data.py checks per-example losses packed and unpacked).
"""

from __future__ import annotations

from lora_cli.data.tokenize import IGNORE_INDEX

# A batch key (count_tokens=True): real tokens per row, for throughput figures; the trainer
# removes it before the model sees the batch.
REAL_TOKENS_KEY = "real_tokens"


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit decreasing into rows of at most max_length tokens; deterministic.

    Each row's position_ids restart at 0 where an example starts: with no attention_mask,
    transformers reads those restarts as sequence boundaries, so examples never attend to each
    other. The first label of every example is -100, as it is (unused) in an unpacked row; so
    every example's loss is the same packed or not.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    # A max-tree over the remaining capacity of bins 0..size-1 finds the first bin that fits in
    # O(log n); unopened bins have full capacity, so "first fit" opens a new bin when needed.
    size = 1
    while size < max(1, len(examples)):
        size *= 2
    tree = [max_length] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        length = len(examples[i]["input_ids"])
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        tree[node] -= length
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in sorted(members):
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            positions += range(len(ex["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


class Collator:
    """Pads a batch to its longest row (right padding): input_ids with pad_token_id, labels with -100.

    Unpacked rows get an attention_mask. Packed rows (with position_ids) get none, on purpose: the
    model then separates examples by where position_ids restart; padding forms its own segment.
    pad_to_multiple_of rounds the length up (GPU kernels prefer multiples of 8).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, count_tokens: bool = False):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.multiple = pad_to_multiple_of or 1
        self.count_tokens = count_tokens

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple) * self.multiple
        packed = any("position_ids" in f for f in features)
        ids, labels, extra = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            ids.append([*f["input_ids"], *[self.pad_token_id] * pad])
            labels.append([*f["labels"], *[IGNORE_INDEX] * pad])
            if packed:
                extra.append([*f.get("position_ids", range(n)), *range(pad)])
            else:
                extra.append([1] * n + [0] * pad)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        if self.count_tokens:  # packed rows have no attention_mask to count their padding by
            batch[REAL_TOKENS_KEY] = torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.long)
        return batch

