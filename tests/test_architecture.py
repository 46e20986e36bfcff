"""The package keeps the shape docs/architecture.md describes: imports of our own modules at the top
of each file and without cycles, the fast paths free of heavy libraries, modules small enough to
read, docs that are current and point nowhere outside the repository.

`lint-imports` (in `make test`) checks the layer order; these check what it does not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lora_cli"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _own_imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported lora_cli module, line, inside a function) for every import of our own modules."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inner) for a in child.names if a.name.startswith("lora_cli"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package this module is in
                    base = ".".join([*package.split(".")[: len(package.split(".")) - child.level + 1], base]).strip(".")
                if base.startswith("lora_cli"):
                    # `from lora_cli.data import stats` imports the module lora_cli.data.stats
                    for alias in child.names:
                        target = f"{base}.{alias.name}"
                        found.append((target if target in modules else base, child.lineno, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


# Imports of our own modules inside a function, outside cli.py: each with its measured reason.
DEFERRED = {
    # transformers' Trainer takes ~6 s to import: `lora train` opens the run directory first, so a
    # run that cannot start (it exists, a resume that does not fit) says so at once
    ("lora_cli.commands.train", "lora_cli.training.session"),
    # the memory model (torch, peft on the meta device) is `lora validate`'s last step: a wrong
    # model.name is said in 1.8 s, not 4
    ("lora_cli.commands.validate", "lora_cli.training.memory"),
}


def test_imports_of_our_own_modules_are_at_the_top_of_the_file():
    """A file's header says what it depends on; only cli.py imports the commands inside its Typer
    functions (after the recipe is read, so a bad recipe never waits for torch), and at most five
    other imports, each listed in DEFERRED with its reason, wait for the moment they are needed."""
    inside = {(name, target): f"{path.relative_to(REPO)}:{line} imports {target}"
              for name, path in _modules().items() if name != "lora_cli.cli"
              for target, line, in_function in _own_imports(path, name) if in_function}
    unlisted = [where for pair, where in inside.items() if pair not in DEFERRED]
    assert unlisted == [], "\n".join(unlisted)
    assert len(inside) <= 5


def test_no_import_cycle_between_modules():
    """Counting every import (module level or not), our modules form no cycle, at any depth."""
    modules = _modules()
    graph = {
        name: sorted({t for t, _, _ in _own_imports(path, name) if t in modules and t != name})
        for name, path in modules.items()
    }
    # A package's __init__ runs before its modules: `lora_cli.data.stats` depends on `lora_cli.data`.
    for name in modules:
        if "." in name and name.rsplit(".", 1)[0] in modules:
            graph[name].append(name.rsplit(".", 1)[0])
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongly_connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongly_connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongly_connect(v)
    assert cycles == []


FAST_PATHS = [
    "lora_cli.cli",
    "lora_cli.errors",
    "lora_cli.console",
    "lora_cli.fsutil",
    "lora_cli.recipe.load",
    "lora_cli.recipe.show",
    "lora_cli.recipe.reference",
    "lora_cli.run.lifecycle",
    "lora_cli.run.lookup",
    "lora_cli.run.recipes",
    "lora_cli.commands.runs",
    "lora_cli.data.prepare",
    "lora_cli.data.preview",
]


@pytest.mark.parametrize("module", FAST_PATHS)
def test_the_fast_paths_load_no_heavy_library(module):
    """`lora --help`, a recipe error and `lora runs` answer at once: what they import loads none
    of torch, transformers, peft, bitsandbytes, accelerate or datasets."""
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{module} loads {result.stdout.strip()}"


def test_no_module_is_over_500_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules().values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_recipe_reference_is_current():
    from lora_cli.recipe.reference import reference_markdown

    committed = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/recipes.md differs from the schema: python -m lora_cli.recipe.reference > docs/recipes.md"
    )


def test_the_readme_is_short_and_the_docs_exist():
    assert len((REPO / "README.md").read_bytes()) <= 15_000
    for page in ("architecture", "recipes", "data", "performance", "distributed", "reliability"):
        assert (REPO / "docs" / f"{page}.md").is_file(), page


def test_nothing_points_outside_the_repository():
    """Code, tests, scripts and docs cite only what the repository holds."""
    files = [
        p
        for p in REPO.rglob("*")
        if p.suffix in (".py", ".md", ".yaml", ".toml")
        and p.is_file()
        and p != Path(__file__).resolve()
        and not any(part in (".venv", "build", "runs", ".git", ".pytest_cache") for part in p.relative_to(REPO).parts)
    ]
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if "DESIGN.md" in line or "../shared" in line or "STYLE.md" in line
    ]
    assert found == []
