"""What every command prints the same way: notes on stderr, sizes and counts for people, the
first line of a library's error, and the libraries' own chatter turned off.

Standard library only at import time (the CLI must start fast); `quiet_libraries` imports the
libraries it quiets, so call it where they are about to be used anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def info(message: str) -> None:
    """A note for the user on stderr: stdout stays for results (generated text, JSON)."""
    print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (libraries append pages of advice), or its
    type's name when it has no message; cut to `limit` characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit else line


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def type_name(value: Any) -> str:
    """A JSON value's type as a user reads it in an error ("an object", "a list", "null")."""
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def quiet_libraries() -> None:
    """Our own progress and messages replace the libraries' per-tensor bars and advice."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    # Deprecation notices addressed to library integrators, and peft's note that GPT-2's Conv1D
    # layers are transposed (it handles that itself): noise for a user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    # bitsandbytes advises installing `kernels` (which downloads code from the Hub) for a CPU
    # inference kernel that lora_cli.model.loading turns off anyway.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
