"""The training loss without the full logits: cross-entropy on supervised positions only, chunked.

A causal LM's usual loss projects every position of every row onto the vocabulary
(batch x length x 49k floats for SmolLM2: hundreds of MB, several copies during backward), then
throws away the masked ones (prompt, padding). Here, for models whose logits are exactly
`lm_head(hidden)`:

1. the model runs with `logits_to_keep` = a boolean mask of the positions whose next token is
   supervised (transformers slices the hidden states before its head), and with its head
   swapped for an identity, so it returns those hidden states, not logits;
2. `frozen_head_cross_entropy` projects them onto the vocabulary a chunk at a time and computes
   the gradient with respect to the hidden states in the same pass (softmax - one-hot, times the
   head's weight), so no chunk's logits outlive the chunk. The head is frozen under LoRA, so no
   weight gradient is needed; the arithmetic is that of `F.cross_entropy` on the full logits.

The forward call still goes through the (possibly DDP-wrapped) model, so gradient sync works.
Where any condition fails (an unlisted architecture, a trainable or quantized head, FSDP or
DeepSpeed owning the parameters, an old transformers) the Trainer's own loss is used.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from lora_cli.data.tokenize import IGNORE_INDEX

# Positions projected at once: 512 x 49k x 4 bytes = 100 MB for SmolLM2. Smaller chunks cost
# time (256: ~5-15% slower loss, 128: ~35%, on 2 CPU cores); larger ones only memory.
CHUNK_ROWS = 512

# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping (Gemma 2/3),
# no logit scaling (Cohere, Granite), no extra norm after the head. Add one after checking its
# forward (tests/test_loss.py compares against the model's own loss).
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"}


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, hidden.shape[0])
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()
            target = targets[start:end]
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: torch.logsumexp would hold a second chunk-sized
            # temporary, and the chunk is what this loss adds to the peak
            row_max = logits.amax(dim=-1)
            exp = logits.sub_(row_max[:, None]).exp_()
            sum_exp = exp.sum(dim=-1)
            total += (row_max + sum_exp.log() - target_logit).sum()
            if need_grad:
                probs = exp.div_(sum_exp[:, None])  # softmax, still in the logits' memory
                probs[torch.arange(end - start, device=probs.device), target] -= 1.0
                grad_hidden[start:end] = probs.to(weight.dtype) @ weight
            del logits, exp  # one chunk alive at a time: freed before the next is projected
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def frozen_head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden), targets), gradient to `hidden` only."""
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, need_grad)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): mask[b, t] is True where labels[b, t + 1] is supervised; targets in the
    row-major order in which `hidden[mask]` lists those positions."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


def plain_head(hf_model) -> torch.nn.Linear | None:
    """The model's output head when the chunked loss computes exactly its loss, else None."""
    if getattr(hf_model.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if "logits_to_keep" not in inspect.signature(hf_model.forward).parameters:
        return None
    import transformers.modeling_utils as mu  # (here: estimating memory imports this module, not transformers')

    if not hasattr(mu, "slice_logits_to_keep"):  # boolean masks arrived with this helper
        return None
    head = hf_model.get_output_embeddings()
    # Exactly nn.Linear: not a peft LoRA layer, not a bitsandbytes layer; frozen.
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or not head.weight.is_floating_point():
        return None
    return head


@contextlib.contextmanager
def head_as_identity(hf_model):
    """The model returns its (sliced) last hidden states in place of logits, for a moment."""
    head = hf_model.get_output_embeddings()
    hf_model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        hf_model.set_output_embeddings(head)


def supervised_loss(model, hf_model, head, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss of `inputs` (with labels), as the model's own loss function defines it:
    summed over supervised tokens, divided by `num_items_in_batch` when given, else their count."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    mask, targets = supervised_positions(labels)
    with head_as_identity(hf_model):
        hidden = model(**inputs, logits_to_keep=mask, use_cache=False).logits
    total = frozen_head_cross_entropy(hidden, head, targets.to(hidden.device))
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / max(int(targets.numel()), 1)
