"""docs/recipes.md, rendered from the schema's own help texts: the reference cannot drift from
what `lora` accepts (tests/test_docs.py fails when the committed page differs from this).

    python -m lora_cli.recipe.reference > docs/recipes.md
"""

from __future__ import annotations

import dataclasses
import json
import typing

from lora_cli.recipe.schema import Recipe, describe_type, entry_class, section_classes

HEADER = """# Recipe keys

Every key a recipe (`lora train RECIPE`) may set, section by section, with its type, default and
meaning. Unknown keys are errors (with a did-you-mean), and so are values of the wrong type or
outside the range given. Any key can be overridden on the command line as `section.key=value`
(`lora train r.yaml train.lr=1e-4 lora.r=8`); `lora validate RECIPE` prints the resolved recipe
with each value marked `# recipe`, `# override` or `# default`. The commented recipes in
[configs/](../configs/) show the keys in use.

This page is generated from the schema (`lora_cli/recipe/schema.py`):
`python -m lora_cli.recipe.reference > docs/recipes.md`.
"""


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        value = f.default
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"  # as YAML writes it


def _allowed(hint, bounds: tuple | None) -> str:
    text = describe_type(hint)
    if bounds:
        low, high, low_incl, high_incl = bounds
        parts = [f"{'≥' if low_incl else '>'} {low}" if low is not None else "",
                 f"{'≤' if high_incl else '<'} {high}" if high is not None else ""]
        text += ", " + " and ".join(p for p in parts if p)
    return text


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    lines = [HEADER]
    top_hints = typing.get_type_hints(Recipe)
    top_fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for section, cls in section_classes().items():
        lines += [f"## `{section}:` {top_fields[section].metadata['help']}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"| `{section}.{f.name}` | {_escape(_allowed(hints[f.name], f.metadata.get('range')))} | "
                         f"{_escape(_default(f))} | {_escape(f.metadata['help'])} |")
        lines.append("")
        for f in dataclasses.fields(cls):  # a list of mappings (data.train's entries): their keys
            entry = entry_class(hints[f.name])
            if entry is not None:
                lines += _entry_table(f"{section}.{f.name}", entry)
    others = [name for name in top_fields if name not in section_classes()]
    lines += ["## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name in others:
        f = top_fields[name]
        lines.append(
            f"| `{name}` | {_escape(describe_type(top_hints[name]))} | {_default(f)} | {_escape(f.metadata['help'])} |"
        )
    return "\n".join(lines) + "\n"


def _entry_table(key: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"### `{key}` entries", "", f"{cls.__doc__.strip()} Its keys (a plain string in the list stands for "
             "`{path: ...}`):", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        lines.append(f"| `{f.name}` | {_escape(_allowed(hints[f.name], f.metadata.get('range')))} | "
                     f"{_escape(_default(f))} | {_escape(f.metadata['help'])} |")
    return [*lines, ""]


if __name__ == "__main__":
    print(reference_markdown(), end="")
