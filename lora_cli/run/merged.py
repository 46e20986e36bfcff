"""Which directories `lora merge` wrote: a merged model carries a marker listing its files, so
that `--overwrite` (of a merge or of a run) replaces only a merge's own output: never a base model,
a hub snapshot or a directory a user filled.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

# Written into every merged model: what `lora merge` wrote there, so that --overwrite replaces
# only its own output (never a base model, a hub snapshot or a directory a user filled).
MARKER = "lora_merge.json"

# Merged models written before the marker existed carry this line of their model card
# (artifacts/model_card.py merged_model_card).
CARD_MARK = "The LoRA adapter of the run `"


# What `save_pretrained` of a merged model and its tokenizer, plus this module, write: in a merge
# made before the marker existed, anything else is a user's and must not be deleted.
MERGE_FILES = frozenset({
    "README.md", MARKER, "config.json", "generation_config.json", "model.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
})

SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def files_merge_did_not_write(directory: Path) -> list[str] | None:
    """Names in `directory` that an earlier merge did not write; None if no merge wrote it."""
    try:
        files = json.loads((directory / MARKER).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
            raise TypeError
        written = set(files)
    except (OSError, ValueError, KeyError, TypeError):
        written = None
    entries = list(directory.iterdir())
    if written is None:  # an older merge (no marker, or a damaged one): recognised by its model card
        try:
            card = (directory / "README.md").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if CARD_MARK not in card or not (directory / "config.json").is_file():
            return None
        # Which files it wrote is not known: only what a merge writes may go, never a subdirectory.
        return sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                      if p.is_dir() or not (p.name in MERGE_FILES or SHARD.fullmatch(p.name)))
    return sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                  if p.is_dir() or (p.name not in written and p.name != MARKER))



ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_digest(adapter_dir: Path) -> str | None:
    """SHA-256 of the adapter's weights: a merged model records the adapter it was made from."""
    try:
        with open(adapter_dir / ADAPTER_WEIGHTS, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def why_not_current(merged_dir: Path, adapter_dir: Path) -> str | None:
    """None when `merged_dir` is a complete merge of exactly this adapter (its marker records the
    adapter's digest); otherwise why it cannot stand for the adapter (for the message)."""
    if not (merged_dir / "config.json").is_file():
        return "it holds no model"
    try:
        marker = json.loads((merged_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {MARKER}"
    recorded = marker.get("adapter_sha256") if isinstance(marker, dict) else None
    if recorded is None:
        return "it does not record which adapter it was made from (merged by an older lora)"
    if recorded != adapter_digest(adapter_dir):
        return "the adapter changed since it was merged"
    return None
