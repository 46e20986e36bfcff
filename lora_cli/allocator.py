"""Use tcmalloc for the heavy commands when it is installed: the biggest single speed-up on CPU.

Measured by `make bench` (scripts/bench/allocator.py) on one of our 2-core machines, SmolLM2-135M,
LoRA r16, fp32: tcmalloc 1.12x the tokens/s of glibc malloc at 0.79x the peak RSS (138 vs 124
tokens/s, 2.26 vs 2.85 GB; runs vary by about ±10%). mimalloc from PyPI was slower than glibc
in a trial here. PyTorch's own CPU launcher preloads tcmalloc/jemalloc the same way.

An allocator has to be in place before the process starts, so the CLI re-executes itself once
with LD_PRELOAD set. LORA_ALLOCATOR=system turns this off.
"""

from __future__ import annotations

import os
import sys

# Where Debian/Ubuntu (libtcmalloc-minimal4), Fedora (gperftools-libs) and Arch put it.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
]
INSTALL_HINT = "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools-libs (Fedora)"


def find_tcmalloc() -> str | None:
    return next((path for path in CANDIDATES if os.path.exists(path)), None)


def active_allocator() -> str:
    """'tcmalloc' when this process runs with it preloaded, else 'system'."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def reexec_with_tcmalloc(argv: list[str] | None = None) -> None:
    """Replace this process by itself with tcmalloc preloaded, if available and not yet done.
    `argv`: what follows the interpreter (default: `-m lora_cli` and this command's arguments)."""
    if os.environ.get("LORA_ALLOCATOR", "tcmalloc") == "system" or active_allocator() == "tcmalloc":
        return
    if sys.platform != "linux":
        return
    library = find_tcmalloc()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    # Mark it so a failing preload can never loop.
    env["LORA_ALLOCATOR"] = "system"
    env["LORA_ALLOCATOR_ACTIVE"] = library
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *(argv or ["-m", "lora_cli", *sys.argv[1:]])], env)
