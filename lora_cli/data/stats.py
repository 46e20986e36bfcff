"""Numbers about token lengths for the data report: summary, a plain-text histogram, padding.

Standard library only: `lora validate` prints these before any model is loaded, and the output
must read the same on a terminal and in a log file (no colours, no box-drawing needed).
"""

from __future__ import annotations

import math
import random

HISTOGRAM_BINS = 8
HISTOGRAM_WIDTH = 30  # characters of the longest bar


def summary(lengths: list[int]) -> dict[str, int]:
    """min / median / p95 / max (nearest-rank percentiles: always a length that occurs)."""
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"min": ordered[0], "median": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


def histogram(lengths: list[int], max_length: int, bins: int = HISTOGRAM_BINS) -> list[list[int]]:
    """[[low, high, count], ...]: equal-width bins over 1..max(lengths, max_length), so the
    bins beyond max_length show at a glance what truncation or dropping will cut."""
    if not lengths:
        return []
    top = max(max(lengths), max_length)
    width = max(1, math.ceil(top / bins))
    out = [[i * width + 1, (i + 1) * width, 0] for i in range(math.ceil(top / width))]
    for n in lengths:
        out[min(len(out) - 1, (max(n, 1) - 1) // width)][2] += 1
    return out


def histogram_lines(hist: list[list[int]], max_length: int) -> list[str]:
    """One line per bin: range, bar of '#', count; bins past max_length are marked."""
    if not hist:
        return []
    most = max(count for _, _, count in hist) or 1
    digits = len(str(hist[-1][1]))
    lines = []
    for low, high, count in hist:
        bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / most) if count else ""
        over = "  > max_length" if low > max_length else "  partly > max_length" if high > max_length else ""
        lines.append(f"  {low:>{digits}}-{high:<{digits}} |{bar:<{HISTOGRAM_WIDTH}} {count}{over}")
    return lines


def batch_padding(lengths: list[int], batch_size: int, seed: int) -> float:
    """Share of padding when examples, shuffled like the trainer does, are padded to the longest
    in each batch of `batch_size` (what the Collator does when packing is off)."""
    if not lengths:
        return 0.0
    order = list(lengths)
    random.Random(seed).shuffle(order)
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded
