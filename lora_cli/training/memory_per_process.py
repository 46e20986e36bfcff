"""Memory per process when N processes train together (`lora estimate --num-processes N --engine
E`), from the one-process estimate (training/memory.py), so a user sees whether DDP fits or FSDP /
ZeRO-3 is needed before renting the GPUs.

Each process trains on its own batch of train.batch_size examples: activations and the tokenizer
are the one-process figures under every engine. What differs is the model and its training state:

  ddp    every process holds the whole model, its gradients and optimizer state, plus DDP's
         gradient buckets (a second copy of the trainable gradients, gradient_as_bucket_view off)
  fsdp   FSDP2 (configs/accelerate/fsdp.yaml), FULL_SHARD: weights, gradients and optimizer state
         are split N ways; a block's weights are gathered in full while it runs, and the next one
         is prefetched (2 blocks), and the root's own weights (embeddings, output head, final norm)
         stay gathered from the forward to the backward pass
  zero3  DeepSpeed ZeRO-3 shards the same way; modelled like fsdp (its prefetch bucket is sized in
         parameters, stage3_prefetch_bucket_size, and usually holds about a block or two)

total is the sum of the parts: what a process holds while it trains (on GPUs, GPU memory).
Loading is the CPU RAM peak before that: under ddp each process reads the whole checkpoint; fsdp
with fsdp_cpu_ram_efficient_loading (fsdp.yaml) lets rank 0 alone read it and send the others
their shards, so the loading row is rank 0's. A block is the linear weights of one layer (the
quantizable parameters / layers) with its LoRA share; the root is everything outside the blocks'
linear layers.
"""

from __future__ import annotations

from lora_cli.console import human_bytes
from lora_cli.training.memory import METHODS, PARTS, Estimate

ENGINES = ("ddp", "fsdp", "zero3")

GATHERED_BLOCKS = 2  # the block running and the one prefetched (FSDP backward/forward prefetch)


def per_process_memory(est: Estimate, processes: int, engine: str) -> dict[str, dict[str, float]]:
    """method -> part -> bytes for one of `processes` processes under `engine` (see module doc)."""
    s = est.shape
    b = est.weight_bytes
    P, Q, L = s.total_params, s.quantizable_params, s.trainable_params
    block, block_lora = Q / s.layers, L / s.layers
    root = P - Q  # embeddings, output head, norms: outside the blocks' linear layers
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        one = est.memory[method]
        parts = {"tokenizer": one["tokenizer"], "activations": one["activations"]}
        if engine == "ddp":
            parts["weights"] = one["weights"]
            parts["gradients"] = 2 * one["gradients"]  # the gradients and DDP's buckets
            parts["optimizer"] = one["optimizer"]
            parts["loading"] = one["loading"]
        else:
            if method == "qlora":
                per_weight = est.memory["qlora"]["weights"] - L * 4 - root * 4  # the quantized linears
                block_bytes = per_weight / max(1, Q) * block
                root_bytes = root * 4  # kept in float32 by prepare_model_for_kbit_training
            else:
                block_bytes, root_bytes = block * b, root * b
            lora_bytes = L * 4
            parts["weights"] = (
                (one["weights"] - (lora_bytes if method != "full" else 0)) / processes  # the base's shard
                + (lora_bytes / processes if method != "full" else 0)
                + root_bytes + GATHERED_BLOCKS * (block_bytes + (block_lora * 4 if method != "full" else 0))
            )
            parts["gradients"] = one["gradients"] / processes + (
                GATHERED_BLOCKS * (block * b if method == "full" else block_lora * 4)  # unsharded, then reduced
            )
            parts["optimizer"] = one["optimizer"] / processes
            parts["loading"] = one["loading"]  # rank 0 reads the checkpoint; the others get shards
        # What each process holds while it trains (on GPUs: GPU memory). Loading is a CPU RAM peak
        # before training, shown beside it: the one-process estimate's total is the larger of the two.
        parts["total"] = sum(parts[p] for p in PARTS)
        out[method] = parts
    return out


def per_process_lines(est: Estimate, processes: int, engine: str) -> list[str]:
    table = per_process_memory(est, processes, engine)
    shard = (
        "the frozen base is not sharded" if engine == "ddp" else f"weights and optimizer state split {processes} ways"
    )
    out = [
        f"memory per process, {processes} process{'es' if processes != 1 else ''} with {engine} ({shard}; "
        f"batch {est.batch_size} x {est.max_length} tokens each):",
        f"  {'':<12}" + "".join(f"{name:>12}" for name in ("full", "LoRA", "QLoRA")),
    ]
    for part in (*PARTS, "total", "loading"):
        out.append(f"  {part:<12}" + "".join(f"{human_bytes(table[m][part]):>12}" for m in METHODS))
    out.append(
        "  total: what each process holds while training (GPU memory on GPUs); loading: CPU RAM before it, "
        + ("in every process" if engine == "ddp" else "rank 0 only (it sends the others their shards)")
    )
    return out
