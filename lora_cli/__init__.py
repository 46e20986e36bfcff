"""lora: fine-tune causal language models with LoRA and QLoRA from YAML recipes."""

__version__ = "0.1.0"
