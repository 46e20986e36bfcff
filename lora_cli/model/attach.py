"""A fresh LoRA adapter attached to a base for training: only the adapter is trainable, its
dropout (and input cast) folded into lora_A so no copy of the input is stored (model/lean_dropout.py).
"""

from __future__ import annotations

from peft import prepare_model_for_kbit_training

from lora_cli.model.adapters import check_modules_to_save, with_lora
from lora_cli.model.lean_dropout import fold_lora_dropout
from lora_cli.model.lora_init import apply_loftq
from lora_cli.recipe.schema import LoraSection


def attach_lora(model, lora: LoraSection, *, quantized: bool, gradient_checkpointing: bool, weights_dir=None):
    """Wrap the base in a PeftModel with a fresh adapter; only the adapter is trainable.
    lora.init: loftq reads the original weights from `weights_dir` (model/lora_init.py)."""
    # With a KV cache the packed examples can attend to each other: measured with transformers
    # 5.23 and sdpa, packed losses were off by up to 2.5 with use_cache=True (docs/performance.md).
    model.config.use_cache = False
    check_modules_to_save(model, lora.modules_to_save)
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    peft_model = with_lora(model, lora)
    if lora.init == "loftq":
        apply_loftq(peft_model, weights_dir)
    fold_lora_dropout(peft_model)  # same training, a third less activation memory (lean_dropout.py)
    return peft_model
