"""The `lora` command line: each command is its options and one call, `commands.<verb>.run(...)`.

The command modules (and the heavy libraries they import: torch, transformers, peft) are imported
inside the Typer functions, after the recipe is read, so `lora --help`, a bad recipe and `lora runs`
answer at once. Every LoraError becomes a short message + hint and its exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli import __version__
from lora_cli.allocator import reexec_with_tcmalloc
from lora_cli.errors import EXIT_INTERRUPTED, LoraError
from lora_cli.ranks import is_distributed, rank_prefix

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
    from rich.markup import escape

    # Messages quote paths and library errors: a "[...]" in them is text, never rich markup.
    console = Console(stderr=True, highlight=False)
    console.print(f"{escape(rank_prefix())}[bold red]error:[/] {escape(error.message)}", markup=True, soft_wrap=True)
    if error.hint:
        console.print(f"[bold]hint:[/] {escape(error.hint)}", soft_wrap=True)


def _version(value: bool):
    if value:
        print(f"lora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
):
    """Fine-tune causal language models with LoRA and QLoRA from YAML recipes."""


RecipeArg = Annotated[
    Path, typer.Argument(help="The YAML recipe (see configs/ for commented examples).", show_default=False)
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4 lora.r=8.", show_default=False),
]
RunArg = Annotated[
    Optional[Path], typer.Argument(help="Run directory (default: the latest under ./runs).", show_default=False)
]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output_dir from its newest complete checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete an existing run in output_dir and start again.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe and report on the data; do not train.")
    ] = False,
    preview: Annotated[
        int, typer.Option("--preview", help="--dry-run: examples to show with supervised and masked tokens marked.")
    ] = 2,
    num_processes: Annotated[
        Optional[int],
        typer.Option(
            "--num-processes",
            help="Train with N processes (one per GPU; on CPU they share the cores): "
            "re-launches this command via `accelerate launch`.",
            show_default=False,
        ),
    ] = None,
):
    """Train a LoRA (or QLoRA) adapter as the recipe says; writes runs/<name>/.

    RECIPE may also be a run directory with --resume (its saved recipe.yaml is used).
    """
    from lora_cli.run.recipes import recipe_to_train

    loaded, recipe_file = recipe_to_train(recipe, overrides or [], resume=resume)
    if dry_run:
        from lora_cli.commands import validate as command

        command.run(loaded, recipe_path=str(recipe_file), overrides=overrides or [], preview=preview)
        return
    if num_processes is not None:  # the recipe is valid: now start the processes
        from lora_cli.training.launch import relaunch

        raise typer.Exit(relaunch(num_processes, sys.argv[1:]))
    from lora_cli.commands import train as command

    command.run(loaded, recipe_path=str(recipe_file), overrides=overrides or [], resume=resume, overwrite=overwrite)


@app.command()
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    preview: Annotated[
        int, typer.Option("--preview", help="Examples to show with supervised and masked tokens marked.")
    ] = 2,
):
    """Check a recipe, report on its data and estimate memory (tokenizer and config only, no weights)."""
    from lora_cli.recipe.load import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    from lora_cli.commands import validate as command

    command.run(loaded, recipe_path=str(recipe), overrides=overrides or [], preview=preview)


@app.command()
def estimate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
    num_processes: Annotated[
        Optional[int],
        typer.Option("--num-processes", help="Also give the memory of each of N processes (GPUs).",
                     show_default=False),
    ] = None,
    engine: Annotated[
        Optional[str],
        typer.Option("--engine", help="With --num-processes: ddp (whole model per process; the default), "
                     "fsdp or zero3 (model sharded across the processes).", show_default=False),
    ] = None,
):
    """Parameters, adapter size and memory to train (full vs LoRA vs QLoRA), from the model config alone."""
    from lora_cli.recipe.load import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    from lora_cli.commands import estimate as command

    command.run(loaded, as_json=json_out, num_processes=num_processes, engine=engine)


@app.command()
def runs(
    directory: Annotated[Path, typer.Option("--dir", help="Where the runs are.")] = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
):
    """List runs: name, status, base model, steps, final loss, eval change, created time."""
    from lora_cli.commands import runs as command

    command.run(directory, as_json=json_out)


@app.command()
def merge(
    run: RunArg = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="float32 | bfloat16 | float16 (default: the run's model.dtype). "
            "The fold itself is always done in float32.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", help="Where to write the merged model (default: RUN/merged).", show_default=False
        ),
    ] = None,
    onto: Annotated[
        Optional[str],
        typer.Option(
            "--onto",
            help="QLoRA runs: quantized (default) folds into the 4-bit weights as they dequantize, reproducing "
            "what was trained; original folds into the original full-precision weights.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing merged model.")] = False,
):
    """Fold the adapter into its base and save a plain transformers model (no peft needed).

    Verifies the result first: the merged model's logits must equal base + adapter on probe inputs.
    """
    from lora_cli.commands import merge as command

    command.run(run, dtype=dtype, output=output, onto=onto, overwrite=overwrite)


@app.command()
def generate(
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="The prompt; `-` reads prompts from stdin, one per line.", show_default=False),
    ] = None,
    run: Annotated[
        Optional[Path],
        typer.Option(
            "--run",
            help="Run directory whose base + adapter to use (default: the latest under ./runs).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="Any model instead of a run: a model directory (e.g. RUN/merged), hub id, .gguf file "
            "or built-in name.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Turn the run's adapter off (same loaded base).")] = False,
    chat: Annotated[
        Optional[bool],
        typer.Option(
            "--chat/--no-chat",
            help="Use the chat template (default: when the run trained on chat data).",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate per prompt.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[
        float,
        typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability."),
    ] = 0.9,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens only (0: off).")] = 0,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Random seed: makes sampling repeatable.", show_default=False)
    ] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print only the finished text, not tokens as they come.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
    file: Annotated[
        Optional[Path],
        typer.Option("--file", help="Read prompts from this file (`-`: stdin), one per line.", show_default=False),
    ] = None,
):
    """Generate text with a run's adapter (or its base with --base, or any model with --model)."""
    from lora_cli.commands import generate as command

    command.run(
        prompt,
        run=run,
        model=model,
        base=base,
        chat=chat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stream=not no_stream,
        as_json=json_out,
        file=file,
    )


@app.command(name="eval")
def eval_(
    run: RunArg = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            help="Held-out data in any format train accepts (default: the run's validation split).",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    exact_match: Annotated[
        bool,
        typer.Option(
            "--exact-match",
            help="Also compare greedy answers with the reference answers (completion/alpaca/chat data).",
        ),
    ] = False,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-new-tokens",
            help="--exact-match: most tokens per answer (default: the reference's length + 8).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 8,
):
    """Loss and perplexity of the base and the adapter on held-out data; writes RUN/eval.json."""
    from lora_cli.commands import eval as command

    command.run(
        run, data=data, as_json=json_out, exact_match=exact_match, max_new_tokens=max_new_tokens, batch_size=batch_size
    )


ServeRunsArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        help="Runs to serve as adapters on their shared base (NAME=RUN serves one under NAME), or one model "
        "directory such as RUN/merged (default: the latest run under ./runs).",
        show_default=False,
    ),
]


@app.command()
def serve(
    runs: ServeRunsArg = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="Without RUN: any model to serve (a directory, hub id, .gguf file or built-in name). "
            "With runs: must be their base.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface; mind --api-key).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="LORA_API_KEY",
            help="Require `Authorization: Bearer KEY` on /v1 requests (or set LORA_API_KEY).",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most requests decoded together.")] = 16,
    prefix_cache: Annotated[
        bool,
        typer.Option("--prefix-cache/--no-prefix-cache",
                     help="Reuse the KV of prompt starts recent requests shared (chat templates, chat history)."),
    ] = True,
):
    """Serve runs' adapters (one base in memory) behind an OpenAI-compatible API: /v1/chat/completions,
    /v1/completions, /v1/models, /health. Concurrent requests are decoded together, mixed adapters too."""
    from lora_cli.commands import serve as command

    command.run(runs, model=model, host=host, port=port, api_key=api_key, max_batch=max_batch,
                prefix_cache=prefix_cache)


@app.command()
def chat(
    runs: ServeRunsArg = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="Without RUN: any chat model (directory, hub id, .gguf, built-in name).",
                     show_default=False),
    ] = None,
    system: Annotated[
        Optional[str],
        typer.Option("--system", help="System prompt (default: the run's data.system_prompt).", show_default=False),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling probability mass.")] = 0.9,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Random seed: makes sampling repeatable.", show_default=False)
    ] = None,
):
    """Chat with a run's adapter in the terminal: multi-turn, streamed, the run's chat template.

    /reset forgets the conversation, /adapter NAME switches adapter (several runs loaded), /base answers
    with the base alone, /exit (or Ctrl-D) ends; Ctrl-C stops an answer, not the chat.
    """
    from lora_cli.commands import chat as command

    command.run(runs, model=model, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed)


@app.command()
def export(
    run: RunArg = None,
    format: Annotated[
        str, typer.Option("--format", help="gguf: one file for llama.cpp / LM Studio; ollama: DIR with "
                          "model.gguf + Modelfile.")
    ] = "gguf",
    quant: Annotated[
        Optional[str],
        typer.Option(
            "--quant",
            help="f32 | f16 | bf16 | q8_0 (default) | q5_1 | q4_1 | q4_0, or a k-quant (q4_k_m, ...: needs "
            "llama.cpp's llama-quantize on PATH). --adapter-only: f32 (default) | f16 | bf16 | q8_0.",
            show_default=False,
        ),
    ] = None,
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="Write the adapter alone as a GGUF LoRA (llama.cpp --lora).")
    ] = False,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="The .gguf file (--format ollama: the directory) to write "
                     "(default: under RUN/export/).", show_default=False),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export at --output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Export the fine-tuned model as GGUF (llama.cpp, LM Studio) or for Ollama, or the adapter as a GGUF LoRA.

    Merges first when RUN/merged is missing or stale, and checks the written file before keeping it:
    read back by transformers, it must compute what the merged model does.
    """
    from lora_cli.commands import export as command

    command.run(run, format=format, quant=quant, adapter_only=adapter_only, output=output, overwrite=overwrite,
                as_json=json_out)


# Commands that run a model: they get tcmalloc when it is installed (see allocator.py).
HEAVY_COMMANDS = {"train", "eval", "generate", "merge", "export", "serve", "chat"}


def main() -> None:
    """Run the app, turning our errors into messages and exit codes (callable in-process)."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # a command's typer.Exit(code) (click returns it here)
            sys.exit(code)
    except LoraError as error:
        if not getattr(error, "silent", False):  # e.g. a rank whose main process already reported it
            report_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        # Usage errors (bad flag, bad value) arrive here in standalone_mode=False. typer may
        # carry its own copy of click, so match on the interface rather than the class.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise


def entry() -> None:
    """The `lora` console script and `python -m lora_cli`: a real process of our own, so a model
    command may re-execute itself with tcmalloc preloaded before running (never done in-process,
    where it would replace the caller, e.g. a test runner)."""
    if len(sys.argv) > 1 and sys.argv[1] in HEAVY_COMMANDS and "--help" not in sys.argv and "-h" not in sys.argv:
        reexec_with_tcmalloc()
    if not is_distributed():
        main()
        return
    # One process of a multi-process launch ends without the interpreter's teardown. With gloo, a
    # rank of a completed run now and then aborted there ("terminate called without an active
    # exception", SIGABRT: the launcher then fails the whole run), also after destroying the
    # process group (scripts/repro_gloo_exit.py's 4-process gloo DDP launches: 1 of 10 aborted, 3
    # of 25 with the group destroyed, none of 70 ending by os._exit, 40 of them on a busy machine).
    # Its work is on disk by then (every artifact is written atomically and closed): what is left
    # is flushing the output, and keeping the exit code.
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
        if not isinstance(code, int):  # sys.exit("message"), as Python itself reports it
            print(code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
