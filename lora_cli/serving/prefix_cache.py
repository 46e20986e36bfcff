"""Prompt starts read once: the KV of a token prefix that recent prompts on the same route shared.

Chat requests start with the same tokens (the template's system turn: 20 of SmolLM2's ~30 prompt
tokens for "Define: X"), and a multi-turn chat sends its whole history again each turn. A prompt
whose start is cached is read from where the cache ends, on top of that KV. Keys are per route:
an adapter on k/v projections makes its own KV for the same tokens.

What is kept: when a prompt shares at least `min_tokens` leading tokens with one of the route's
recent prompts, the KV of that shared start (taken from the prompt's own forward pass, no extra
compute) becomes an entry; the least recently used entries go when there are more than
`max_entries`. Causal attention makes a prefix's KV independent of what follows it, so reading a
prompt on top of its cached start gives what reading it whole gives, up to float rounding (the
same order as batching rows together: greedy answers stay `lora generate`'s, tested).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class Prefix:
    ids: tuple[int, ...]
    layers: list  # per layer (keys, values), each [1, kv heads, len(ids), head dim]


def common_length(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, *, min_tokens: int = 8, max_entries: int = 16, recent: int = 8):
        self.min_tokens = min_tokens
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Prefix] = OrderedDict()
        self._recent: dict[str, deque] = {}  # route -> its last prompts (token tuples)
        self._recent_size = recent
        self.stats = {"prefix_hits": 0, "prefix_tokens_reused": 0}

    def lookup(self, route: str, prompt_ids: list[int]) -> Prefix | None:
        """The longest cached start of this prompt that leaves at least one token to read."""
        best = None
        for (entry_route, ids), entry in self._entries.items():
            if entry_route == route and len(ids) < len(prompt_ids) and (best is None or len(ids) > len(best.ids)) \
                    and tuple(prompt_ids[:len(ids)]) == ids:
                best = entry
        if best is not None:
            self._entries.move_to_end((route, best.ids))
        return best

    def shared_start(self, route: str, prompt_ids: list[int]) -> int:
        """How many leading tokens this prompt shares with a recent prompt of its route (0 if too few
        to be worth an entry, or if an entry already covers them); records the prompt as recent."""
        recent = self._recent.setdefault(route, deque(maxlen=self._recent_size))
        shared = max((common_length(prompt_ids, other) for other in recent), default=0)
        recent.append(tuple(prompt_ids))
        shared = min(shared, len(prompt_ids) - 1)  # a whole prompt is never an entry: one token is always read
        if shared < self.min_tokens or (route, tuple(prompt_ids[:shared])) in self._entries:
            return 0
        return shared

    def add(self, route: str, ids: list[int], layers: list) -> None:
        key = (route, tuple(ids))
        self._entries[key] = Prefix(key[1], layers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def count_hit(self, prefix: Prefix, used: int) -> None:
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += used
