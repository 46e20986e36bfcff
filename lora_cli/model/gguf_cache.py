"""GGUF models, converted once: transformers dequantizes a GGUF file on every load (~20 s for
135M parameters), so the first use writes a float32 safetensors copy to the cache and every later
load reads that (well under a second).

The copy is keyed by the file's content, not its path: the built-in model's GGUF lives inside a
wheel, so every virtualenv (every fresh clone, every CI run) has its own copy of the same file,
and a path key gave each of them its own 0.5 GB converted model. Hashing a multi-GB GGUF takes
seconds, so the digest of each (path, size, mtime) is remembered in a small index beside the copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from lora_cli.errors import ModelError
from lora_cli.fsutil import atomic_directory, atomic_write_text, cannot_write_in

# Bump when the converted copy's layout changes, so older copies are not mistaken for new ones.
CONVERSION_FORMAT = "1"


def cache_root() -> Path:
    """Where converted models are kept: $LORA_CACHE_DIR, else $XDG_CACHE_HOME/lora, else ~/.cache/lora."""
    if os.environ.get("LORA_CACHE_DIR"):
        return Path(os.environ["LORA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora"


def converted_gguf_dir(gguf: Path) -> Path:
    """Where `convert_gguf` keeps (or will keep) the safetensors copy of `gguf`: named after the
    file for people looking in the cache, found by content (a copy under another name too)."""
    key = content_digest(gguf)[:16]
    existing = [d for d in (cache_root() / "gguf").glob(f"*-{key}") if (d / "config.json").is_file()]
    return existing[0] if existing else cache_root() / "gguf" / f"{gguf.stem}-{key}"


def content_digest(gguf: Path) -> str:
    """SHA-256 of the file's bytes (and the conversion format), remembered per path, size and mtime."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    seen = f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}"
    index_path = cache_root() / "gguf" / "digests.json"
    index = _read_index(index_path)
    if not (isinstance(index.get(seen), str) and re.fullmatch(r"[0-9a-f]{64}", index[seen])):
        with open(gguf, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        digest.update(f":format{CONVERSION_FORMAT}".encode())
        index[seen] = digest.hexdigest()
        _write_index(index_path, index)
    return index[seen]


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: it only saves time, so start afresh
        return {}
    return index if isinstance(index, dict) else {}


def _write_index(path: Path, index: dict[str, str]) -> None:
    """Atomically; where the cache cannot be written, the digest is simply computed again next time."""
    try:
        atomic_write_text(path, json.dumps(index, indent=1))
    except OSError:
        pass


def _check_writable(directory: Path) -> None:
    """Before a conversion of tens of seconds, not after it."""
    problem = cannot_write_in(directory)
    if problem is not None:
        raise ModelError(f"cannot write the converted model to the cache {directory}: {problem.strerror or problem}",
                         "Set LORA_CACHE_DIR to a writable directory.") from None


def quiet_gguf_progress_bar() -> None:
    """transformers' GGUF loader draws a per-tensor bar with plain tqdm, which its own switch
    (disable_progress_bar) does not reach, and TQDM_DISABLE is read only when tqdm is imported."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from tqdm.auto import tqdm

    gguf_loading.tqdm = functools.partial(tqdm, disable=True)


def convert_gguf(gguf: Path) -> Path:
    """The safetensors model directory for `gguf`, converted on first use."""
    target = converted_gguf_dir(gguf)
    if (target / "config.json").is_file():
        return target

    # (imported here: resolving a model source must stay instant when the copy exists)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_writable(target.parent)
    print(f"converting {gguf.name} to safetensors (once, ~30 s; cached in {target})", flush=True)
    quiet_gguf_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"loading {gguf.name} needs the gguf package: {e}", "pip install gguf") from None
    except Exception as e:  # a corrupt file or an architecture transformers cannot read from GGUF
        raise ModelError(f"could not read GGUF file {gguf}: {e}", "Check that it is a GGUF model file.") from None
    # The weights are now plain float32 tensors; drop the GGUF marker that makes
    # save_pretrained refuse ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
