"""Many processes: `accelerate launch` (torchrun underneath) runs one copy of `lora train` per rank.

The engines are accelerate's (DDP, FSDP, DeepSpeed ZeRO), driven by the HF Trainer; this module
only answers the questions our own code has to ask around them (who am I: lora_cli/ranks.py):
  - does the engine support this quantization,
  - let the main process go first (create/validate the run directory) while the others wait,
    and make every rank fail together when it fails,
  - do all ranks agree to stop (one rank got Ctrl-C),
  - gather a sharded adapter to save it.
`lora train --num-processes N` re-launches itself through accelerate: training/launch.py.

Only the main process (rank 0) prints, writes run.json/metrics.jsonl/recipe.yaml and saves the
adapter.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

from lora_cli import ranks
from lora_cli.console import first_line
from lora_cli.errors import LoraError, ModelError, PeerFailed, TrainingError

# Long enough for rank 0 to load a large model or build a big dataset while the others wait at a
# barrier; the same default the Trainer uses (TrainingArguments.ddp_timeout).
PROCESS_GROUP_TIMEOUT = timedelta(seconds=1800)


# --------------------------------------------------------------------------- what is supported

SUPPORT_HINT = (
    "Use DDP (configs/accelerate/ddp.yaml) with quantization, or model.quantization: none with "
    "FSDP / DeepSpeed. See the README section 'Many GPUs'."
)


def check_engine_supports(quantization: str, *, cuda: bool) -> None:
    """Refuse engine + quantization combinations that fail (or silently misbehave) later.

    Supported: anything on DDP; 4-bit with FSDP (CUDA; 4-bit weights stored in the compute dtype
    so FSDP can shard them, see model/loading.py quantization_config); 4-bit with DeepSpeed ZeRO-2/3 (CUDA).
    Refused: 8-bit with FSDP or DeepSpeed (bitsandbytes' int8 weights cannot be sharded; PEFT
    documents known issues), FSDP/DeepSpeed with a quantized base on CPU (bitsandbytes' sharded
    path is CUDA-only), DeepSpeed without CUDA.
    """
    name = ranks.engine()
    if name in {"single", "ddp"}:
        return
    label = "FSDP" if name == "fsdp" else f"DeepSpeed ZeRO-{ranks.deepspeed_zero_stage() or '?'}"
    if name == "deepspeed" and not cuda:
        raise ModelError(
            f"{label} needs CUDA GPUs; none were found",
            "On CPU, launch plain DDP: lora train RECIPE --num-processes N.",
        )
    if quantization == "8bit":
        raise ModelError(f"model.quantization: 8bit is not supported with {label}", SUPPORT_HINT)
    if quantization == "4bit" and not cuda:
        raise ModelError(f"model.quantization: 4bit with {label} needs CUDA GPUs (none were found)", SUPPORT_HINT)


# --------------------------------------------------------------------------- the process group


def init() -> None:
    """Join the process group early (before the Trainer would), so rank 0 can go first.

    Uses accelerate's PartialState, the same state the Trainer uses later, so the Trainer finds
    the group ready. On CPU accelerate needs ACCELERATE_USE_CPU to pick gloo (its `--multi_gpu`
    launcher does not set it), so we set it when there is no GPU.
    """
    if not ranks.is_distributed():
        return
    import torch.distributed
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif ranks.engine() != "deepspeed":
        torch.cuda.set_device(ranks.local_rank())
    if torch.distributed.is_initialized():
        return
    PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def _group_ready() -> bool:
    if not ranks.is_distributed():
        return False
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _group_ready():
        import torch.distributed

        torch.distributed.barrier()


def main_first(fn):
    """Run fn() on the main process only and hand its result to every rank.

    If fn raises on the main process, the other ranks raise PeerFailed with the same exit code
    instead of waiting at a barrier forever; the main process raises the original error.
    """
    if not _group_ready():
        return fn()
    import torch.distributed

    box = [None]
    error = None
    if ranks.is_main():
        try:
            box[0] = ("ok", fn())
        except LoraError as e:
            error = e
            box[0] = ("failed", e.exit_code)
        except BaseException as e:
            error = e
            box[0] = ("failed", 1)
    # Pickled between our own ranks only (never read from disk).
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise PeerFailed(value)
    return value


# What gloo / NCCL say when the process at the other end of a collective is gone.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "nccl", "gloo", "timed out")


def peer_lost(error: BaseException) -> LoraError | None:
    """A short error for "another rank died mid-collective" (None for anything else).

    The rank that failed first reports its own error; this one only says why it stopped.
    """
    if not _group_ready() or isinstance(error, LoraError) or not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    if not any(marker in text for marker in _PEER_GONE):
        return None
    # e.g. "[/.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:41699: Connection reset
    # by peer. This is typically caused by ..." -> "Read error [127.0.0.1]:41699: Connection reset by peer"
    said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0][:200]
    return TrainingError(
        f"lost contact with another process of this run ({said})",
        "Another rank stopped first: its error (or the launcher's report of it) says why.",
    )


def agree_max(value: int) -> int:
    """The largest of every rank's value, on every rank (e.g. "which signal did any rank get").

    A collective call: every rank must make it at the same point (the Trainer's callbacks do).
    """
    if not _group_ready():
        return value
    import torch.distributed

    on_gpu = "nccl" in str(torch.distributed.get_backend())
    t = torch.tensor([int(value)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def describe_global_batch(batch_size: int, grad_accum: int) -> str:
    n = ranks.world_size()
    return (
        f"global batch: {batch_size * grad_accum * n} examples per optimizer step "
        f"(batch_size {batch_size} × grad_accum {grad_accum} × {n} process{'es' if n != 1 else ''}; "
        f"engine {ranks.engine()})"
    )


def gather_full_state_dict(trainer):
    """The adapter's full state dict where the engine shards it (FSDP, ZeRO-3), else None.

    A collective call: every rank must make it. The Trainer's own save_model does the same.
    """
    if not ranks.shards_parameters():
        return None
    return trainer.accelerator.get_state_dict(trainer.model)
