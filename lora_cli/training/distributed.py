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

import hashlib
import os
import re
import socket
from datetime import timedelta
from pathlib import Path

from lora_cli import ranks
from lora_cli.console import first_line
from lora_cli.errors import LoraError, ModelError, PeerFailed, RunDirError, TrainingError
from lora_cli.run.paths import RunPaths
from lora_cli.run.record import our_record, update_record
from lora_cli.training import peers

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
    if name == "fsdp" and not cuda and ranks.fsdp_version() != 2:
        # FSDP1 on CPU: accelerate refuses sync_module_states ("not supported on cpu"), and without
        # it FSDP1 stops at "Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0".
        raise ModelError(
            "FSDP on CPU needs fsdp_version: 2 (FSDP1 runs on CUDA GPUs only)",
            "Use configs/accelerate/fsdp.yaml (FSDP2), or set fsdp_config.fsdp_version: 2 in your accelerate config.",
        )


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
    if not torch.distributed.is_initialized():
        if ranks.restart_count() > 0:
            _join_restarted_group()
        PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)  # (joins the group, unless done above)
    peers.register()  # so that a survivor can name the process that failed


def _join_restarted_group() -> None:
    """Form the process group of a restarted launch (torchrun --max_restarts) under keys of its own.

    torchrun's agent keeps one key-value store for the whole launch, and the processes it restarts
    read the addresses the killed ones left there: gloo then retries a dead port (c10d rendezvous)
    or waits forever (static rendezvous). Prefixing the keys with the restart count gives each
    attempt a clean namespace (pytorch/pytorch#135712; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is the
    agent-side cure for c10d only).
    """
    import torch.distributed
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://", timeout=PROCESS_GROUP_TIMEOUT))
    torch.distributed.init_process_group(
        store=torch.distributed.PrefixStore(f"lora/restart-{ranks.restart_count()}", store),
        rank=rank,
        world_size=world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
    )


def use_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on CPU processes (gloo), as `accelerate launch` asked.

    accelerate 1.16 turns FSDP on only for GPU-like devices (AcceleratorState picks FSDP only when
    the distributed type is MULTI_GPU, MULTI_XPU, ...): on CPU the Trainer would quietly train with
    DDP while the launch said FSDP. torch's FSDP2 (fully_shard) itself runs on CPU with gloo, so we
    mark the CPU group as a multi-device one just before the Trainer builds its Accelerator; the
    device stays the CPU. Called after TrainingArguments is built (it resets accelerate's state).
    Tested: tests/test_multinode.py trains with configs/accelerate/fsdp.yaml on CPU.
    """
    if ranks.engine() != "fsdp" or not _group_ready():
        return
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        return
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU and state.device.type == "cpu":
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


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


# --------------------------------------------------------------------------- one run directory, many nodes


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_shared_run_dir(paths: RunPaths, checkpoint: Path | None) -> None:
    """Every rank must see the run directory rank 0 opened and, on a resume, the very checkpoint it
    resumes from. A collective call: every rank makes it, right after main_first opened the run.

    Nodes that each write to a disk of their own (output_dir not on shared storage): rank 0 alone
    writes the run directory and the adapter, on node 0; the other nodes keep only their own part
    of each checkpoint (their RNG state, FSDP shards), which rank 0's copy lacks. Such a run trains
    and is saved, with a note; a resume is refused, because a rank would read a checkpoint that is
    not there or another node's stale copy of it (compared by the bytes of trainer_state.json).
    """
    if not _group_ready():
        return
    import torch.distributed

    def view() -> tuple:
        record = our_record(paths)
        return (record.created_at_unix if record else None,
                _digest(checkpoint / "trainer_state.json") if checkpoint else None)

    box = [view() if ranks.is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    expected, mine = box[0], view()
    seen: list = [None] * torch.distributed.get_world_size()
    here = (ranks.rank(), peers.node_rank(), socket.gethostname(), mine[0] == expected[0], mine[1] == expected[1])
    torch.distributed.all_gather_object(seen, here)
    blind = [f"rank {r} (node {n}, host {h})" for r, n, h, run_ok, _ in seen if not run_ok]
    stale = [f"rank {r} (node {n}, host {h})" for r, n, h, _, ckpt_ok in seen if not ckpt_ok]
    if stale:
        if not ranks.is_main():
            raise PeerFailed(2)
        update_record(paths, status="interrupted")  # nothing was trained: the run stays resumable
        raise RunDirError(
            f"cannot resume {paths.root} from {checkpoint.name} on every node: {', '.join(stale)} "
            "does not see that checkpoint (it is missing there, or another copy of it is)",
            "Put output_dir on storage every node shares (NFS, a cluster filesystem) and resume from there, "
            "or copy the whole run directory from node 0 to the same path on every node first.",
        )
    if blind and ranks.is_main():
        print(
            f"note: output_dir {paths.root} is not on storage shared with {', '.join(blind)}: node 0 writes the "
            "run and the adapter; the checkpoints lack the other nodes' parts, so --resume will be refused. "
            "Put output_dir on shared storage to make the run resumable."
        )


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
    lost = peers.gone()
    if lost:
        return TrainingError(
            f"lost contact with {peers.describe(lost)}: it is no longer running ({said})",
            "Its launcher's output (or the machine's) says why it stopped. Continue with the same launch "
            "command and --resume: training goes on from the last complete checkpoint.",
        )
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
