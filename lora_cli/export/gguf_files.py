"""Writing the two kinds of GGUF file: a whole model (llama-cli -m, Ollama FROM) and a LoRA
adapter for a base model file (llama-cli --lora, llama-server's adapter hot-swap).

Both go through gguf.GGUFWriter; names and layouts come from architectures.py, the tokenizer
from vocab.py, tensor types from quant_types.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import ExportError
from lora_cli.export.architectures import (
    gguf_name,
    llama3_rope_factors,
    model_shape,
    skipped,
    tensor_name_map,
    to_gguf_layout,
    to_gguf_rows,
    write_hyperparameters,
)
from lora_cli.export.chat_formats import DetectedChat
from lora_cli.export.quant_types import encode, file_type, tensor_type
from lora_cli.export.vocab import VocabFacts, write_vocab

FLOAT16_MAX = 65504.0


@dataclass
class WrittenFile:
    path: Path
    arch: str
    tensors: Counter = field(default_factory=Counter)  # GGML type name -> how many tensors
    vocab: VocabFacts | None = None
    alpha: float | None = None  # adapters: adapter.lora.alpha
    rank: int | None = None


def write_model_gguf(path: Path, model, tokenizer, model_dir: Path, quant: str, *, name: str,
                     chat: DetectedChat | None, description: str) -> WrittenFile:
    """The whole model (float weights of `model`, tokenizer saved in `model_dir`) as one GGUF file."""
    import gguf

    config = model.config
    shape = model_shape(config)
    names = tensor_name_map(shape)
    writer = gguf.GGUFWriter(path, shape.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, config, shape)
    written = WrittenFile(path, shape.arch)
    written.vocab = write_vocab(writer, tokenizer, model_dir, config.vocab_size, chat)

    for hf_name, tensor in model.state_dict().items():
        if skipped(hf_name, shape):
            continue
        array = to_gguf_layout(hf_name, tensor.detach().float().cpu().numpy(), shape)
        _add(writer, written, gguf_name(names, hf_name), array, quant)
    factors = llama3_rope_factors(config)
    if factors is not None:
        import numpy as np

        _add(writer, written, "rope_freqs.weight", np.asarray(factors, dtype=np.float32), "f32")
    _finish(writer)
    return written


def _add(writer, written: WrittenFile, name: str, array, quant: str) -> None:
    qtype = tensor_type(name, tuple(array.shape), quant)
    if qtype.name in ("F16", "Q8_0", "Q5_1", "Q4_1", "Q4_0") and float(abs(array).max(initial=0.0)) > FLOAT16_MAX:
        # these types store values (or block scales) as float16: larger values would become inf
        raise ExportError(f"{name} has values beyond float16's range ({FLOAT16_MAX:g}); --quant {quant} would "
                          "turn them into inf", "Export with --quant bf16 or f32.")
    writer.add_tensor(name, encode(array, qtype), raw_dtype=qtype)
    written.tensors[qtype.name] += 1


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class LoraPair:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    a: object  # float32 [r, in]
    b: object  # float32 [out, r]
    scale: float  # PEFT's scaling for this module (alpha / r, or alpha / sqrt(r) with rsLoRA)


def check_adapter_config(adapter_dir: Path, base_config=None) -> dict:
    """The adapter's config; exit 2 (before any work) for what llama.cpp's LoRA cannot apply."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"the adapter is {config.get('peft_type')}, not LoRA", "Only LoRA adapters export to GGUF.")
    if config.get("use_dora"):
        raise ExportError("a DoRA adapter cannot be written as a GGUF LoRA: llama.cpp applies B·A only, "
                          "not DoRA's magnitude vector", "Export the merged model instead (drop --adapter-only).")
    if config.get("modules_to_save"):
        raise ExportError(f"the adapter also trains whole modules ({', '.join(config['modules_to_save'])}), "
                          "which a GGUF LoRA cannot carry", "Export the merged model instead (drop --adapter-only).")
    if base_config is not None and model_shape(base_config).tied and "lm_head" in json.dumps(
            config.get("target_modules") or []):
        raise ExportError("the adapter trains lm_head, which this model ties to its embeddings: llama.cpp cannot "
                          "apply it as a LoRA", "Export the merged model instead (drop --adapter-only).")
    return config


def adapter_pairs(adapter_dir: Path) -> tuple[dict, list[LoraPair]]:
    """The adapter's config and its lora_A/lora_B pairs, with each module's PEFT scaling; exit 2 for
    what llama.cpp's LoRA cannot apply."""
    from safetensors.numpy import load_file

    config = check_adapter_config(adapter_dir)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a_of, b_of = {}, {}
    for key, value in weights.items():
        module = key.removeprefix("base_model.model.")
        if module.endswith(".lora_A.weight"):
            a_of[module.removesuffix(".lora_A.weight")] = value
        elif module.endswith(".lora_B.weight"):
            b_of[module.removesuffix(".lora_B.weight")] = value
        else:
            raise ExportError(f"the adapter holds {key}, which is not a lora_A/lora_B weight",
                              "Export the merged model instead (drop --adapter-only).")
    if set(a_of) != set(b_of) or not a_of:
        raise ExportError("the adapter's lora_A and lora_B weights do not pair up", "Retrain or re-save the adapter.")
    pairs = []
    for module in sorted(a_of):
        rank = a_of[module].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        rank_cfg = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        if rank_cfg != rank:
            raise ExportError(f"{module}: lora_A has rank {rank}, the adapter config says {rank_cfg}",
                              "The adapter files do not belong together; retrain or re-save it.")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs.append(LoraPair(module, a_of[module].astype("float32"), b_of[module].astype("float32"), scale))
    return config, pairs


def _pattern_value(pattern: dict, module: str, default):
    r"""PEFT's rank_pattern/alpha_pattern: the value of the first key matching the module name's end
    (PEFT's own rule: `re.match(rf"(.*\.)?({key})$", name)`)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_adapter_gguf(path: Path, adapter_dir: Path, base_config, quant: str, *, name: str) -> WrittenFile:
    """The adapter as a GGUF LoRA: `blk.N.<tensor>.weight.lora_a` [r, in] and `.lora_b` [out, r] in
    the base file's layout, and adapter.lora.alpha. llama.cpp scales every pair by alpha / r; where
    a pair's PEFT scaling differs (rsLoRA, per-module alpha or rank), the difference is folded into its B."""
    import gguf

    shape = model_shape(base_config)
    names = tensor_name_map(shape)
    config, pairs = adapter_pairs(adapter_dir)
    if shape.tied and any(p.module == "lm_head" for p in pairs):
        raise ExportError("the adapter trains lm_head, which this model ties to its embeddings: llama.cpp cannot "
                          "apply it as a LoRA", "Export the merged model instead (drop --adapter-only).")
    rank = int(config.get("r", pairs[0].a.shape[0]))
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp's alpha / r then equals rsLoRA's alpha / sqrt(r)
    writer = gguf.GGUFWriter(path, shape.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = WrittenFile(path, shape.arch, alpha=alpha, rank=rank)
    for pair in pairs:
        base_name = gguf_name(names, pair.module + ".weight")
        pair_rank = pair.a.shape[0]
        fold = pair.scale / (alpha / pair_rank)
        b = to_gguf_rows(pair.module + ".weight", pair.b * fold if fold != 1.0 else pair.b, shape)
        _add(writer, written, base_name + ".lora_a", pair.a, quant)
        _add(writer, written, base_name + ".lora_b", b, quant)
    _finish(writer)
    return written
