"""Seeded synthetic SFT data for the training benchmark: the generator is committed, not the data.

Two length profiles, both as completion rows {"prompt", "completion"} over English words taken
from data/devils-dictionary (so a real tokenizer sees ordinary text):

    flan   short and widely varied, like FLAN-style instruction mixtures: a word count drawn
           log-normally (median ~22 words, 2 to 150: 15 to ~450 tokens), four small tasks
    long   long and nearly uniform: 150-165 words per list (~500 tokens per example), the
           three tasks whose answer is as long as the list

The tasks (copy, reverse, sort, count the words of a list) are learnable, so the loss of a run is
a meaningful work-equivalence check between candidates that saw the same examples.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORD_SOURCE = ROOT / "data" / "devils-dictionary" / "train.jsonl"

TASKS = {
    "copy": ("Copy the words exactly:", lambda words: words),
    "reverse": ("Write the words in reverse order:", lambda words: words[::-1]),
    "sort": ("Sort the words alphabetically:", lambda words: sorted(words, key=str.lower)),
    "count": ("How many words are there?", lambda words: [str(len(words))]),
}


def word_pool() -> list[str]:
    """Distinct lower-case words from the committed dictionary data, in first-seen order."""
    seen: dict[str, None] = {}
    for line in WORD_SOURCE.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"]:
            for word in re.findall(r"[A-Za-z]{3,12}", message["content"]):
                seen.setdefault(word.lower(), None)
    return list(seen)


def _length(profile: str, rng: random.Random) -> int:
    if profile == "flan":
        return max(2, min(150, round(math.exp(rng.gauss(math.log(22), 0.9)))))
    if profile == "long":
        return rng.randint(150, 165)
    raise ValueError(f"unknown profile {profile!r} (flan | long)")


def generate(profile: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{profile}:{seed}")
    pool = word_pool()
    rows = []
    for _ in range(n):
        task = rng.choice(sorted(TASKS) if profile == "flan" else ["copy", "reverse", "sort"])
        instruction, answer = TASKS[task]
        words = [rng.choice(pool) for _ in range(_length(profile, rng))]
        rows.append(
            {"prompt": f"{instruction} {' '.join(words)}\nAnswer:", "completion": " " + " ".join(answer(words))}
        )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
