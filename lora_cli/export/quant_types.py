"""The GGUF tensor types `lora export --quant` writes, and which tensors keep more precision.

f32/f16/bf16/q8_0/q5_1/q4_1/q4_0 are written here with gguf.quants (llama.cpp's own Python
implementation of its formats). K-quants (q4_k_m, ...) need llama.cpp's `llama-quantize`: we write
f16, then run it (export/kquants.py).
"""

from __future__ import annotations

WRITTEN_HERE = ("f32", "f16", "bf16", "q8_0", "q5_1", "q4_1", "q4_0")

# llama-quantize's type names (lower case) for the k-quants and i-quants it offers without an
# importance matrix.
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")

DEFAULT_QUANT = "q8_0"

# 4- and 5-bit files keep the embeddings and the output layer at 8 bits: every token passes through
# them and, tied (SmolLM2, Qwen2.5 small), the embedding matrix is also the output layer.
# llama-quantize does the same for the output layer (q6_k) in its own 4/5-bit types.
HIGH_PRECISION_TENSORS = ("token_embd.weight", "output.weight")


def all_quants() -> tuple[str, ...]:
    return WRITTEN_HERE + K_QUANTS


def file_type(quant: str):
    """general.file_type for a quant written here."""
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    """The GGML type of one tensor in a `quant` file: vectors (norms, biases) stay float32 as
    llama.cpp requires; block types need rows that are a whole number of blocks, else f16."""
    import gguf

    types = {
        "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1, "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }
    if len(shape) < 2 or gguf_name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    if quant in ("q5_1", "q4_1", "q4_0") and gguf_name in HIGH_PRECISION_TENSORS:
        quant = "q8_0"
    chosen = types[quant]
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return chosen


def encode(array, qtype):
    """float32 array -> the bytes (or float16 array) GGUFWriter.add_tensor takes with raw_dtype."""
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
