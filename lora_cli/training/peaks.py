"""The memory a run actually reached, printed and recorded beside the estimate printed before it
started: `lora estimate` models the tensors of one step; this is what the process (and the GPU)
really used, so a user can see how far to trust the estimate on their machine."""

from __future__ import annotations

import resource
import sys

from lora_cli.console import human_bytes


def peak_memory() -> dict:
    """This process's peak resident memory and, where it used a GPU, torch's peaks on it.

    On a GPU the tensors live in GPU memory: `gpu_peak_allocated_bytes` is what they occupied at
    most (the figure the estimate models), `gpu_peak_reserved_bytes` what torch's caching
    allocator held from the driver (what nvidia-smi shows, less the CUDA context)."""
    import torch

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"process_peak_rss_bytes": maxrss if sys.platform == "darwin" else maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        peaks["gpu"] = torch.cuda.get_device_name(device)
        peaks["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks


def peak_memory_line(peaks: dict, estimate_bytes: float | tuple[float, float] | None) -> str:
    """`estimate_bytes`: the estimate's total, or (low, high) for an 8-bit base."""
    if isinstance(estimate_bytes, (tuple, list)):
        estimate_text = f"between {human_bytes(estimate_bytes[0])} and {human_bytes(estimate_bytes[1])}"
    else:
        estimate_text = human_bytes(estimate_bytes) if estimate_bytes else ""
    if "gpu_peak_allocated_bytes" in peaks:
        estimate = f"; estimate {estimate_text}" if estimate_text else ""
        return (f"peak GPU memory: {human_bytes(peaks['gpu_peak_allocated_bytes'])} in tensors, "
                f"{human_bytes(peaks['gpu_peak_reserved_bytes'])} reserved by torch ({peaks['gpu']}{estimate})")
    estimate = f"; estimate {estimate_text} plus the libraries" if estimate_text else ""
    return f"peak memory: {human_bytes(peaks['process_peak_rss_bytes'])} (the whole process{estimate})"
