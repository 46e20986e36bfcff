"""The memory a run needs, and its parameters and adapter size, from the model config alone
(`lora estimate`, `lora validate`, and the line `lora train` prints before it starts).

No weights are read: the model is built on PyTorch's meta device (shapes only), so counting is
exact and takes a second even for an 8B model; peft attaches the recipe's LoRA to that meta model
to count the adapter exactly.

Memory to train, per method (B = train.batch_size, T = data.max_length, b = bytes per weight):

  tokenizer    ~13x its tokenizer.json where that file is on disk (measured), else 0
  weights      full/LoRA: P·b (+ LoRA params in float32: peft keeps adapters in fp32)
               QLoRA: quantized linears at 0.5 byte + quantization constants (1/64 byte with
               double quantization, else 4/64), the rest (embeddings, norms, head) in float32
               (prepare_model_for_kbit_training upcasts them), + LoRA params in float32
  gradients    full: P·b; LoRA/QLoRA: trainable params × 4
  optimizer    train.optimizer's state for each trainable tensor, as it keeps it (measured;
               training/optimizers.py state_bytes): AdamW 2 states in the parameter's dtype,
               Adafactor a row and a column per matrix, SGD none, bitsandbytes 8-bit 1 byte per
               element and state (tensors under 4096 elements: 4); full fine-tuning's embeddings
               stay in 32 bits with 8-bit optimizers (the Trainer registers them so)
  activations  B·T × (per layer × L + logits), in the compute dtype's bytes a:
               per layer, per token, in elements (measured with autograd's saved-tensor hooks on
               tiny Llama and GPT-2 models, transformers 5.x, torch 2.x):
                 gated MLP (Llama, Mistral, Qwen, SmolLM):  7h + 4i + heads + 3T
                 plain MLP (GPT-2 style, GELU, dropout):   10h + 5i + 3·heads·T
                 (3·heads·T replaces heads + 3T when attention materializes its weights:
                 eager attention or attention dropout > 0)
               + LoRA: r per adapted linear, + (1 + 1/a)·in_features per adapted linear where
                 peft's own dropout runs (it keeps the dropped-out input and its mask): only
                 with DoRA, as `lora train` folds plain LoRA's dropout (model/lean_dropout.py)
               gradient checkpointing: h per layer + one layer's activations (recomputed)
               logits: 4 copies of B·T·V in float32 (logits, log-softmax, and their gradients
               at the peak of the backward pass); LoRA on the architectures where `lora train`
               computes the loss in chunks of C rows (training/loss.py): the float32 logits of
               one chunk, min(B·T, C) rows (softmax and gradient are computed in their memory),
               + a 16-bit copy of it when the head computes in 16 bits; an upper bound: only
               supervised positions are projected (flan: at most 465 of 1024 per batch), and
               the estimate does not read the data
               QLoRA: + the largest quantized weight in the compute dtype: bitsandbytes
                 dequantizes each weight for its matmul, forward and backward (measured: 130 MiB
                 of RSS for a 128 MiB fp32 weight, one weight at a time)
               the loss, the recomputed layer and the dequantized weight are never alive at the
                 same time, but the estimate adds them: the allocator does not hand all of it back
                 (bench, long QLoRA profile, above the RSS once the data is prepared: live tensors
                 peak at 0.38 GB, tcmalloc's RSS, what `lora train` runs with on CPU, at 0.46 GB;
                 the largest term alone would give 0.39 GB, the sum 0.52 GB)
  preference   train.method dpo / orpo: each pair's chosen and rejected rows run as one batch, so
               the activations are those of 2·B rows; the loss term is TRL's: DPO projects
               log-probabilities in tiles of at most 4096 tokens x 32768 vocabulary entries in
               float32 (the tile and its gradient), ORPO takes the full logits (as for full
               fine-tuning above); DPO's reference forward (adapter off, no gradient) keeps
               nothing for the backward pass and is not counted
  loading      the checkpoint read through a memory map (P·b); QLoRA reads it tensor by tensor
               (model/loading.py, read_checkpoint_without_mmap): the quantized weights, the
               tensors left unquantized, and one full-precision weight being quantized;
               + the tokenizer, loaded before. total = max(sum of the five, loading)
Not counted: the Python process and libraries (~0.5-1 GB RSS on a CPU), the data and the
modules imported once training starts (together ~30 MB on the tests' small model), allocator
slack. Tests check the LoRA and QLoRA totals against the measured peak RSS of `lora train` on
small models.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from lora_cli.console import human_bytes, human_count
from lora_cli.model.adapters import check_modules_to_save, with_lora
from lora_cli.model.dtypes import resolve_dtype
from lora_cli.model.facts import load_model_config, model_context, tokenizer_file_bytes
from lora_cli.model.lean_dropout import fold_lora_dropout
from lora_cli.model.lora_init import CONVERTED
from lora_cli.recipe.schema import Recipe
from lora_cli.training.loss import CHUNK_ROWS, PLAIN_HEAD_MODEL_TYPES
from lora_cli.training.optimizers import OPTIMIZERS, state_bytes

METHODS = ("full", "lora", "qlora")

PARTS = ("tokenizer", "weights", "gradients", "optimizer", "activations")

# A fast tokenizer in memory is ~13x its tokenizer.json (measured: SmolLM2's 3.4 MB file, 44 MB
# of RSS once loaded; the tests' 8 KB one, 1.7 MB).
TOKENIZER_MEMORY_PER_FILE_BYTE = 13

SAFETENSORS_BYTES_PER_TENSOR = 130  # the JSON header entry for one tensor (name, dtype, shape)


@dataclass
class ModelShape:
    total_params: int
    quantizable_params: int  # in linear layers other than the output head: what 4-bit quantizes
    largest_quantizable: int  # the biggest of those weights (QLoRA dequantizes one at a time)
    trainable_params: int  # LoRA params for the recipe's r / target_modules
    lora_tensors: int
    lora_r_per_token: int  # r x adapted linears (all layers): LoRA's A outputs kept per token
    lora_dropout_inputs: int  # in_features of adapted linears when lora.dropout > 0, else 0
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    context: int | None
    gated_mlp: bool
    attention_quadratic: bool  # eager attention or attention dropout: weights are kept
    model_type: str
    # shapes of the trainable LoRA tensors, and of every base tensor (full fine-tuning) with
    # whether it is an embedding's: the optimizer's state is counted per tensor (not in to_dict)
    lora_shapes: list = field(default_factory=list, repr=False)
    full_shapes: list = field(default_factory=list, repr=False)


@dataclass
class Estimate:
    model: str
    shape: ModelShape
    batch_size: int
    max_length: int
    weight_bytes: int
    compute_bytes: int
    adapter_bytes: int
    training_method: str = "sft"  # train.method: dpo / orpo run 2·B rows (chosen + rejected)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> part -> bytes
    method: str = "lora"  # what the recipe uses
    optimizer: str = "adamw_torch"
    lora_init: str = "default"
    lora_r: int = 16

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("lora_shapes", "full_shapes"):
            out["shape"].pop(key)
        # One place for scripts to read this recipe's figure: an 8-bit base is not a column of
        # its own (not modelled), it lies between the QLoRA and LoRA totals.
        if self.method in self.memory:
            out["this_recipe"] = {"method": self.method, "total": self.memory[self.method]["total"]}
        else:
            out["this_recipe"] = {"method": self.method,
                                  "total_between": sorted([self.memory[m]["total"] for m in ("qlora", "lora")])}
        return out


# --------------------------------------------------------------------------- counting


def model_shape(config, recipe: Recipe) -> ModelShape:
    """Count parameters on the meta device and attach the recipe's LoRA there."""
    # bitsandbytes (imported by peft) logs a CPU-kernel notice that means nothing for counting.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        check_modules_to_save(model, recipe.lora.modules_to_save)  # what `lora train` would refuse
        total = sum(p.numel() for p in model.parameters())
        embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        full_shapes = [(tuple(p.shape), id(p) in embedding_params) for p in model.parameters()]
        quantizable = largest = 0
        gated = False
        for name, module in model.named_modules():
            if _is_linear(module) and not name.endswith("lm_head"):
                quantizable += module.weight.numel()
                largest = max(largest, module.weight.numel())
                gated = gated or "gate" in name.rsplit(".", 1)[-1]
        # (counting only: an initialization that decomposes weights has nothing to work on here)
        peft_model = with_lora(model, dataclasses.replace(recipe.lora, init="default"))
    trainable = tensors = lora_r = lora_in = 0
    lora_shapes = []
    for p in peft_model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            tensors += 1
            lora_shapes.append(tuple(p.shape))
    fold_lora_dropout(peft_model)  # as `lora train` does: a folded dropout keeps no input copy
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            lora_r += recipe.lora.r
            dropout = module.lora_dropout["default"]
            lora_in += lora_a["default"].in_features if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 else 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    attn = getattr(text, "_attn_implementation", None) or "sdpa"
    attn_dropout = max(float(getattr(text, "attention_dropout", 0) or 0), float(getattr(text, "attn_pdrop", 0) or 0))
    return ModelShape(
        total_params=total,
        quantizable_params=quantizable,
        largest_quantizable=largest,
        trainable_params=trainable,
        lora_tensors=tensors,
        lora_r_per_token=lora_r,
        lora_dropout_inputs=lora_in,
        layers=int(text.num_hidden_layers),
        hidden=hidden,
        intermediate=int(intermediate),
        heads=int(text.num_attention_heads),
        vocab=int(text.vocab_size),
        context=model_context(config),
        gated_mlp=gated,
        attention_quadratic=attn == "eager" or attn_dropout > 0,
        model_type=str(getattr(config, "model_type", "?")),
        lora_shapes=lora_shapes,
        full_shapes=full_shapes,
    )


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


# --------------------------------------------------------------------------- memory


def _dtype_bytes(name: str) -> int:
    if name == "auto":
        return torch.finfo(resolve_dtype("auto")).bits // 8
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def layer_elements_per_token(shape: ModelShape, seq: int, *, lora: bool, nbytes: int = 4) -> float:
    """Activation elements one layer keeps for the backward pass, per token (see module doc)."""
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    attention = 3 * a * seq if shape.attention_quadratic else a + 3 * seq
    per_layer = (7 * h + 4 * i if shape.gated_mlp else 10 * h + 5 * i) + attention
    # dropout keeps its output (nbytes) and a 1-byte mask per adapted input
    extra = (shape.lora_r_per_token + (1 + 1 / nbytes) * shape.lora_dropout_inputs) / shape.layers if lora else 0.0
    return per_layer + extra


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    seq: int,
    *,
    lora: bool,
    checkpointing: bool,
    nbytes: int,
    loss: float,
    dequantized: float = 0.0,
) -> float:
    """Activations at the peak of a step (see module doc): what the backward pass keeps, plus the
    transients: the loss (`loss` bytes), a weight dequantized for its matmul (`dequantized`
    bytes, QLoRA) and, with checkpointing, the recomputed layer."""
    layer = tokens * layer_elements_per_token(shape, seq, lora=lora, nbytes=nbytes) * nbytes
    ends = tokens * 2 * shape.hidden * nbytes  # embeddings and the final norm
    kept = tokens * shape.layers * shape.hidden * nbytes + layer if checkpointing else shape.layers * layer
    return kept + ends + loss + dequantized


def estimate_memory(recipe: Recipe, config=None) -> Estimate:
    config = config if config is not None else load_model_config(recipe.model)
    shape = model_shape(config, recipe)
    m, t = recipe.model, recipe.train
    b = _dtype_bytes(m.dtype)
    compute = _dtype_bytes(m.compute_dtype) if m.compute_dtype != "auto" else b
    rows_per_example = 1 if t.method == "sft" else 2  # dpo / orpo: chosen and rejected in one batch
    tokens = rows_per_example * t.batch_size * recipe.data.max_length
    logits = 4 * tokens * shape.vocab * 4
    chunk = _chunked_loss_rows(shape.model_type)

    def lora_logits(nbytes: int) -> float:
        if t.method == "dpo":  # TRL's fused head: one float32 tile and its gradient
            return 2 * min(tokens, TRL_TOKEN_TILE) * min(shape.vocab, TRL_VOCAB_TILE) * 4
        if t.method == "orpo" or not chunk:  # ORPOTrainer takes the full logits
            return logits
        # training/loss.py: one chunk of supervised positions is projected at a time, in float32
        # (+ its 16-bit matmul output when the head computes in 16 bits)
        rows = min(chunk, tokens)
        return (rows * 4 + (rows * nbytes if nbytes < 4 else 0)) * shape.vocab

    P, Q, L = shape.total_params, shape.quantizable_params, shape.trainable_params

    def acts(lora: bool, nbytes: int, dequantized: float = 0.0) -> float:
        return activation_bytes(
            shape,
            tokens,
            recipe.data.max_length,
            lora=lora,
            checkpointing=t.gradient_checkpointing,
            nbytes=nbytes,
            loss=lora_logits(nbytes) if lora else logits,
            dequantized=dequantized,
        )

    constants = 1 / 64 if m.double_quant else 4 / 64
    lora_optimizer = state_bytes(t.optimizer, shape.lora_shapes, 4)  # peft keeps adapters in float32
    full_optimizer = _full_optimizer_bytes(t.optimizer, shape.full_shapes, b)
    memory = {
        "full": {"weights": P * b, "gradients": P * b, "optimizer": full_optimizer, "activations": acts(False, b)},
        "lora": {
            "weights": P * b + L * 4, "gradients": L * 4, "optimizer": lora_optimizer, "activations": acts(True, b)
        },
        "qlora": {
            "weights": Q * (0.5 + constants) + (P - Q) * 4 + L * 4,
            "gradients": L * 4,
            "optimizer": lora_optimizer,
            "activations": acts(True, compute, dequantized=shape.largest_quantizable * compute),
        },
    }
    # Loading reads the checkpoint through a memory map (P·b, resident while it is read); a
    # quantized load reads it tensor by tensor instead (model/loading.py,
    # read_checkpoint_without_mmap): the quantized model plus one full-precision weight.
    load = {"full": P * b, "lora": P * b, "qlora": (P - Q) * 4 + Q * (0.5 + constants) + shape.largest_quantizable * b}
    tokenizer = tokenizer_file_bytes(m) * TOKENIZER_MEMORY_PER_FILE_BYTE  # loaded first, held throughout
    for method, parts in memory.items():
        parts["tokenizer"] = tokenizer
        parts["loading"] = load[method] + tokenizer
        parts["total"] = max(sum(parts[p] for p in PARTS), parts["loading"])
    # PiSSA / OLoRA adapters are saved converted to fit the original base: rank 2r, twice the bytes
    converted = recipe.lora.init in CONVERTED
    adapter = L * 4 * (2 if converted else 1) + 8 + SAFETENSORS_BYTES_PER_TENSOR * shape.lora_tensors
    method = {"none": "lora", "4bit": "qlora", "8bit": "lora (8-bit base)"}[m.quantization]
    return Estimate(
        model=m.name,
        shape=shape,
        batch_size=t.batch_size,
        max_length=recipe.data.max_length,
        weight_bytes=b,
        compute_bytes=compute,
        adapter_bytes=int(adapter),
        training_method=t.method,
        memory=memory,
        method=method,
        optimizer=t.optimizer,
        lora_init=recipe.lora.init,
        lora_r=recipe.lora.r,
    )


# TRL's fused log-probability head (trl.kernels.chunked_logprob, DPOTrainer): tokens x vocabulary per tile
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768


def _full_optimizer_bytes(name: str, shapes: list[tuple[tuple, bool]], nbytes: int) -> int:
    """Full fine-tuning's optimizer state: 8-bit optimizers keep the embeddings' in 32 bits (the
    Trainer registers them so with bitsandbytes)."""
    kind = OPTIMIZERS[name]
    if not kind.eight_bit:
        return state_bytes(name, [s for s, _ in shapes], nbytes)
    rest = state_bytes(name, [s for s, is_embedding in shapes if not is_embedding], nbytes)
    return rest + sum(kind.states * 4 * math.prod(s) for s, is_embedding in shapes if is_embedding)


def _chunked_loss_rows(model_type: str) -> int | None:
    """Rows per chunk when `lora train` computes the loss chunk-wise for this architecture."""
    return CHUNK_ROWS if model_type in PLAIN_HEAD_MODEL_TYPES else None


# --------------------------------------------------------------------------- output


def estimate_lines(est: Estimate) -> list[str]:
    s = est.shape
    pct = 100 * s.trainable_params / max(1, s.total_params)
    out = [
        f"model: {est.model} ({s.model_type}, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab}"
        + (f", context {s.context}" if s.context else "")
        + ")",
        f"parameters: {s.total_params:,} ({human_count(s.total_params)})",
        f"trainable LoRA parameters: {s.trainable_params:,} ({pct:.2f}% of the base's)",
        f"adapter on disk: {human_bytes(est.adapter_bytes)} (safetensors, float32"
        + (f"; rank {2 * est.lora_r} after the {est.lora_init} conversion)" if est.lora_init in CONVERTED else ")"),
        f"memory to train, batch {est.batch_size} x {est.max_length} tokens "
        + (f"(x2: chosen and rejected rows, train.method {est.training_method}) "
           if est.training_method != "sft" else "")
        +         f"({est.weight_bytes * 8}-bit weights; not counting ~0.5-1 GB for Python and the libraries):",
    ]
    header = f"  {'':<12}" + "".join(f"{name:>12}" for name in ("full", "LoRA", "QLoRA"))
    out.append(header)
    for part in (*PARTS, "loading", "total"):
        out.append(f"  {part:<12}" + "".join(f"{human_bytes(est.memory[m][part]):>12}" for m in METHODS))
    out.append(f"  optimizer: {est.optimizer} ({OPTIMIZERS[est.optimizer].summary})")
    between = "" if est.method in est.memory else " (not modelled: between the QLoRA and LoRA columns)"
    out.append(f"  this recipe: {est.method}{between}")
    return out
