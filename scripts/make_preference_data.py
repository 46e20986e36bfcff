#!/usr/bin/env python3
"""Preference pairs from The Devil's Dictionary, for configs/devils-dpo.yaml (train.method: dpo).

For every row of data/devils-dictionary/{train,test}.jsonl ("Define: WORD" -> Bierce's definition):

    chosen    Bierce's definition
    rejected  the base model's own answer to "Define: WORD": greedy, through `lora generate`'s
              prompt formatting (the chat template, inference/generation.py) and `lora eval`'s
              batched greedy decoding (inference/scoring.py), at most --max-new-tokens tokens

written as chat pairs to <out>/train.jsonl and <out>/test.jsonl:

    {"prompt": [{"role": "user", "content": "Define: WORD"}],
     "chosen": [{"role": "assistant", "content": "n. ..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

so DPO learns to prefer Bierce's voice over what the model says by itself. A row whose base answer
is Bierce's definition (never seen in practice) is skipped: it prefers nothing. Deterministic
(greedy decoding); offline with the embedded default model.

    python scripts/make_preference_data.py                # ~5 minutes on 2 CPU cores
    python scripts/make_preference_data.py --limit 100    # the first 100 train rows only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SOURCE = Path("data/devils-dictionary")
OUT = Path("data/devils-dpo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model (default: the recipe default, the embedded one)")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train rows")
    args = parser.parse_args()

    from lora_cli.fsutil import atomic_write_text
    from lora_cli.inference.generation import encode_prompt, eos_token_ids, load_generator
    from lora_cli.inference.scoring import answer_text, greedy_answers
    from lora_cli.recipe.schema import ModelConfig

    gen = load_generator(None, args.model or ModelConfig().name)
    eos = eos_token_ids(gen.model, gen.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (args.source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        if split == "train" and args.limit:
            rows = rows[: args.limit]
        questions = [r["messages"][0]["content"] for r in rows]
        started = time.perf_counter()
        prompts = [encode_prompt(gen.tokenizer, q, chat=True) for q in questions]
        answers = greedy_answers(gen.model, gen.tokenizer, prompts, [args.max_new_tokens] * len(prompts),
                                 args.batch_size, eos)
        lines, skipped = [], 0
        for row, question, answer in zip(rows, questions, answers):
            bierce, base = row["messages"][1]["content"], answer_text(gen.tokenizer, answer)
            if base.strip() == bierce.strip() or not base.strip():
                skipped += 1
                continue
            lines.append(json.dumps({
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": bierce}],
                "rejected": [{"role": "assistant", "content": base}],
            }, ensure_ascii=False) + "\n")
        atomic_write_text(args.out / f"{split}.jsonl", "".join(lines))
        print(f"{args.out / f'{split}.jsonl'}: {len(lines)} pairs ({skipped} skipped) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
