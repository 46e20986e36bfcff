"""LoRA dropout, and the cast to the adapter's dtype, that keep no copy of the input for the
backward pass.

peft computes a LoRA branch as `lora_B(lora_A(dropout(x)))`. With dropout on, autograd keeps,
for every adapted linear, the dropped-out input (for lora_A's weight gradient) and its mask: a
full copy of the layer input plus a byte per element, and q/k/v (and gate/up) each keep their
own, although they read the same `x`. On SmolLM2 that is about a third of all activation memory.
A 16-bit base with float32 adapters (peft's default, what `lora train` trains) has the same
problem even with dropout off: peft casts `x` to float32 for each adapted linear and autograd
keeps every cast copy, each twice the size of the bfloat16 input (SmolLM2-135M in bfloat16, the
benchmark's real profile: peak RSS 1.92 GB with peft's casts, 1.64 GB with them folded).

Here the cast and the dropout move inside lora_A, under a non-reentrant `torch.utils.checkpoint`:
the forward keeps only a reference to `x`, in its own dtype (one per distinct input: q/k/v, and
gate/up, read the same one), and the RNG state; the backward redraws the same mask and recomputes
`dropout(x.to(A.dtype)) @ A.T` (r outputs per token: cheap). It is the same cast and the same
`F.dropout` call drawing from the same generator, so off the CPU training is bit-for-bit what
plain peft computes; the saved adapter is unchanged (the dropout has no weights; lora_A keeps its
class's parameters and state-dict keys).

On the CPU the masks are drawn another way, because `F.dropout`'s (a float `bernoulli_` per
element) was the largest cost of a training step: 38% of a SmolLM2-135M step in
scripts/bench/profile_step.py, about 11x lora_A's own matmul at r=16 (1.6 ms against 0.15 for a
4 x 160 x 576 input). `cpu_dropout_mask` takes 16 random bits per element from 64-bit words
instead, which rounds p to a multiple of 1/65536 (0.05 stays 0.05000), and the kept elements are
scaled by the exact inverse of the rounded keep rate after lora_A (r values per token, not the
input's width): lora_A's training forward on that bfloat16 input 1.84 ms -> 0.66 ms, `lora train`
1.34x the tokens/s at the same held-out loss (docs/performance.md). Same generator, same redraw
in the backward pass, so resume stays exact; tests/test_lean_dropout.py checks the rate, the
scale, and losses and gradients against peft given the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class DropoutThenLinear(torch.nn.Linear):
    """lora_A with the cast to its dtype and its dropout folded in; the cast and dropped-out
    input is recomputed, not stored."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self._dropout_linear, x, use_reentrant=False, preserve_rng_state=self.dropout_p > 0)
        return self._dropout_linear(x)

    def _dropout_linear(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)  # peft's own cast (_cast_input_dtype), turned off for this layer
        if self.dropout_p > 0 and self.training and x.device.type == "cpu":
            dropped, scale = cpu_dropout_mask(x, self.dropout_p)
            out = F.linear(x.masked_fill(dropped, 0), self.weight) * scale
            return out if self.bias is None else out + self.bias
        if self.dropout_p > 0:  # peft uses no dropout module at 0: no random numbers drawn either
            x = F.dropout(x, self.dropout_p, self.training)
        return F.linear(x, self.weight, self.bias)


def cpu_dropout_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Which elements of `x` dropout zeroes (True) with probability p rounded to a multiple of
    1/65536, and the scale of the kept ones: 16 uniform bits per element, four to a 64-bit word
    drawn from the default generator over int64's whole range (its default range leaves the top
    bit 0, which would bias one element in four)."""
    dropped = min(round(p * 65536), 65535)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), 2**63 - 1)
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)
    return bits < dropped - 32768, 65536 / (65536 - dropped)


def fold_lora_dropout(model) -> int:
    """Fold each plain LoRA layer's dropout, and its input cast, into its lora_A (in place).
    Returns how many.

    Left alone: LoRA variants (DoRA and others compute with the dropped input themselves),
    layers with neither a dropout nor a cast to fold (dropout off and activations already in the
    adapter's dtype), and anything that is not a plain nn.Linear lora_A / nn.Dropout pair.
    """
    activations = _activation_dtype(model)
    folded = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for adapter, dropout in list(dropouts.items()):
            linear = lora_a[adapter] if adapter in lora_a else None
            if adapter in variants or type(linear) is not torch.nn.Linear:
                continue
            p = (
                float(dropout.p)
                if type(dropout) is torch.nn.Dropout
                else 0.0
                if type(dropout) is torch.nn.Identity
                else None
            )
            if p is None or (p == 0 and linear.weight.dtype == activations):
                continue
            linear.__class__ = DropoutThenLinear  # same parameters, same state-dict keys
            linear.dropout_p = p
            dropouts[adapter] = torch.nn.Identity()
            module.cast_input_dtype_enabled = False  # lora_A casts, inside its checkpoint
            folded += 1
    return folded


def _activation_dtype(model) -> torch.dtype | None:
    """The dtype hidden states flow in: the input embeddings' (a 4-bit base keeps them unquantized)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else None
