"""Writing a recipe back out: the resolved YAML a run keeps (recipe.yaml), and the marked dump
`lora train` and `lora validate` print, each value marked with where it came from (the recipe
file, a command-line override, or the default).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from lora_cli.recipe.load import parse_yaml
from lora_cli.recipe.schema import Recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    train = out["data"]["train"]
    if isinstance(train, list):  # data.train entries: only the keys that are set ({path, weight})
        out["data"]["train"] = [{k: v for k, v in e.items() if v is not None} if isinstance(e, dict) else e
                                for e in train]
    return out


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default filled in, loadable by `load_recipe`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- where values came from


def recipe_origins(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """`section.key` -> "recipe" (set in the YAML file) or "override" (set on the command line),
    for every key the user set; keys absent from the result are defaults.

    A separate reading of the file, so `load_recipe` and `Recipe` stay as they are. Call it after
    `load_recipe` succeeded (the file is then known to be valid).
    """
    raw, _ = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    origins = {key: "recipe" for key in _flatten_keys(raw)}
    for item in overrides:
        key, sep, _ = item.partition("=")
        if sep and key.strip():
            origins[key.strip()] = "override"
    return origins


def _flatten_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict) and not prefix:  # a section: its keys are what the user set
            keys += _flatten_keys(value, f"{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def dump_recipe_marked(recipe: Recipe, origins: dict[str, str] | None = None) -> list[str]:
    """The resolved recipe as YAML lines, each value marked with where it came from.

    With `origins` (from `recipe_origins`): `# recipe`, `# override` or `# default`. Without:
    values that differ from the schema default are marked `# set`, the others `# default`.
    """
    defaults = recipe_to_dict(Recipe())
    values = recipe_to_dict(recipe)
    out = []
    for section, content in values.items():
        if not isinstance(content, dict):
            out.append(_marked_line(section, content, "", origins, defaults.get(section), section))
            continue
        out.append(f"{section}:")
        for key, value in content.items():
            dotted = f"{section}.{key}"
            out.append(_marked_line(key, value, "  ", origins, defaults[section].get(key), dotted))
    return out


def marked_recipe_lines(recipe: Recipe, recipe_path: str | Path | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """What `lora validate` and `lora train` print: `dump_recipe_marked` with the origins read
    from `recipe_path` and `overrides` (without a path: `# set` / `# default`)."""
    origins = recipe_origins(recipe_path, overrides) if recipe_path else None
    return dump_recipe_marked(recipe, origins)


def _marked_line(key: str, value: Any, indent: str, origins: dict | None, default: Any, dotted: str) -> str:
    text = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000, allow_unicode=True)
    text = text.strip()[1:-1]  # "{key: value}" -> "key: value"
    if origins is not None:
        mark = origins.get(dotted, "default")
        if dotted == "output_dir" and mark == "default":
            mark = "default (runs/<recipe name>)"
    else:
        mark = "default" if value == default else "set"
    return f"{indent + text:<48} # {mark}"
