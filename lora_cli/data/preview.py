"""A preview of tokenized examples with what the loss sees told apart: supervised tokens plain
(bold green on a terminal), masked ones in [masked]...[/] (dim on a terminal).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from lora_cli.data.tokenize import IGNORE_INDEX


def preview_segments(example: dict, tokenizer) -> list[tuple[str, bool]]:
    """(text, supervised) runs of one example. Token t is supervised when labels[t] is not -100
    (the model predicts it); the first token never is."""
    ids, labels = example["input_ids"], example["labels"]
    runs: list[tuple[list[int], bool]] = []
    for n, (token, label) in enumerate(zip(ids, labels)):
        supervised = n > 0 and label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(tokenizer.decode(tokens, skip_special_tokens=False), sup) for tokens, sup in runs]


def preview_text(example: dict, tokenizer, *, color: bool) -> str:
    """Plain: masked runs in [masked]...[/], supervised runs as they are. Colour: rich markup,
    masked dim, supervised bold green."""
    out = []
    for text, supervised in preview_segments(example, tokenizer):
        if color:
            out.append(f"[bold green]{escape(text)}[/]" if supervised else f"[dim]{escape(text)}[/]")
        else:
            out.append(text if supervised else f"[masked]{text}[/]")
    return "".join(out)


def print_preview(examples: list[dict], where: list[str], tokenizer) -> None:
    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal
    legend = ("[bold green]trained on[/], [dim]masked (no loss)[/]" if color
              else "trained-on text plain, masked text (no loss) in [masked]...[/]")
    print(f"preview of {len(examples)} example(s): ", end="", flush=True)
    console.print(legend, markup=color)
    for example, w in zip(examples, where):
        print(f"--- {w}, {len(example['input_ids'])} tokens", flush=True)
        console.print(preview_text(example, tokenizer, color=color), markup=color)

