"""The `lora` command line: thin commands that parse arguments and call one function each.

Heavy libraries (torch, transformers, peft) are imported inside the commands, never here, so
`lora --help` answers at once. Every LoraError becomes a short message + hint and its exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli import __version__
from lora_cli.errors import EXIT_INTERRUPTED, LoraError

app = typer.Typer(
    name="lora",
    help="Fine-tune causal language models with LoRA and QLoRA from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def report_error(error: LoraError) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    console.print(f"[bold red]error:[/] {error.message}", markup=True, soft_wrap=True)
    if error.hint:
        console.print(f"[bold]hint:[/] {error.hint}", soft_wrap=True)


def _version(value: bool):
    if value:
        print(f"lora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
):
    """Fine-tune causal language models with LoRA and QLoRA from YAML recipes."""


RecipeArg = Annotated[Path, typer.Argument(help="The YAML recipe (see configs/ for commented examples).", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4 lora.r=8.", show_default=False),
]
RunArg = Annotated[Optional[Path], typer.Argument(help="Run directory (default: the latest under ./runs).", show_default=False)]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run in output_dir and start again.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and report on the data; do not train.")] = False,
):
    """Train a LoRA (or QLoRA) adapter as the recipe says; writes runs/<name>/.

    RECIPE may also be a run directory with --resume (its saved recipe.yaml is used).
    """
    from lora_cli.config import load_recipe

    recipe_file = recipe
    if resume and recipe.is_dir():
        recipe_file = recipe / "recipe.yaml"
    loaded = load_recipe(recipe_file, overrides or [])
    if recipe_file != recipe:  # resuming a run directory: its output_dir is that directory
        import dataclasses

        loaded = dataclasses.replace(loaded, output_dir=str(recipe))
    if dry_run:
        from lora_cli.validate import run_validate

        run_validate(loaded)
        return
    from lora_cli.train import run_training

    run_training(loaded, recipe_path=str(recipe_file), resume=resume, overwrite=overwrite)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None):
    """Check a recipe and report on its data (tokenizer only, no model weights, no training)."""
    from lora_cli.config import load_recipe
    from lora_cli.validate import run_validate

    run_validate(load_recipe(recipe, overrides or []))


def main() -> None:
    """Entry point: run the app, turning our errors into messages and exit codes."""
    try:
        app(standalone_mode=False)
    except LoraError as error:
        report_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # click usage errors come here in standalone_mode=False
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
