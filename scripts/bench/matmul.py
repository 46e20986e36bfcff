"""Matmul throughput, the yardstick the training benchmarks read their figures against."""

from __future__ import annotations

import time


def best_matmul_flops(m: int, k: int, n: int, dtype=None, *, window: float = 0.3, rounds: int = 5) -> float:
    """FLOP/s of an (m x k) @ (k x n) product in `dtype` (default float32) with the threads torch
    is set to use: the best of `rounds` windows of `window` seconds, after a warm-up."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(5):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < window:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
    return best
