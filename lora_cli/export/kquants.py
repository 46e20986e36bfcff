"""K-quants through llama.cpp's own `llama-quantize`: its k-quant and mixed-precision choices per
tensor (q4_k_m keeps some layers at q6_k) are llama.cpp's to make, so we hand it our f16 file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lora_cli.errors import ExportCheckFailed, ExportError

BINARY = "llama-quantize"


def require_llama_quantize(quant: str) -> str:
    """The binary's path, or exit 2 before any work."""
    found = shutil.which(BINARY)
    if found is None:
        raise ExportError(
            f"--quant {quant} is a k-quant, written by llama.cpp's `{BINARY}`, which is not on PATH",
            f"Build llama.cpp (its build/bin holds {BINARY}) and put it on PATH, or use --quant q8_0, q5_1, "
            "q4_1 or q4_0, which lora writes itself.",
        )
    return found


def quantize_with_llama_cpp(binary: str, source: Path, target: Path, quant: str) -> None:
    try:
        done = subprocess.run([binary, str(source), str(target), quant.upper()], capture_output=True, text=True,
                              timeout=24 * 3600)
    except OSError as e:
        raise ExportCheckFailed(f"{binary} could not be started: {e}; nothing was saved",
                                f"Check that {BINARY} is an executable llama.cpp build.") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ExportCheckFailed(f"{BINARY} failed (exit {done.returncode}); nothing was saved:\n{tail}",
                                f"Run `{BINARY} --help` to check the build.")
