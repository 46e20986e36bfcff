"""What llama.cpp needs to know about a transformers model: its GGUF architecture, the
hyperparameters it reads, and each weight's GGUF name and layout.

Supported: the Llama family (Llama 2/3, SmolLM, Mistral: GGUF `llama`; Qwen2/2.5: `qwen2`) and
GPT-2 (`gpt2`). They differ from the transformers checkpoint in three ways only:

- names: `model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight` (gguf.tensor_mapping);
- Llama and Mistral rotate query/key pairs that are adjacent in each head (llama.cpp's "normal"
  RoPE), where transformers rotates the two halves of the head: their q/k rows are permuted so
  the same pairs rotate together. Qwen2 uses the half-split ("NeoX") RoPE in llama.cpp as well,
  so its rows stay as they are;
- GPT-2 stores its linear layers as Conv1D, [in, out]: GGUF wants [out, in].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_cli.errors import ExportError

# transformers model_type -> GGUF architecture
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

# GPT-2's Conv1D layers
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

# The RoPE variants llama.cpp reads from these keys (others would load and silently compute
# something else, so they are refused).
ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters shared by the writer and the layout functions, read once from the config."""

    model_type: str
    arch: str  # GGUF architecture name
    blocks: int
    heads: int
    kv_heads: int
    hidden: int
    head_dim: int
    tied: bool


def supported_list() -> str:
    return "Llama, SmolLM, Mistral and Qwen2/Qwen2.5 (GGUF llama/qwen2) and GPT-2"


def model_shape(config) -> ModelShape:
    """The model's shape, or exit 2 when llama.cpp would not run it as transformers does."""
    model_type = getattr(config, "model_type", None)
    arch = GGUF_ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export does not support the architecture {model_type!r}",
            f"Supported: {supported_list()}. The merged model (`lora merge`) runs anywhere transformers does.",
        )
    if arch == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ExportError(
                f"this GPT-2 uses activation {config.activation_function!r}; llama.cpp's GPT-2 computes gelu (tanh)",
                "Export a GPT-2 with the standard activation_function gelu_new.",
            )
        return ModelShape(model_type, arch, config.n_layer, config.n_head, config.n_head, config.n_embd,
                          config.n_embd // config.n_head, bool(getattr(config, "tie_word_embeddings", True)))
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"this model uses activation {config.hidden_act!r}; llama.cpp's {arch} computes silu",
                          "Only the standard SwiGLU models of these families can be exported.")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(model_type, arch, config.num_hidden_layers, heads,
                      getattr(config, "num_key_value_heads", None) or heads, config.hidden_size, head_dim,
                      bool(getattr(config, "tie_word_embeddings", False)))


def write_hyperparameters(writer, config, shape: ModelShape) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the model."""
    writer.add_block_count(shape.blocks)
    writer.add_embedding_length(shape.hidden)
    writer.add_head_count(shape.heads)
    if shape.arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    write_rope_scaling(writer, config, rope)


def rope_parameters(config) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and "rope_type" not in rope:
        rope.update(scaling)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def write_rope_scaling(writer, config, rope: dict) -> None:
    """Linear and YaRN scaling are keys; Llama 3's frequency scaling is a tensor (llama3_rope_factors)."""
    import gguf

    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ExportError(f"this model's RoPE scaling {kind!r} has no GGUF equivalent that llama.cpp reads",
                          f"Supported RoPE types: {', '.join(ROPE_TYPES)}.")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))


def llama3_rope_factors(config) -> list[float] | None:
    """Llama 3.1+'s per-frequency RoPE divisors, which llama.cpp reads from the `rope_freqs` tensor
    (transformers computes them in `_compute_llama3_parameters`: the same formula)."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def tensor_name_map(shape: ModelShape):
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == shape.arch)
    return gguf.get_tensor_name_map(arch, shape.blocks)


def gguf_name(names, hf_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"no GGUF name for the weight {hf_name}",
                          f"This checkpoint has a layer the {supported_list()} exporters do not know.")
    return found


def skipped(hf_name: str, shape: ModelShape) -> bool:
    """Weights llama.cpp does not read: buffers, and the output layer when tied to the embeddings
    (llama.cpp then uses token_embd for both, as transformers does)."""
    if hf_name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
        return True
    return shape.tied and hf_name == "lm_head.weight"


def to_gguf_rows(hf_name: str, rows, shape: ModelShape):
    """The row order llama.cpp expects for a weight, bias or LoRA B whose rows are `hf_name`'s outputs."""
    if shape.arch != "llama":
        return rows
    if ".q_proj." in hf_name:
        return permute_rope_rows(rows, shape.heads)
    if ".k_proj." in hf_name:
        return permute_rope_rows(rows, shape.kv_heads)
    return rows


def permute_rope_rows(rows, heads: int):
    """Within each head, rows [x0..x(d/2-1), y0..] (rotated as halves) become [x0, y0, x1, y1, ...]
    (rotated as adjacent pairs): the same rotation in llama.cpp's normal RoPE."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def to_gguf_layout(hf_name: str, array, shape: ModelShape):
    """A transformers weight as llama.cpp stores it: [out, in], q/k rows in its RoPE order."""
    if shape.arch == "gpt2" and hf_name.endswith(CONV1D_SUFFIXES):
        array = array.T
    return to_gguf_rows(hf_name, array, shape)
