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


def best_cuda_matmul_flops(n: int = 8192, dtype=None, *, rounds: int = 10) -> float:
    """FLOP/s of an n x n x n product on the current GPU (default bfloat16, what training computes
    in there): the best of `rounds` timed products, after a warm-up."""
    import torch

    dtype = dtype or torch.bfloat16
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda") for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1e3))
    return best
