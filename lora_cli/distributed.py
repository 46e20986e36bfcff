"""Many processes: `accelerate launch` (torchrun underneath) runs one copy of `lora train` per rank.

The engines are accelerate's (DDP, FSDP, DeepSpeed ZeRO), driven by the HF Trainer; this module
only answers the questions our own code has to ask around them:
  - who am I (rank, world size, local rank; read from the launcher's environment),
  - which engine is in charge (ddp | fsdp | deepspeed) and does it support this quantization,
  - let the main process go first (create/validate the run directory) while the others wait,
    and make every rank fail together when it fails,
  - do all ranks agree to stop (one rank got Ctrl-C),
  - `lora train --num-processes N`: re-launch ourselves through accelerate.

Only the main process (rank 0) prints, writes run.json/metrics.jsonl/recipe.yaml and saves the
adapter. torch is imported inside functions: `lora --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from datetime import timedelta

from lora_cli.errors import LoraError, ModelError

# Long enough for rank 0 to load a large model or build a big dataset while the others wait at a
# barrier; the same default the Trainer uses (TrainingArguments.ddp_timeout).
PROCESS_GROUP_TIMEOUT = timedelta(seconds=1800)


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


def shards_parameters() -> bool:
    """FSDP and ZeRO-3 split the weights across ranks: a full state dict needs every rank."""
    return engine() == "fsdp" or (engine() == "deepspeed" and deepspeed_zero_stage() == 3)


# --------------------------------------------------------------------------- what is supported

SUPPORT_HINT = (
    "Use DDP (configs/accelerate/ddp.yaml) with quantization, or model.quantization: none with "
    "FSDP / DeepSpeed. See the README section 'Many GPUs'."
)


def check_engine_supports(quantization: str, *, cuda: bool) -> None:
    """Refuse engine + quantization combinations that fail (or silently misbehave) later.

    Supported: anything on DDP; 4-bit with FSDP (CUDA; 4-bit weights stored in the compute dtype
    so FSDP can shard them, see model.quantization_config); 4-bit with DeepSpeed ZeRO-2/3 (CUDA).
    Refused: 8-bit with FSDP or DeepSpeed (bitsandbytes' int8 weights cannot be sharded; PEFT
    documents known issues), FSDP/DeepSpeed with a quantized base on CPU (bitsandbytes' sharded
    path is CUDA-only), DeepSpeed without CUDA.
    """
    name = engine()
    if name in {"single", "ddp"}:
        return
    label = "FSDP" if name == "fsdp" else f"DeepSpeed ZeRO-{deepspeed_zero_stage() or '?'}"
    if name == "deepspeed" and not cuda:
        raise ModelError(f"{label} needs CUDA GPUs; none were found", "On CPU, launch plain DDP: lora train RECIPE --num-processes N.")
    if quantization == "8bit":
        raise ModelError(f"model.quantization: 8bit is not supported with {label}", SUPPORT_HINT)
    if quantization == "4bit" and not cuda:
        raise ModelError(f"model.quantization: 4bit with {label} needs CUDA GPUs (none were found)", SUPPORT_HINT)


def quantized_device_map(*, cuda: bool):
    """Where a quantized base goes: each DDP rank loads its own copy onto its own GPU.

    Under FSDP / ZeRO-3 the engine places (and shards) the weights itself, so from_pretrained must
    not pin them to a device. On CPU there is nothing to choose.
    """
    if not cuda or shards_parameters():
        return None
    return {"": local_rank() if is_distributed() else _current_cuda_device()}


def _current_cuda_device() -> int:
    import torch

    return torch.cuda.current_device()


# --------------------------------------------------------------------------- the process group


def init() -> None:
    """Join the process group early (before the Trainer would), so rank 0 can go first.

    Uses accelerate's PartialState, the same state the Trainer uses later, so the Trainer finds
    the group ready. On CPU accelerate needs ACCELERATE_USE_CPU to pick gloo (its `--multi_gpu`
    launcher does not set it), so we set it when there is no GPU.
    """
    if not is_distributed():
        return
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif engine() != "deepspeed":
        torch.cuda.set_device(local_rank())
    import torch.distributed

    if torch.distributed.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def _group_ready() -> bool:
    if not is_distributed():
        return False
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _group_ready():
        import torch.distributed

        torch.distributed.barrier()


class PeerFailed(LoraError):
    """Another rank (the main one) failed and reported it; this rank stops without repeating it."""

    silent = True

    def __init__(self, exit_code: int):
        super().__init__("another process of this run failed (its message is above)")
        self.exit_code = exit_code


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
    if is_main():
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
    from lora_cli.errors import TrainingError

    # e.g. "[/.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:41699: Connection reset
    # by peer. This is typically caused by ..." -> "Read error [127.0.0.1]:41699: Connection reset by peer"
    first_line = str(error).strip().splitlines()[0]
    first_line = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0][:200]
    return TrainingError(
        f"lost contact with another process of this run ({first_line})",
        "Another rank stopped first: its error (or the launcher's report of it) says why.",
    )


def agree_max(value: int) -> int:
    """The largest of every rank's value, on every rank (e.g. "which signal did any rank get").

    A collective call: every rank must make it at the same point (the Trainer's callbacks do).
    """
    if not _group_ready():
        return value
    import torch
    import torch.distributed

    on_gpu = "nccl" in str(torch.distributed.get_backend())
    t = torch.tensor([int(value)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def error_prefix() -> str:
    """Messages from ranks other than 0 say which rank they come from."""
    return f"[rank {rank()}] " if is_distributed() and not is_main() else ""


def describe_global_batch(batch_size: int, grad_accum: int) -> str:
    n = world_size()
    return (
        f"global batch: {batch_size * grad_accum * n} examples per optimizer step "
        f"(batch_size {batch_size} × grad_accum {grad_accum} × {n} process{'es' if n != 1 else ''}; engine {engine()})"
    )


def gather_full_state_dict(trainer):
    """The adapter's full state dict where the engine shards it (FSDP, ZeRO-3), else None.

    A collective call: every rank must make it. The Trainer's own save_model does the same.
    """
    if not shards_parameters():
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


# --------------------------------------------------------------------------- re-launching


def relaunch_command(num_processes: int, argv: list[str], *, cuda: bool) -> list[str]:
    """`lora train ... --num-processes N` as an `accelerate launch` command line (run by launcher_main).

    On CPU accelerate's `--cpu` flag starts a single process (its multi-CPU path needs MPI), so
    we use its torchrun launcher (`--multi_gpu`) there too: init() picks gloo when there is no GPU.
    """
    launch = ["--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        launch += ["--multi_gpu", "--main_process_port", "0"]  # 0: a free port, so runs never collide
    elif not cuda:
        launch += ["--cpu"]
    shim = "from lora_cli.distributed import launcher_main; launcher_main()"
    return [sys.executable, "-c", shim, *launch, "-m", "lora_cli", *argv]


def strip_num_processes(argv: list[str]) -> list[str]:
    """argv without --num-processes N / --num-processes=N."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        out.append(arg)
    return out


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def launcher_main() -> None:
    """`accelerate launch` with its arguments in sys.argv, ending in one line instead of a traceback.

    When a rank fails, torchrun stops the others and accelerate raises ChildFailedError; we name
    the rank that failed first (its own message is above) and exit with its exit code.
    """
    from accelerate.commands.launch import main
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        main()
    except SignalException as e:
        # Ctrl-C / SIGTERM: torchrun passed it on to the ranks and waited for them (each saved a
        # checkpoint and said so); nothing to add.
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        failed_rank, failure = e.get_first_failure()
        code = _exit_code(int(failure.exitcode))
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        print(f"error: rank {failed_rank} {how}; the other processes were stopped"
              + (" (its message is above)" if failure.exitcode > 0 else ""), file=sys.stderr, flush=True)
        sys.exit(code if code != 0 else 1)
    except KeyboardInterrupt:
        sys.exit(130)


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run `lora <argv>` under accelerate with N processes; returns the exit code to use."""
    import subprocess

    if num_processes < 1:
        raise LoraError(
            f"--num-processes must be at least 1 (got {num_processes})",
            "Use --num-processes 2 (or more) to train with several processes.",
        )
    if is_distributed():
        raise LoraError(
            "--num-processes cannot be used inside a distributed launch",
            "Drop --num-processes: the launcher already started the processes.",
        )
    import torch

    cmd = relaunch_command(num_processes, strip_num_processes(argv), cuda=torch.cuda.is_available())
    env = dict(os.environ)
    # N processes share the cores: without this each would start one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    print(f"launching {num_processes} process{'es' if num_processes != 1 else ''} with accelerate: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    # The launcher runs in a session of its own: it hears only what we pass on, once. Ctrl-C and
    # SIGTERM (`kill PID`, a job scheduler) go to it as they are; it passes them on to the ranks,
    # which save a checkpoint and exit 130 / 143. SIGHUP (the terminal closed) becomes SIGTERM:
    # the ranks stop the same way instead of dying without a checkpoint.
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    forward = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def pass_on(signum, frame):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, forward[signum])

    previous = {}
    try:
        for sig in forward:
            with contextlib.suppress(ValueError):  # not the main thread: no handler can be set
                previous[sig] = signal.signal(sig, pass_on)
        while True:
            try:
                return _exit_code(proc.wait())
            except KeyboardInterrupt:  # a handler of ours was not installed in time
                pass_on(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
