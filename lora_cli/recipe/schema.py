"""The recipe's schema: one frozen dataclass per section, each field with its help text.

The help text (`metadata["help"]`) and, for numbers, the allowed range (`metadata["range"]`) feed
the validation messages (recipe/load.py), the marked dump that `lora train` and `lora validate`
print (recipe/show.py) and the key reference docs/recipes.md (recipe/reference.py).

Standard library only, so the CLI stays fast.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def opt(default: Any, help: str, *, range: tuple | None = None, factory: bool = False) -> Any:
    """A recipe field: its default, its help text and, for numbers, its allowed range.

    `range` is (low, high, low_inclusive, high_inclusive); None for an open end.
    """
    meta = {"help": help, "range": range}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt(
        "smollm2-135m-instruct",
        "Hub id, local model directory, path to a .gguf file, or a built-in name "
        "(smollm2-135m-instruct).",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of a hub model.")
    dtype: Dtype = opt(
        "auto",
        "Dtype of the base weights. auto: bfloat16 on GPUs that support it and on CPUs with "
        "AVX512-BF16 or AMX, else float32 (a run keeps the dtype it started with).",
    )
    quantization: Literal["none", "8bit", "4bit"] = opt(
        "none", "Quantize the frozen base with bitsandbytes: 4bit is QLoRA."
    )
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type (4bit only).")
    double_quant: bool = opt(True, "Also quantize the quantization constants (4bit only).")
    compute_dtype: Dtype = opt(
        "auto", "Dtype the 4-bit layers compute in. auto: same as dtype."
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = opt(
        "auto", "Attention kernel. auto: sdpa where the model supports it."
    )
    trust_remote_code: bool = opt(
        False, "Run the model repository's own Python code. Only for sources you trust."
    )
    allow_pickle_weights: bool = opt(
        False,
        "Allow loading pickle (.bin/.pt) weights when no safetensors exist. Pickle files can run "
        "code when loaded: only for sources you trust.",
    )


@dataclass(frozen=True)
class LoraSection:
    r: int = opt(16, "Rank of the LoRA update matrices.", range=(1, None, True, None))
    alpha: float = opt(32, "LoRA scaling numerator (scale = alpha / r).", range=(0, None, False, None))
    dropout: float = opt(0.05, "Dropout on the LoRA input.", range=(0, 1, True, False))
    target_modules: str | list[str] = opt(
        "all-linear",
        "Modules that get LoRA: 'all-linear' (every linear layer but the output head) or a list "
        "of module names such as [q_proj, v_proj] or [c_attn] (one name alone is fine; a string "
        "with regex characters is a regular expression over full module paths, as in PEFT).",
    )
    bias: Literal["none", "all", "lora_only"] = opt("none", "Which biases to train.")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = opt(False, "Rank-stabilized scaling (alpha / sqrt(r)).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = opt(
        "default",
        "How the adapter starts (PEFT's init_lora_weights). default: A random, B zero; gaussian: A "
        "Gaussian, B zero; pissa / olora: A and B from the SVD / QR of each base weight, which "
        "they move into the adapter (full-precision base only; the saved adapter is converted to "
        "apply to the unmodified base, at twice the rank); loftq: A and B cancel most of the "
        "4-bit quantization error (model.quantization: 4bit, nf4).",
    )
    lr_ratio: float | None = opt(
        None,
        "LoRA+: the B matrices learn this many times faster than train.lr (PEFT's "
        "create_loraplus_optimizer; the LoRA+ paper suggests 16). null: one learning rate.",
        range=(0, None, False, None),
    )
    modules_to_save: list[str] = opt(
        list, "Extra modules trained in full and saved with the adapter.", factory=True
    )


DataFormat = Literal["auto", "text", "completion", "alpaca", "chat", "preference"]


@dataclass(frozen=True)
class DataSource:
    """An entry of `data.train` written as a mapping: one source of a weighted mix (docs/data.md)."""

    path: str = field(metadata={"help": "A data file (.jsonl .json .csv .parquet .txt) or a hub dataset id.",
                                "range": None})
    weight: float | None = opt(
        None,
        "This source's share of the training examples, relative to the other entries' weights "
        "(0.7 and 0.3, or 7 and 3). Give every entry a weight (a mix, data.mix_stopping says when "
        "it ends) or none (every row of each source, once).",
        range=(0, None, False, None),
    )
    format: DataFormat | None = opt(None, "This source's row format (default: data.format).")
    split: str | None = opt(None, "Split of a hub dataset (default: train); a local file has one split.")
    max_rows: int | None = opt(None, "Use only the first N rows of this source.", range=(1, None, True, None))


@dataclass(frozen=True)
class DataConfig:
    train: str | list[str] | list[DataSource] = opt(
        "data/train.jsonl",
        "Training data: a file (.jsonl .json .csv .parquet .txt), a list of files, or a hub "
        "dataset id. Relative paths are relative to the current directory. A list of mappings "
        "{path, weight, format, split, max_rows} mixes sources by weight (see below and docs/data.md).",
    )
    validation: str | list[str] | None = opt(None, "Validation data: a file or list of files.")
    val_split: float = opt(
        0.0, "Fraction of the training rows held out for validation.", range=(0, 1, True, False)
    )
    format: DataFormat = opt(
        "auto",
        "Row format. text: {text}; completion: {prompt, completion}; alpaca: {instruction, "
        "input, output}; chat: {messages: [{role, content}]}; preference (train.method dpo/orpo): "
        "{prompt, chosen, rejected}, strings or lists of messages; auto: picked from the columns.",
    )
    max_length: int = opt(512, "Longest example in tokens.", range=(2, None, True, None))
    too_long: Literal["truncate", "drop", "error"] = opt(
        "truncate", "What to do with examples longer than max_length."
    )
    packing: bool = opt(
        False,
        "Pack several examples into each row of max_length tokens. Examples never attend to "
        "each other.",
    )
    train_on_prompt: bool = opt(
        False, "Also compute the loss on prompt tokens (completion/alpaca/chat)."
    )
    system_prompt: str | None = opt(
        None, "chat: a system message added to every conversation that has none."
    )
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = opt(
        "first_exhausted",
        "When a weighted mix (data.train entries with weights) ends, i.e. what one epoch is. "
        "first_exhausted: when the first source runs out (no row repeats; the other sources are "
        "sampled). all_exhausted: when every source has been used once (smaller sources repeat).",
    )


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["sft", "dpo", "orpo"] = opt(
        "sft",
        "sft: supervised fine-tuning on answers. dpo / orpo: preference tuning on {prompt, chosen, "
        "rejected} pairs with TRL's DPOTrainer / ORPOTrainer (docs/preference.md).",
    )
    beta: float = opt(
        0.1,
        "dpo / orpo strength: DPO's beta (how far the adapter may move from the base; the base, "
        "adapter off, is the reference) or ORPO's lambda (weight of the odds-ratio term).",
        range=(0, None, False, None),
    )
    epochs: float = opt(1, "Passes over the training data.", range=(0, None, False, None))
    max_steps: int | None = opt(
        None, "Stop after this many optimizer steps (overrides epochs).", range=(1, None, True, None)
    )
    batch_size: int = opt(4, "Examples (or packed rows) per device per step.", range=(1, None, True, None))
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", range=(1, None, True, None))
    lr: float = opt(2.0e-4, "Peak learning rate.", range=(0, None, False, None))
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = opt(
        "cosine", "Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = opt(0.03, "Fraction of steps spent warming up.", range=(0, 1, True, False))
    weight_decay: float = opt(
        0.0, "Weight decay (decoupled for the AdamW, Lion and Adafactor optimizers; L2 for sgd).",
        range=(0, None, True, None),
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "lion_8bit", "paged_adamw_8bit"
    ] = opt(
        "adamw_torch",
        "The optimizer (the HF Trainer's). adamw_torch_fused: one fused kernel where torch has one "
        "for the device; adafactor: factored second moments, no first; sgd: plain SGD, no state; "
        "adamw_8bit / lion_8bit / paged_adamw_8bit: bitsandbytes, states in 8 bits for tensors of "
        "4096 elements or more (paged: moved to CPU memory under GPU memory pressure; CUDA only).",
    )
    adam_beta1: float = opt(
        0.9, "First-moment decay of AdamW (also Lion's beta1).", range=(0, 1, True, False)
    )
    adam_beta2: float = opt(
        0.999, "Second-moment decay of AdamW (also Lion's beta2).", range=(0, 1, True, False)
    )
    adam_epsilon: float = opt(1e-8, "AdamW's epsilon.", range=(0, None, False, None))
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 turns it off).", range=(0, None, True, None))
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass: less memory, ~30% slower."
    )
    log_every: int = opt(10, "Log the training loss every N steps.", range=(1, None, True, None))
    eval_every: int | None = opt(
        None, "Evaluate every N steps (default: at the end of each epoch when there is validation data).",
        range=(1, None, True, None),
    )
    save_every: int | None = opt(
        None, "Save a resumable checkpoint every N steps (default: at the end of each epoch).",
        range=(1, None, True, None),
    )
    early_stopping_patience: int | None = opt(
        None,
        "Stop when the eval loss has not improved for this many evaluations in a row (HF's "
        "EarlyStoppingCallback). Needs validation data; evaluations follow train.eval_every.",
        range=(1, None, True, None),
    )
    early_stopping_threshold: float = opt(
        0.0, "How much the eval loss must fall to count as an improvement (early stopping).",
        range=(0, None, True, None),
    )
    keep_best: bool = opt(
        False,
        "Save the adapter of the evaluation with the lowest eval loss, not the last step's: a "
        "checkpoint is saved at every evaluation and the best one is kept. Needs validation data.",
    )
    save_total_limit: int = opt(2, "Checkpoints to keep (oldest are removed).", range=(1, None, True, None))
    max_nonfinite_steps: int = opt(
        3, "Stop after this many consecutive steps with NaN/inf loss.", range=(1, None, True, None)
    )
    seed: int = opt(42, "Random seed for initialisation, data order and dropout.", range=(0, 2**32 - 1, True, True))
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(
        list, "Experiment trackers to log to (never on by default).", factory=True
    )
    neftune_noise_alpha: float | None = opt(
        None,
        "NEFTune: uniform noise of this scale (alpha / sqrt(tokens x hidden)) added to the input "
        "embeddings in training steps only, never in evaluation (the HF Trainer's; the paper uses 5).",
        range=(0, None, False, None),
    )


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int | None = opt(
        None,
        "Examples per device per batch when evaluating during training (no gradients are kept, so "
        "it can be larger than train.batch_size). null: train.batch_size.",
        range=(1, None, True, None),
    )
    max_rows: int | None = opt(
        None,
        "Evaluate during training on the first N validation rows only (a quick eval every "
        "train.eval_every steps on a large validation set). null: every row.",
        range=(1, None, True, None),
    )


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "The LoRA adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "The training loop."})
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "Evaluation on the validation data during training."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Run directory. Default: runs/<recipe file name without .yaml>."},
    )


def section_classes() -> dict[str, type]:
    """Section name -> its dataclass (model, lora, data, train)."""
    hints = typing.get_type_hints(Recipe)
    return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


UnionType = type(int | None)  # what `X | None` is at run time


def entry_class(hint: Any) -> type | None:
    """The dataclass X of a `... | list[X]` hint (data.train's DataSource), else None."""
    for arg in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else (hint,):
        if typing.get_origin(arg) is list:
            (item,) = typing.get_args(arg)
            if dataclasses.is_dataclass(item):
                return item
    return None


def describe_type(hint: Any) -> str:
    """A type hint as a user reads it: "one of 'none', '8bit'", "an integer or null"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {describe_type(item)}"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "a mapping {" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))
