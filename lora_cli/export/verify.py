"""Checking a written GGUF file before it is put in place, as `lora merge` checks a merged model.

A model file is read back by transformers' own GGUF loader (not by our writer's code) and must
compute what the merged model computes on the probe inputs, within what its tensor types allow:

    type        check (reference: the merged model in float32, on every position of the probes)
    f32         max |logit difference| <= 0.1% of the logit scale
    f16 / bf16  max |logit difference| <= 5% / 15% of the logit scale (model/merging.py's TOLERANCE)
    q8_0        the same top-1 token at >= 95% of decisive positions, mean KL(reference || file) <= 0.05 nats
    q5_1, q4_1  >= 60%, mean KL <= 0.5 nats
    q4_0, k-quants  >= 50%, mean KL <= 1 nat

A decisive position is one where the reference's likeliest token leads the next by at least 0.1
in probability: where two tokens tie, either is right. The 4/5-bit bounds are loose on purpose:
they catch a broken file (a wrong layout gives several nats and random top-1 tokens), while what a
correct file loses is reported, and compared with how far the fine-tune moved the model (on
SmolLM2-135M, q4_0 costs 0.75 nats and 5-bit 0.34: such small models quantize poorly).

and its tokenizer must encode the check sentences to the same ids, with the same chat template.
An adapter file must hold, for every LoRA module, B·A·alpha/r equal to PEFT's own delta weight in
GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import ExportCheckFailed
from lora_cli.export.architectures import ModelShape, gguf_name, rope_parameters, tensor_name_map, to_gguf_layout
from lora_cli.model.gguf_cache import quiet_gguf_progress_bar
from lora_cli.model.merging import TOLERANCE, logit_scale, max_abs_diff, probe_inputs, probe_logits


@dataclass(frozen=True)
class Tolerance:
    max_relative_diff: float | None = None  # of the logit scale
    min_top1: float | None = None  # share of positions with the same argmax
    max_kl: float | None = None  # mean KL(reference || file) per position, nats


EXACTISH = {"f32": Tolerance(TOLERANCE["float32"]), "f16": Tolerance(TOLERANCE["float16"]),
            "bf16": Tolerance(TOLERANCE["bfloat16"])}
QUANTIZED = {"q8_0": Tolerance(min_top1=0.95, max_kl=0.05), "q5_1": Tolerance(min_top1=0.6, max_kl=0.5),
             "q4_1": Tolerance(min_top1=0.6, max_kl=0.5), "q4_0": Tolerance(min_top1=0.5, max_kl=1.0)}
K_QUANT = Tolerance(min_top1=0.5, max_kl=1.0)
DECISIVE_MARGIN = 0.1

# No digits: transformers rebuilds some GGUF pre-tokenizers (SmolLM's digit splitting) only
# approximately, and the check is of our file, not of its reader.
TOKENIZER_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  Hello,\tworld!\nWhat's the capital of France? Paris.",
    "Définition : un cynique est un vaurien dont la vue défectueuse voit les choses comme elles sont.",
)


def tolerance_for(quant: str) -> Tolerance:
    return EXACTISH.get(quant) or QUANTIZED.get(quant) or K_QUANT


@dataclass(frozen=True)
class ModelCheck:
    quant: str
    max_diff: float
    scale: float
    top1: float
    kl: float
    tolerance: Tolerance
    positions: int
    fine_tune_kl: float | None = None  # mean KL(merged || base without the adapter): what training changed

    def describe(self) -> str:
        moved = f"; the fine-tune itself moved the base by {self.fine_tune_kl:.2g}" if self.fine_tune_kl else ""
        return (f"max |logit difference| {self.max_diff:.3g} (logit scale {self.scale:.3g}), same top-1 token at "
                f"{self.top1:.1%} of {self.positions} decisive positions, mean KL {self.kl:.2g} nats{moved}")

    def warning(self) -> str | None:
        """Said when the file passes but quantization blurs as much as the fine-tune changed."""
        if self.fine_tune_kl is None or self.kl < 0.5 * self.fine_tune_kl or self.quant in EXACTISH:
            return None
        return (f"{self.quant} changes the model's outputs by {self.kl:.2g} nats, {self.kl / self.fine_tune_kl:.0%} of "
                f"what the fine-tune changed ({self.fine_tune_kl:.2g}): much of the training may be lost at this "
                "precision. Prefer q8_0 (or f16), or --adapter-only on a base GGUF.")


def load_gguf_model(path: Path, rope_from=None):
    """The model and tokenizer as transformers reads them from the file (dequantized to float32).

    Where transformers' GGUF reader falls short, the gap is bridged here, not in the file: it reads
    gpt2.context_length into n_ctx only; a `llama` file whose name says Mistral it maps to a model
    type it then cannot load (Mistral is Llama for these checks); and it reads no RoPE scaling, so
    that comes from `rope_from` (the model's config): the scaling keys and the rope_freqs tensor
    are checked by llama.cpp in the tests instead.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    quiet_gguf_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if config.model_type == "gpt2":
            config.n_positions = config.n_ctx
        if config.model_type == "mistral":
            settings = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "sliding_window")}
            config = LlamaConfig(**settings)
        if rope_from is not None and rope_parameters(rope_from)["rope_type"] != "default":
            config.rope_parameters = dict(rope_from.rope_parameters)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                     dtype=torch.float32)
    except Exception as e:
        raise ExportCheckFailed(f"transformers cannot read the written GGUF file back: {e}; nothing was saved",
                                "Please report this model and quant type.") from None
    return model, tokenizer


def check_model_gguf(path: Path, reference, tokenizer, quant: str, base=None) -> ModelCheck:
    """Raise ExportCheckFailed unless the file computes what `reference` does (see the table above).
    With `base` (the model before fine-tuning), also measure how far the fine-tune moved it."""
    import torch

    probes = probe_inputs(tokenizer, reference.config.vocab_size)
    expected = probe_logits(reference, probes)
    ref = torch.cat([x[0] for x in expected])
    fine_tune_kl = None
    if base is not None:  # measured first, so the base is freed before the file's model is loaded
        fine_tune_kl = mean_kl(ref, torch.cat([x[0] for x in probe_logits(base, probes)]))
        del base
    exported, read_tokenizer = load_gguf_model(path, rope_from=reference.config)
    _check_tokenizer(tokenizer, read_tokenizer)
    got = probe_logits(exported, probes)
    del exported
    if not all(bool(torch.isfinite(x).all()) for x in got):
        raise ExportCheckFailed("the written file computes non-finite logits; nothing was saved",
                                "Export with --quant bf16 or f32.")
    out = torch.cat([x[0] for x in got])
    top2 = ref.softmax(-1).topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
    same = ref.argmax(-1) == out.argmax(-1)
    top1 = float(same[decisive].float().mean()) if bool(decisive.any()) else 1.0
    check = ModelCheck(quant, max_abs_diff(got, expected), logit_scale(expected), top1, mean_kl(ref, out),
                       tolerance_for(quant), int(decisive.sum()), fine_tune_kl)
    tol = check.tolerance
    failures = []
    if tol.max_relative_diff is not None and not check.max_diff <= tol.max_relative_diff * check.scale:
        failures.append(f"max |logit difference| {check.max_diff:.3g} > {tol.max_relative_diff * check.scale:.3g}")
    if tol.min_top1 is not None and not top1 >= tol.min_top1:
        failures.append(f"same top-1 token at {top1:.1%} of decisive positions < {tol.min_top1:.0%}")
    if tol.max_kl is not None and not check.kl <= tol.max_kl:
        failures.append(f"mean KL {check.kl:.3g} nats > {tol.max_kl:g}")
    if failures:
        raise ExportCheckFailed(
            f"the {quant} file does not compute what the merged model does ({'; '.join(failures)}); nothing was saved",
            "Use a higher-precision --quant (q8_0, f16 or bf16); if f16 fails too, please report this model.",
        )
    return check


def mean_kl(reference, other) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(other)), in nats."""
    import torch

    return float(torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean())


def _check_tokenizer(tokenizer, read_tokenizer) -> None:
    for text in TOKENIZER_CHECK_TEXTS:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = read_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ExportCheckFailed(
                f"the tokenizer read back from the file encodes {text!r} differently ({theirs[:8]}... instead of "
                f"{ours[:8]}...); nothing was saved", "Please report this tokenizer.")
    if (getattr(tokenizer, "chat_template", None) or None) != (getattr(read_tokenizer, "chat_template", None) or None):
        raise ExportCheckFailed("the chat template read back from the file differs from the model's; nothing was saved",
                                "Please report this tokenizer.")


@dataclass(frozen=True)
class AdapterCheck:
    pairs: int
    max_relative_diff: float


ADAPTER_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 2e-2}


def check_adapter_gguf(path: Path, peft_model, shape: ModelShape, quant: str) -> AdapterCheck:
    """Every LoRA module's delta, rebuilt from the file as llama.cpp applies it (alpha / r · B·A),
    equals PEFT's own `get_delta_weight` in GGUF layout."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: t for t in reader.tensors}

    def array(name: str):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(t.data.shape[0], -1)

    names = tensor_name_map(shape)
    worst, count = 0.0, 0
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        target = gguf_name(names, hf_name)
        if target + ".lora_a" not in tensors or target + ".lora_b" not in tensors:
            raise ExportCheckFailed(f"the written adapter lacks {target}.lora_a/.lora_b; nothing was saved",
                                    "Please report this model.")
        a, b = array(target + ".lora_a"), array(target + ".lora_b")
        delta = (alpha / a.shape[0]) * (b @ a)
        expected = to_gguf_layout(hf_name, module.get_delta_weight("default").detach().float().numpy(), shape)
        if delta.shape != expected.shape:
            raise ExportCheckFailed(f"{target}: B·A has shape {delta.shape}, the layer {expected.shape}; "
                                    "nothing was saved", "Please report this model.")
        scale = max(float(np.abs(expected).max()), 1e-12)
        worst = max(worst, float(np.abs(delta - expected).max()) / scale)
        count += 1
    if count * 2 != len(tensors):
        raise ExportCheckFailed(f"the written adapter holds {len(tensors)} tensors for {count} LoRA modules; "
                                "nothing was saved", "Please report this model.")
    if not worst <= ADAPTER_TOLERANCE[quant]:
        raise ExportCheckFailed(f"the written adapter's B·A differs from PEFT's by {worst:.3g} of its scale "
                                f"(> {ADAPTER_TOLERANCE[quant]:g}); nothing was saved", "Use --quant f32.")
    return AdapterCheck(count, worst)

