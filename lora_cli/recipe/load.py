"""Reading a recipe: safe YAML with every key's line, dotted overrides, and validation that
collects every problem before raising one `RecipeError`, each naming the key, its YAML line and
what is allowed (with a did-you-mean for unknown keys).

Standard library and PyYAML only, so a bad recipe is reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_cli.errors import RecipeError
from lora_cli.recipe.schema import Recipe, UnionType, describe_type, entry_class, section_classes


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        hint = "Check the path; shipped recipes are in configs/." if not path.exists() else None
        what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
        raise RecipeError(source, [f"the recipe file {what}"], hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(source, [f"not UTF-8 text (byte {e.start})"], "Save the recipe as UTF-8.") from None
    raw, lines = parse_yaml(text, source)
    raw = apply_overrides(raw, overrides, source)
    for item in overrides:  # a bad override is not on the file's line that it replaced
        key, sep, _ = item.partition("=")
        if sep and key.strip():
            lines[tuple(key.strip().split("."))] = "override"
    recipe = recipe_from_dict(raw, source, lines)
    if recipe.output_dir is None:
        recipe = dataclasses.replace(recipe, output_dir=str(Path("runs") / path.stem))
    return recipe


def parse_yaml(text: str, source: str) -> tuple[dict, dict[tuple, int]]:
    """Safe-load YAML and map every key path to its 1-based line, for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise RecipeError(
            source,
            [f"line {line}: {e.problem} (YAML tags that build Python objects are not allowed)"],
            "A recipe is plain data: remove the !!tag.",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            source, [f"malformed YAML: {where}{problem}"], "Fix the YAML syntax at that spot."
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            source,
            ["the recipe must be a mapping of sections (model:, lora:, data:, train:)"],
            "Start from a commented recipe in configs/; each section is `name:` followed by indented keys.",
        )
    lines: dict[tuple, int] = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: Any, prefix: tuple, lines: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode) and prefix:  # list items: ("data", "train[1]", "weight")
        for i, item in enumerate(node.value):
            key = (*prefix[:-1], f"{prefix[-1]}[{i}]")
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, key, lines)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML (so `8` is an int)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems = []
    for item in overrides:
        key, sep, value_text = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}' is not of the form key.path=value (e.g. train.lr=1e-4)")
            continue
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError:
            value = value_text
        parts = key.strip().split(".")
        target = raw
        for part in parts[:-1]:
            existing = target.get(part)
            if existing is None:
                existing = target[part] = {}
            if not isinstance(existing, dict):
                problems.append(f"override '{item}': '{part}' is not a section")
                break
            target = existing
        else:
            target[parts[-1]] = value
    if problems:
        raise RecipeError(source, problems, "Write overrides as section.key=value, e.g. train.lr=1e-4 lora.r=8.")
    return raw


def recipe_from_dict(raw: dict, source: str = "recipe", lines: dict[tuple, int] | None = None) -> Recipe:
    """Validate a plain dict against the schema; every problem is collected and raised at once."""
    lines = lines or {}
    problems: list[str] = []
    sections = section_classes()
    top_hints = typing.get_type_hints(Recipe)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_hints:
            problems.append(_unknown_key((str(key),), list(top_hints), lines))
        elif key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{_where((key,), lines)}'{key}' must be a section (a mapping of keys)")
                continue
            values[key] = _build_section(sections[key], value, (key,), lines, problems)
        else:
            checked = _check_value(value, top_hints[key], (key,), lines, problems)
            values[key] = checked
    recipe = None
    if not problems:
        recipe = Recipe(**values)
        problems.extend(_cross_checks(recipe, lines))
    if problems:
        raise RecipeError(source, problems, "See `lora train --help` and the commented recipes in configs/.")
    return recipe


def _build_section(cls: type, raw: dict, path: tuple, lines: dict, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        key_path = (*path, str(key))
        if key not in fields:
            problems.append(_unknown_key(key_path, list(fields), lines))
            continue
        before = len(problems)
        entry_cls = entry_class(hints[key])
        if entry_cls is not None and isinstance(value, list) and any(isinstance(v, dict) for v in value):
            checked = _build_entries(entry_cls, value, key_path, lines, problems)
        else:
            checked = _check_value(value, hints[key], key_path, lines, problems)
        if len(problems) == before:
            _check_range(checked, fields[key].metadata.get("range"), key_path, lines, problems)
            values[key] = checked
    missing = [f.name for f in fields.values() if f.name not in values and _required(f)]
    for name in missing:
        problems.append(f"{_where(path, lines)}'{'.'.join((*path, name))}' is missing")
    return None if missing else cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _build_entries(cls: type, items: list, path: tuple, lines: dict, problems: list[str]) -> list | None:
    """A list of mappings (a plain string stands for {path: string}), each checked like a section;
    their keys are named `data.train[1].weight`."""
    entries = []
    for i, item in enumerate(items):
        item_path = (*path[:-1], f"{path[-1]}[{i}]")
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            problems.append(f"{_where(item_path, lines)}'{'.'.join(item_path)}' must be a file path or "
                            f"{describe_type(cls)}, got {item!r}")
            continue
        entries.append(_build_section(cls, item, item_path, lines, problems))
    return entries


def _unknown_key(path: tuple, known: list[str], lines: dict) -> str:
    name = path[-1]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    section = ".".join(path[:-1]) or "the top level"
    suggestion = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return f"{_where(path, lines)}unknown key '{'.'.join(path)}' in {section}: {suggestion}"


def _where(path: tuple, lines: dict) -> str:
    line = lines.get(path)
    if line == "override":
        return "command line: "
    return f"line {line}: " if line else ""


_INVALID = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return value converted to the type hint, or _INVALID."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, UnionType):
        for arg in typing.get_args(hint):
            result = _coerce(value, arg)
            if result is not _INVALID:
                return result
        return _INVALID
    if origin is Literal:
        return value if value in typing.get_args(hint) and not isinstance(value, bool) else _INVALID
    if origin is list:
        if not isinstance(value, list):
            return _INVALID
        (item_hint,) = typing.get_args(hint)
        items = [_coerce(v, item_hint) for v in value]
        return _INVALID if any(i is _INVALID for i in items) else items
    if hint is type(None):
        return None if value is None else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _INVALID
        return _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    return _INVALID


def _check_value(value: Any, hint: Any, path: tuple, lines: dict, problems: list[str]) -> Any:
    result = _coerce(value, hint)
    if isinstance(result, float) and not math.isfinite(result):  # nan compares false with every bound
        problems.append(f"{_where(path, lines)}'{'.'.join(path)}' must be a finite number, got {value!r}")
        return None
    if result is _INVALID:
        problems.append(
            f"{_where(path, lines)}'{'.'.join(path)}' must be {describe_type(hint)}, got {value!r}"
        )
        return None
    return result


def _check_range(value: Any, bounds: tuple | None, path: tuple, lines: dict, problems: list[str]) -> None:
    if bounds is None or value is None:
        return
    low, high, low_incl, high_incl = bounds
    too_low = low is not None and (value < low if low_incl else value <= low)
    too_high = high is not None and (value > high if high_incl else value >= high)
    if too_low or too_high:
        lo = "" if low is None else f"{'≥' if low_incl else '>'} {low}"
        hi = "" if high is None else f"{'≤' if high_incl else '<'} {high}"
        allowed = " and ".join(part for part in (lo, hi) if part)
        problems.append(f"{_where(path, lines)}'{'.'.join(path)}' must be {allowed}, got {value!r}")


def _cross_checks(recipe: Recipe, lines: dict) -> list[str]:
    """Checks that involve more than one key."""
    problems = []
    m, d = recipe.model, recipe.data
    if m.quantization != "4bit" and m.quant_type != "nf4":
        problems.append(
            f"{_where(('model', 'quant_type'), lines)}model.quant_type={m.quant_type} needs "
            "model.quantization: 4bit"
        )
    if d.validation is not None and d.val_split > 0:
        problems.append(
            f"{_where(('data', 'val_split'), lines)}data.validation and data.val_split are both set: "
            "use one (a validation file, or a fraction of the training rows)"
        )
    if isinstance(recipe.lora.target_modules, list) and not recipe.lora.target_modules:
        problems.append(f"{_where(('lora', 'target_modules'), lines)}'lora.target_modules' is an empty list")
    if isinstance(d.train, list) and not d.train:
        problems.append(f"{_where(('data', 'train'), lines)}'data.train' is an empty list")
    problems.extend(_method_checks(recipe, lines))
    return problems + _lora_init_checks(recipe, lines) + _mix_checks(d, lines) + _early_stopping_checks(recipe, lines)


def _lora_init_checks(recipe: Recipe, lines: dict) -> list[str]:
    """lora.init against the base's quantization: what PEFT's initializations can act on."""
    init, m = recipe.lora.init, recipe.model
    where = _where(("lora", "init"), lines)
    if init == "loftq" and (m.quantization != "4bit" or m.quant_type != "nf4"):
        # LoftQ cancels the 4-bit quantization error: without a 4-bit NF4 base there is none.
        return [f"{where}lora.init=loftq needs model.quantization: 4bit with model.quant_type: nf4 "
                "(LoftQ starts the adapter at the NF4 quantization error of each weight)"]
    if init == "loftq" and recipe.lora.use_dora:
        # DoRA's magnitudes are measured from the weights before LoftQ sets the adapter.
        return [f"{where}lora.init=loftq cannot be combined with lora.use_dora"]
    if init in ("pissa", "olora") and m.quantization != "none":
        # They subtract the adapter's start from the base weights: a quantized base would be
        # re-quantized, and the adapter could no longer be converted to fit the original base.
        return [f"{where}lora.init={init} needs a full-precision base (model.quantization: none); "
                "for a 4-bit base use lora.init: loftq"]
    return []


def _mix_checks(d, lines: dict) -> list[str]:
    """data.train entries: weights on every entry or on none; data.mix_stopping only for a mix."""
    # (in a list that holds a mapping, every item is an entry: _build_entries)
    entries = d.train if isinstance(d.train, list) and not all(isinstance(e, str) for e in d.train) else []
    weighted = [i for i, e in enumerate(entries) if e.weight is not None]
    if weighted and len(weighted) < len(d.train):
        i = next(i for i in range(len(d.train)) if i not in weighted)
        return [
            f"{_where(('data', f'train[{i}]'), lines)}'data.train[{i}]' has no weight, and "
            f"'data.train[{weighted[0]}]' has one: give every entry a weight (a weighted mix) or "
            "none (every row of each source, once)"
        ]
    if not weighted and d.mix_stopping != "first_exhausted":
        return [f"{_where(('data', 'mix_stopping'), lines)}data.mix_stopping applies to a weighted mix: "
                "data.train as a list of {path, weight} entries"]
    return []


def _early_stopping_checks(recipe: Recipe, lines: dict) -> list[str]:
    """Early stopping and keep_best judge by the eval loss: validation data, and (keep_best) a
    checkpoint at every evaluation."""
    t, d = recipe.train, recipe.data
    problems = []
    has_validation = d.validation is not None or d.val_split > 0
    for key, value in (("early_stopping_patience", t.early_stopping_patience), ("keep_best", t.keep_best)):
        if value and not has_validation:
            problems.append(
                f"{_where(('train', key), lines)}train.{key} needs validation data, to judge by the eval "
                "loss: set data.validation (a file) or data.val_split (e.g. 0.1)"
            )
    if t.early_stopping_threshold > 0 and t.early_stopping_patience is None:
        problems.append(f"{_where(('train', 'early_stopping_threshold'), lines)}train.early_stopping_threshold "
                        "needs train.early_stopping_patience (the evaluations to wait)")
    if t.keep_best and t.save_every is not None and t.save_every != t.eval_every:
        problems.append(
            f"{_where(('train', 'save_every'), lines)}train.keep_best saves a checkpoint at every evaluation: "
            f"leave train.save_every unset or equal to train.eval_every ({t.eval_every or 'unset: every epoch'})"
        )
    return problems


def _method_checks(recipe: Recipe, lines: dict) -> list[str]:
    """train.method against the data settings: preference pairs for dpo/orpo, and only for them."""
    method, d = recipe.train.method, recipe.data
    where = _where(("train", "method"), lines) or _where(("data", "format"), lines)
    if method == "sft" and d.format == "preference":
        return [f"{_where(('data', 'format'), lines)}data.format: preference needs train.method: dpo or orpo "
                "(supervised training learns from answers, not from chosen/rejected pairs)"]
    if method == "sft":
        return []
    problems = []
    if d.format not in ("auto", "preference"):
        problems.append(
            f"{where}train.method: {method} trains on preference pairs, but data.format is {d.format}: "
            "use data.format: preference (or auto) with {prompt, chosen, rejected} rows"
        )
    if d.packing:
        problems.append(
            f"{_where(('data', 'packing'), lines)}data.packing does not apply to train.method: {method} "
            "(each pair is scored as its own chosen and rejected rows): set data.packing: false"
        )
    if isinstance(d.train, list) and not all(isinstance(e, str) for e in d.train):
        # (data/mixing.py draws supervised examples; pairs would need their own draw, not written yet)
        problems.append(
            f"{_where(('data', 'train'), lines)}data.train entries ({{path, weight}}: a weighted mix) are for "
            f"train.method: sft; for {method}, give data.train as one file or a list of files"
        )
    return problems
