"""What a model's config says, read without its weights: the config itself (config.json, or a
GGUF file's metadata), its context length, and whether data.max_length fits in it.
"""

from __future__ import annotations

from pathlib import Path

from lora_cli.console import first_line
from lora_cli.errors import LoraError, ModelError, RecipeError
from lora_cli.model.gguf_cache import converted_gguf_dir
from lora_cli.model.sources import gguf_file, resolve_model_source
from lora_cli.recipe.schema import ModelConfig


def load_model_config(cfg: ModelConfig):
    """The model's config (config.json, or a GGUF file's metadata): never the weights."""
    from transformers import AutoConfig

    try:
        directory = model_dir_on_disk(cfg)
        if directory is not None:  # the config is enough: the weights need not be there
            return AutoConfig.from_pretrained(str(directory), trust_remote_code=cfg.trust_remote_code)
        gguf = gguf_file(cfg)
        if gguf is not None:  # not converted yet: its metadata, no dequantization (a few seconds)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        source = resolve_model_source(cfg)
        kwargs = {"trust_remote_code": cfg.trust_remote_code}
        if source.revision:
            kwargs["revision"] = source.revision
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except ModelError:
        raise
    except ImportError as e:
        raise ModelError(f"reading the model config needs a missing package: {e}", "pip install gguf") from None
    except Exception as e:
        raise ModelError(f"could not read the config of model {cfg.name}: {first_line(e)}",
                         "Check model.name; offline, name a local model directory or a .gguf file.") from None


def model_dir_on_disk(cfg: ModelConfig) -> Path | None:
    """The directory holding the model's config.json, where there is one already: a local model
    directory, or the converted copy of a GGUF model; None otherwise (a hub id, a GGUF file not
    converted yet)."""
    gguf = gguf_file(cfg)
    directory = converted_gguf_dir(gguf) if gguf is not None else Path(cfg.name).expanduser()
    return directory if (directory / "config.json").is_file() else None


def tokenizer_file_bytes(cfg: ModelConfig) -> int:
    """Size of the model's tokenizer.json where it is on disk already; 0 where it is not."""
    try:
        directory = model_dir_on_disk(cfg)
        return (directory / "tokenizer.json").stat().st_size if directory is not None else 0
    except (OSError, ModelError):
        return 0


def model_context(config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings / n_positions)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def check_max_length(max_length: int, config) -> str | None:
    """data.max_length against the model's context (`config`: the model's config); shared by
    `lora train` and `lora validate`.

    A model with learned absolute positions (GPT-2's n_positions, OPT, GPT-Neo: no RoPE or ALiBi in
    its config) has no embedding past its context, so a longer row crashes mid-run: a RecipeError
    (exit 2) now. A RoPE / ALiBi model computes any position but never trained past its context:
    returns the warning to show. None when max_length fits.
    """
    context = model_context(config)
    if context is None or max_length <= context:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    settings = text.to_dict()
    computed = getattr(text, "position_embedding_type", None) == "rotary" or any(
        value and any(word in key for word in ("rope", "rotary", "alibi")) for key, value in settings.items()
    )
    if computed:
        return (
            f"data.max_length {max_length} is beyond the model's context of {context} tokens "
            f"(max_position_embeddings): positions past it were never trained. Fix: data.max_length={context} or less"
        )
    name = "n_positions" if "n_positions" in settings else "max_position_embeddings"
    raise RecipeError(
        "data.max_length",
        [
            f"{max_length} is beyond the model's context of {context} tokens ({name}): the model learned one "
            f"position embedding per token up to {context}, so longer rows cannot run"
        ],
        f"Set data.max_length={context} or less (data.too_long decides what happens to longer examples).",
    )


def check_model_context(model_cfg, max_length: int) -> str | None:
    """check_max_length for the recipe's model, read from its config (never the weights). A config
    that cannot be read is left for the model load to report."""
    try:
        config = load_model_config(model_cfg)
    except LoraError:
        return None
    return check_max_length(max_length, config)
