"""Who this process is in a distributed launch, read from the launcher's environment.

`accelerate launch` (torchrun underneath) starts one copy of `lora train` per rank and tells each
its place through environment variables; which engine is in charge (DDP, FSDP, DeepSpeed) comes
from accelerate's. Standard library only: the model loader, the run directory and the error
printer all ask these questions, and none of them should need torch to do it.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def restart_count() -> int:
    """How often torchrun's agent has restarted this launch's processes (--max_restarts): 0 at first."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in {"1", "true", "yes"}


def engine() -> str:
    """single | ddp | fsdp | deepspeed: what `accelerate launch` set up for this process."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if is_distributed() else "single"


def deepspeed_zero_stage() -> int | None:
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage and stage.isdigit() else None


def fsdp_version() -> int:
    """1 or 2: the FSDP generation `accelerate launch` asked for (its FSDP_VERSION; 1 if unset)."""
    return _env_int("FSDP_VERSION", 1)


def shards_parameters() -> bool:
    """FSDP and ZeRO-3 split the weights across ranks: a full state dict needs every rank."""
    return engine() == "fsdp" or (engine() == "deepspeed" and deepspeed_zero_stage() == 3)


def rank_prefix() -> str:
    """Messages from ranks other than 0 say which rank they come from."""
    return f"[rank {rank()}] " if is_distributed() and not is_main() else ""
