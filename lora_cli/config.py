"""The recipe: its schema, YAML loading with line numbers, dotted overrides, and the resolved dump.

One dataclass per recipe section; each field carries its help text in `metadata["help"]`, which
feeds the error messages, `lora validate` and the commented recipes. Validation collects every
problem first and raises once (a `RecipeError`), each problem naming the key, its YAML line and
what is allowed.

This module imports only the standard library and PyYAML, so the CLI stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_cli.errors import RecipeError

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
    format: Literal["auto", "text", "completion", "alpaca", "chat"] = opt(
        "auto",
        "Row format. text: {text}; completion: {prompt, completion}; alpaca: {instruction, "
        "input, output}; chat: {messages: [{role, content}]}; auto: picked from the columns.",
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


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Recipe)
    return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


# --------------------------------------------------------------------------- loading


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
    sections = _section_classes()
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
        checked = _check_value(value, hints[key], key_path, lines, problems)
        if len(problems) == before:
            _check_range(checked, fields[key].metadata.get("range"), key_path, lines, problems)
            values[key] = checked
    return cls(**values)


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


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(hint))
    if origin in (typing.Union, _UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_describe(item)}"
    if hint is type(None):
        return "null"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


_UnionType = type(int | None)
_INVALID = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return value converted to the type hint, or _INVALID."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, _UnionType):
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
            f"{_where(path, lines)}'{'.'.join(path)}' must be {_describe(hint)}, got {value!r}"
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
    return problems


# --------------------------------------------------------------------------- dumping


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default filled in, loadable by `load_recipe`."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def field_help() -> dict[str, str]:
    """`section.key` -> help text, for docs and `lora validate`."""
    out = {}
    for section, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = f.metadata.get("help", "")
    return out


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
