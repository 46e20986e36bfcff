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
    modules_to_save: list[str] = opt(
        list, "Extra modules trained in full and saved with the adapter.", factory=True
    )


@dataclass(frozen=True)
class DataConfig:
    train: str | list[str] = opt(
        "data/train.jsonl",
        "Training data: a file (.jsonl .json .csv .parquet .txt), a list of files, or a hub "
        "dataset id. Relative paths are relative to the current directory.",
    )
    validation: str | list[str] | None = opt(None, "Validation data: a file or list of files.")
    val_split: float = opt(
        0.0, "Fraction of the training rows held out for validation.", range=(0, 1, True, False)
    )
    format: Literal["auto", "text", "completion", "alpaca", "chat", "preference"] = opt(
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
    weight_decay: float = opt(0.0, "AdamW weight decay.", range=(0, None, True, None))
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
    save_total_limit: int = opt(2, "Checkpoints to keep (oldest are removed).", range=(1, None, True, None))
    max_nonfinite_steps: int = opt(
        3, "Stop after this many consecutive steps with NaN/inf loss.", range=(1, None, True, None)
    )
    seed: int = opt(42, "Random seed for initialisation, data order and dropout.", range=(0, 2**32 - 1, True, True))
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(
        list, "Experiment trackers to log to (never on by default).", factory=True
    )


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "The LoRA adapter."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "The training loop."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Run directory. Default: runs/<recipe file name without .yaml>."},
    )


def section_classes() -> dict[str, type]:
    """Section name -> its dataclass (model, lora, data, train)."""
    hints = typing.get_type_hints(Recipe)
    return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


UnionType = type(int | None)  # what `X | None` is at run time


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
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))
