"""LoRA dropout that keeps no copy of its input for the backward pass.

peft computes a LoRA branch as `lora_B(lora_A(dropout(x)))`. With dropout on, autograd keeps,
for every adapted linear, the dropped-out input (for lora_A's weight gradient) and its mask: a
full copy of the layer input plus a byte per element, and q/k/v (and gate/up) each keep their
own, although they read the same `x`. On SmolLM2 that is about a third of all activation memory.

Here the dropout moves inside lora_A, under a non-reentrant `torch.utils.checkpoint`: the
forward keeps only a reference to `x` (shared by the linears that read it, and kept anyway
with dropout off) and the RNG state; the backward redraws the same mask and recomputes
`dropout(x) @ A.T` (r outputs per token: cheap). The dropout is the same `F.dropout` call
drawing from the same generator, so training is bit-for-bit what plain peft computes
(tests/test_lean_dropout.py compares losses and adapters); the saved adapter is unchanged (the
dropout has no weights; lora_A keeps its class's parameters and state-dict keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class DropoutThenLinear(torch.nn.Linear):
    """lora_A with its dropout folded in; the dropped-out input is recomputed, not stored."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self._dropout_linear, x, use_reentrant=False, preserve_rng_state=True)
        return self._dropout_linear(x)

    def _dropout_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.dropout(x, self.dropout_p, self.training), self.weight, self.bias)


def fold_lora_dropout(model) -> int:
    """Fold each plain LoRA layer's dropout into its lora_A (in place). Returns how many.

    Left alone: LoRA variants (DoRA and others compute with the dropped input themselves),
    dropout off, and anything that is not a plain nn.Linear lora_A / nn.Dropout pair.
    """
    folded = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for adapter, dropout in list(dropouts.items()):
            linear = lora_a[adapter] if adapter in lora_a else None
            if (adapter in variants or type(dropout) is not torch.nn.Dropout or dropout.p == 0
                    or type(linear) is not torch.nn.Linear):
                continue
            linear.__class__ = DropoutThenLinear  # same parameters, same state-dict keys
            linear.dropout_p = float(dropout.p)
            dropouts[adapter] = torch.nn.Identity()
            folded += 1
    return folded
