"""LoRA on a base model: the recipe's LoraConfig, and a trained adapter loaded back
(model/attach.py attaches a fresh one for training).

The base weights are never modified: peft wraps them. A damaged adapter, or one trained on
another model, is a bad input reported with the adapter's path and what is wrong.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from lora_cli.console import first_line
from lora_cli.errors import ModelError, is_out_of_memory
from lora_cli.model.lora_init import peft_init
from lora_cli.recipe.schema import LoraSection


def lora_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=peft_target_modules(lora.target_modules),
        bias=lora.bias,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=peft_init(lora),  # lora.init (model/lora_init.py)
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def peft_target_modules(target: str | list[str]) -> str | list[str]:
    """PEFT reads a string as a regular expression over full module paths, so `c_attn` alone
    matches nothing; a plain name means what a user writes it for: the modules of that name.
    A string with regex characters stays a regex."""
    if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
        return [target]
    return target


def check_modules_to_save(model, names: list[str]) -> None:
    """PEFT silently ignores a `modules_to_save` name that matches no module: a misspelt
    `lm_head` would train nothing extra and nobody would notice."""
    paths = [path for path, _ in model.named_modules()]
    missing = [name for name in names if not any(p == name or p.endswith("." + name) for p in paths)]
    if missing:
        short = sorted({p.rsplit(".", 1)[-1] for p in paths if p and not any(c.isdigit() for c in p)})
        raise ModelError(f"lora.modules_to_save: {', '.join(missing)} not found in the model",
                         f"Names of this model's modules outside its layers: {', '.join(short)}")


def with_lora(model, lora: LoraSection):
    """`get_peft_model` with the recipe's LoRA, its "target modules not found" said in our words:
    which key, and the names this model has."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(lora))
    except ValueError as e:
        # e.g. "Target modules {'q_proj'} not found in the base model."
        raise ModelError(
            f"lora.target_modules: {e}",
            f"Use all-linear, or names from this model: {', '.join(sorted(linear_module_names(model)))}",
        ) from None


def linear_module_names(model) -> set[str]:
    """Short names of the model's linear layers (what target_modules lists), minus the head."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in {
            "Conv1D",
            "Linear4bit",
            "Linear8bitLt",
        }
        if is_linear and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return names


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapter(base, adapter_dir: Path, *, trainable: bool = False):
    """A trained adapter on a loaded base (the base weights are not modified).

    A damaged adapter directory or one trained on another model is a bad input: it is reported
    naming the directory and what is wrong, not as the library's traceback.
    """
    from peft import PeftModel, get_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    base_name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    # Without its weights file peft takes the directory for a hub id and fails with a Hub error.
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelError(
            f"{adapter_dir}: the adapter has no weights ({ADAPTER_WEIGHTS[0]} is missing)", _ADAPTER_DAMAGED_HINT
        )
    try:
        # peft only warns about adapter tensors the file lacks (and loads the rest): caught here.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except Exception as e:
        if is_out_of_memory(e):
            raise
        detail = first_line(e, 200)
        if isinstance(e, json.JSONDecodeError):
            message, hint = f"adapter_config.json is not valid JSON ({detail})", _ADAPTER_DAMAGED_HINT
        elif type(e).__name__ == "SafetensorError":
            message, hint = f"the adapter weights are damaged or truncated ({detail})", _ADAPTER_DAMAGED_HINT
        elif "size mismatch" in str(e) and _rank_mismatch(str(e)):
            detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)[:300]
            message = f"the adapter's weights do not have the rank its adapter_config.json gives: {detail}"
            hint = (
                "adapter_config.json (r, rank_pattern) and adapter_model.safetensors disagree: the base model is "
                "not the problem. Restore the adapter's config with its weights (both from the same run or "
                "checkpoint), or train the run again."
            )
        elif type(e).__name__ == "NoMatchingPeftModuleError" or "size mismatch" in str(e):
            if "size mismatch" in str(e):  # the first differing tensor says enough
                detail = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)[:300]
            else:  # peft lists every full module path; the short names say which architecture
                names = sorted({m.rsplit(".", 1)[-1] for m in re.findall(r"'([\w.]+)'", str(e))})
                detail = f"the layers it adapts ({', '.join(names)}) are not in that model"
            message = f"the adapter does not fit the base model {base_name}: {detail}"
            hint = "The adapter was trained on another model: check model.name in the run's recipe.yaml."
        else:
            message, hint = f"cannot load the adapter ({type(e).__name__}: {detail})", _ADAPTER_DAMAGED_HINT
        raise ModelError(f"{adapter_dir}: {message}", hint) from None
    missing = []
    for w in caught:
        text = str(w.message)
        if "missing adapter keys" in text:
            missing += re.findall(r"'([^']+)'", text.split("missing adapter keys", 1)[1])
        else:  # anything else peft or torch said is theirs to say
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if missing:
        expected = len(get_peft_model_state_dict(model))
        shown = ", ".join(_short_key(k) for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ModelError(
            f"{adapter_dir}: the adapter is incomplete: {len(missing)} of its {expected} tensors are missing "
            f"from its weights file (e.g. {shown})",
            _ADAPTER_DAMAGED_HINT,
        )
    return model


def _rank_mismatch(error: str) -> bool:
    """torch's "size mismatch for ...lora_A...: copying a param with shape [8, 64] from checkpoint,
    the shape in current model is [4, 64]" differs in the rank dimension only (dim 0 of lora_A,
    dim 1 of lora_B): the adapter's config and its weights disagree, the base model fits."""
    for line in error.splitlines():
        found = re.search(
            r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)",
            line,
        )
        if not found:
            continue
        name = found.group(1)
        saved, current = ([int(x) for x in g.split(",") if x.strip()] for g in found.group(2, 3))
        if len(saved) != 2 or len(current) != 2:
            return False
        rank_dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if rank_dim is None:
            return False
        return saved[1 - rank_dim] == current[1 - rank_dim] and saved[rank_dim] != current[rank_dim]
    return False


def _short_key(key: str) -> str:
    """base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight
    -> transformer.h.1.attn.c_attn.lora_A.weight"""
    return key.removeprefix("base_model.model.").replace(".default.", ".")


_ADAPTER_DAMAGED_HINT = (
    "Restore the adapter's files from a backup (the run's checkpoints/checkpoint-N, if any, "
    "hold the adapter as of step N), or train the run again."
)
