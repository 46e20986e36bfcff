"""The dtypes a base is loaded and computes in: `auto` made concrete for this machine, or pinned
to the ones a run recorded when it started.

torch is imported inside the functions: the run directory pins a run's dtypes (run/recipes.py)
on the way to commands that may never load a model.
"""

from __future__ import annotations

import dataclasses

from lora_cli.recipe.schema import ModelConfig


def resolve_dtype(name: str):
    """`auto`: bfloat16 on GPUs that support it (else float16); on a CPU, bfloat16 where the CPU
    multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), float32 elsewhere.

    Measured on an AVX512-BF16 CPU (README "Speed and memory"): bfloat16 matmuls run 4x faster
    than float32 ones, and a bfloat16 base trains 1.5 to 1.7x faster than a float32 one at the same
    held-out loss (within 0.15%) and generates 1.9x faster. Without those instructions bfloat16 is
    emulated and slower than float32.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX, as torch's own CPU probes (the ones oneDNN dispatches on) report it."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def pin_dtypes(cfg: ModelConfig, recorded: dict | None = None) -> ModelConfig:
    """`cfg` with `auto` dtypes replaced by concrete ones: those a run recorded when it started
    (`recorded`, run.json's "model"), else this machine's.

    A run keeps the dtypes it was trained in: resumed, evaluated, merged or sampled on another
    machine (a CPU without bfloat16, a GPU), its adapter still meets the base it was trained on.
    """
    recorded = recorded or {}
    dtype = (
        cfg.dtype if cfg.dtype != "auto" else recorded.get("dtype") or str(resolve_dtype("auto")).removeprefix("torch.")
    )
    compute = cfg.compute_dtype if cfg.compute_dtype != "auto" else dtype  # auto: the same as dtype
    return dataclasses.replace(cfg, dtype=dtype, compute_dtype=compute)


def describe_precision(cfg: ModelConfig) -> str:
    """How the base is held, for `lora train`'s model line: "weights in bfloat16", "8-bit", ...
    (peft's prepare_model_for_kbit_training keeps a quantized model's other weights in float32)."""
    if cfg.quantization == "4bit":
        return f"4-bit {cfg.quant_type} computing in {cfg.compute_dtype}"
    return "8-bit" if cfg.quantization == "8bit" else f"weights in {cfg.dtype}"
