"""Which checkpoints of a run are complete: the only ones a resume may start from.

The HF Trainer finds checkpoints by globbing `checkpoint-*`; a kill (or a full disk) mid-save would
leave a half-written one that looks like the newest. `lora` stages each save under
`.tmp-checkpoint-N` (a name that glob never matches) and renames it into place
(training/checkpoints.py); what is named checkpoint-N here must also hold every file a resume needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.run.paths import RunPaths

STAGING_PREFIX = ".tmp-checkpoint-"

# What the Trainer needs to resume exactly; trainer_state.json is written last.
REQUIRED_FILES = ("trainer_state.json", "scheduler.pt")

# The weights and the optimizer state, each in one of the layouts the engines write: the adapter
# and optimizer.pt (one process, DDP); under FSDP a sharded torch.distributed.checkpoint folder
# (SHARDED_STATE_DICT: complete once its .metadata is written) or one .bin (FULL_STATE_DICT).
ADAPTER_FILES = ("adapter_model.safetensors", "model.safetensors", "pytorch_model_fsdp_0/.metadata",
                 "pytorch_model_fsdp.bin")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer_0/.metadata", "optimizer.bin")


def checkpoint_step(path: Path) -> int | None:
    step = path.name.removeprefix("checkpoint-")
    return int(step) if path.name.startswith("checkpoint-") and step.isdigit() else None


def incomplete_reason(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete."""
    missing = [name for name in REQUIRED_FILES if not (ckpt / name).is_file()]
    for one_of in (ADAPTER_FILES, OPTIMIZER_FILES):
        if not any((ckpt / name).is_file() for name in one_of):
            missing.append(one_of[0])
    if missing:
        return "missing " + ", ".join(missing)
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    return None


def complete_checkpoints(folder: Path, *, say=None) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `folder`, oldest first; `say` hears of the rest."""
    if not folder.is_dir():
        return []
    out = []
    for path in folder.iterdir():
        if path.name.startswith(STAGING_PREFIX) and say:
            say(f"resume: skipping incomplete checkpoint {path} (a save that did not finish)")
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        reason = incomplete_reason(path)
        if reason is None:
            out.append((step, path))
        elif say:
            say(f"resume: skipping incomplete checkpoint {path} ({reason})")
    return sorted(out)


def latest_checkpoint(paths: RunPaths) -> Path | None:
    """The newest complete checkpoint; says which incomplete ones it skips."""
    complete = complete_checkpoints(paths.checkpoints, say=print)
    return complete[-1][1] if complete else None
