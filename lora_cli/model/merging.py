"""Folding an adapter into its base, checked: QLoRA bases dequantized to the weights the adapter
was trained on, and the probe logits that prove a merged model computes what base + adapter did.

Why not `model.dequantize()` from transformers: for GPT-2-style models (Conv1D layers stored as
[in, out]) it swaps in nn.Linear modules holding [out, in] weights, and the saved checkpoint then
either fails to load or, for square layers, loads silently transposed. We instead dequantize each
4/8-bit layer (peft's `dequantize_module_weight`) into a freshly loaded full-precision copy of the
same architecture, transposing where that copy uses Conv1D.
"""

from __future__ import annotations

import hashlib

from lora_cli.errors import MergeError

# Largest allowed max |logit difference|, relative to max(1, max |reference logit|). float32 is
# summation-order noise; half precisions are the rounding of every weight and activation
# (measured on SmolLM2-135M: 4% of the logit scale in bfloat16, 0.4% in float16).
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 0.15, "int8": 0.15}

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
)


def probe_inputs(tokenizer, vocab_size: int) -> list:
    """A few token sequences: plain text, a chat turn (if there is a template), random ids."""
    import torch

    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello! Who are you?"}], tokenize=False, add_generation_prompt=True
            ))
        except Exception:  # a template that wants other roles or arguments: plain text is enough
            pass
    probes = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    generator = torch.Generator().manual_seed(0)
    probes.append(torch.randint(0, vocab_size, (1, 24), generator=generator))
    return [p for p in probes if p.shape[1] > 0]


def probe_logits(model, probes: list) -> list:
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=p.to(device), use_cache=False).logits.float().cpu() for p in probes]


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def logit_scale(logits: list) -> float:
    return max(1.0, max(float(x.abs().max()) for x in logits))


def check_finite_logits(logits: list, what: str) -> None:
    """A diverged adapter can have finite weights and still give NaN/inf outputs: say so, rather
    than let a NaN difference read as a mismatch between adapter and base."""
    import torch

    if not all(bool(torch.isfinite(x).all()) for x in logits):
        raise MergeError(
            f"the outputs of {what} are non-finite (NaN or inf) on the probe inputs: the adapter is "
            "broken (its training diverged); nothing was saved",
            "Retrain with a lower train.lr (`lora runs` and the run's metrics.jsonl show where the loss went bad).",
        )


def check_finite(model, what: str) -> None:
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeError(
                f"{what}: {name} has {bad} non-finite values (NaN or inf); nothing was saved",
                "If the adapter itself is broken (training diverged), retrain with a lower train.lr. "
                "If only --dtype float16 overflows, use --dtype bfloat16 or float32.",
            )


# --------------------------------------------------------------------------- dequantizing QLoRA bases


def dequantized_weights(quantized_model) -> dict:
    """{module name: float32 weight [out, in]} for every bitsandbytes 4-bit / 8-bit layer."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for name, module in quantized_model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            out[name] = dequantize_module_weight(module).detach().to("cpu", torch.float32).clone()
    return out


def load_dequantized(model, weights: dict) -> None:
    """Copy dequantized weights into a full-precision model of the same architecture, in place."""
    import torch

    with torch.no_grad():
        for name, weight in weights.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise MergeError(f"the full-precision base has no layer {name} (the 4-bit base has)",
                                 "Merge with --onto original.") from None
            if type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored as [in, out]
                weight = weight.T
            if tuple(module.weight.shape) != tuple(weight.shape):
                raise MergeError(
                    f"{name}: the dequantized weight has shape {tuple(weight.shape)}, the full-precision "
                    f"layer {tuple(module.weight.shape)}",
                    "Merge with --onto original.",
                )
            module.weight.copy_(weight.to(module.weight.dtype))


def tensor_digests(model) -> dict[str, str]:
    """name -> sha1 of the tensor's bytes (dtype and shape included): equal means identical."""
    import torch

    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha1(f"{t.dtype}{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
        out[name] = digest.hexdigest()
    return out

