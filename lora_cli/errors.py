"""Errors a user can act on.

Every failure we can foresee is raised as a `LoraError` carrying a short message (what went
wrong, naming the file / key / row) and a hint (what to do). The CLI prints both and exits with
the error's code; nothing else of ours should surface as a traceback. Every subclass lives here,
so the kinds of failure and their exit codes read in one place.
"""

from __future__ import annotations

import re

from lora_cli.console import first_line

# Exit codes, as promised in the README.
EXIT_OK = 0
EXIT_RUNTIME = 1  # something failed while running (non-finite loss, out of memory, ...)
EXIT_USAGE = 2  # bad command line, recipe, data or model reference
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); SIGTERM uses 143


class LoraError(Exception):
    """A failure with a message for the user and a hint on how to fix it."""

    exit_code = EXIT_USAGE
    silent = False  # True: already reported (by another rank); exit with the code, print nothing

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


# --------------------------------------------------------------------------- bad input (exit 2)


class RecipeError(LoraError):
    """The recipe (YAML, keys, types, values, overrides) is wrong.

    Holds every problem found, so the user can fix them all in one go.
    """

    def __init__(self, source: str, problems: list[str], hint: str | None = None):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in problems)
            message = f"{source}: {len(problems)} problems\n{listed}"
        super().__init__(message, hint)


class DataError(LoraError):
    """A data file or row cannot be used."""


class ModelError(LoraError):
    """The model reference cannot be resolved or loaded."""


class RunDirError(LoraError):
    """The run directory is in a state that forbids the command (exists, missing, incomplete)."""


# --------------------------------------------------------------------------- failures at run time (exit 1)


class RunTimeFailure(LoraError):
    """Something failed while running, on valid input: exit 1, not 2."""

    exit_code = EXIT_RUNTIME


class TrainingError(RunTimeFailure):
    """Training failed at run time (non-finite loss, out of memory)."""


class MergeError(RunTimeFailure):
    """The merge produced a model that does not do what the adapter did (or is not finite)."""


class ExportError(LoraError):
    """`lora export` cannot write what was asked (an architecture, quant type or tokenizer llama.cpp
    would not run as transformers does, an output it must not replace): exit 2."""


class ExportCheckFailed(RunTimeFailure):
    """The written file does not compute what the model does, or the tool it needs failed: exit 1,
    nothing left at the output."""


class NonFiniteOutput(RunTimeFailure):
    """The model's logits went NaN/inf while generating (a diverged adapter)."""


class NonFiniteLoss(RunTimeFailure):
    """An evaluation loss came out NaN/inf (a diverged adapter): nothing is written."""


class EvalWriteError(RunTimeFailure):
    """eval.json could not be written after the evaluation ran (disk full, ...)."""


class PeerFailed(LoraError):
    """Another rank (the main one) failed and reported it; this rank stops without repeating it."""

    silent = True

    def __init__(self, exit_code: int):
        super().__init__("another process of this run failed (its message is above)")
        self.exit_code = exit_code


# --------------------------------------------------------------------------- stopped (exit 130 / 143)


class Interrupted(LoraError):
    """The user (SIGINT) or the system (SIGTERM) stopped the run; progress was saved."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message, hint)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- out of memory

# How running out of memory surfaces: CUDA raises torch.OutOfMemoryError; the CPU allocator raises
# a RuntimeError with one of these phrases; Python's own allocations raise MemoryError.
_OOM_PHRASES = ("out of memory", "not enough memory", "can't allocate memory", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(p in str(error).lower() for p in _OOM_PHRASES)


def out_of_memory_error(error: BaseException) -> TrainingError:
    asked = re.search(r"tried to allocate (\d+) bytes", str(error))
    if asked:  # the CPU allocator's message starts with C++ enforce noise: keep the number
        detail = f"could not allocate {int(asked.group(1)) / 2**20:.0f} MiB more"
    else:
        detail = first_line(error, 160)
    return TrainingError(
        f"out of memory during training ({detail})",
        "Lower train.batch_size (raise train.grad_accum to keep the effective batch), lower "
        "data.max_length, set train.gradient_checkpointing: true, or use model.quantization: 4bit.",
    )
