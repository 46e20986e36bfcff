"""`lora train --num-processes N`: the same command re-launched under `accelerate launch`, with
signals passed on and a failed rank named in one line instead of a traceback.

On CPU accelerate's `--cpu` flag starts a single process (its multi-CPU path needs MPI), so we use
its torchrun launcher (`--multi_gpu`) there too: training/distributed.py init() picks gloo when
there is no GPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from lora_cli import ranks
from lora_cli.errors import LoraError


def relaunch_command(num_processes: int, argv: list[str], *, cuda: bool) -> list[str]:
    """`lora train ... --num-processes N` as an `accelerate launch` command line (run by launcher_main)."""
    launch = [
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        launch += ["--multi_gpu", "--main_process_port", "0"]  # 0: a free port, so runs never collide
    elif not cuda:
        launch += ["--cpu"]
    shim = "from lora_cli.training.launch import launcher_main; launcher_main()"
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
        how = (
            f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        )
        print(
            f"error: rank {failed_rank} {how}; the other processes were stopped"
            + (" (its message is above)" if failure.exitcode > 0 else ""),
            file=sys.stderr,
            flush=True,
        )
        sys.exit(code if code != 0 else 1)
    except KeyboardInterrupt:
        sys.exit(130)


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run `lora <argv>` under accelerate with N processes; returns the exit code to use."""
    if num_processes < 1:
        raise LoraError(
            f"--num-processes must be at least 1 (got {num_processes})",
            "Use --num-processes 2 (or more) to train with several processes.",
        )
    if ranks.is_distributed():
        raise LoraError(
            "--num-processes cannot be used inside a distributed launch",
            "Drop --num-processes: the launcher already started the processes.",
        )
    import torch  # (here: a bad --num-processes is said without loading it)

    cmd = relaunch_command(num_processes, strip_num_processes(argv), cuda=torch.cuda.is_available())
    env = dict(os.environ)
    # N processes share the cores: without this each would start one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    print(
        f"launching {num_processes} process{'es' if num_processes != 1 else ''} with accelerate: {' '.join(cmd[3:])}",
        file=sys.stderr,
        flush=True,
    )
    # The launcher runs in a session of its own: it hears only what we pass on, once. Ctrl-C and
    # SIGTERM (`kill PID`, a job scheduler) go to it as they are; it passes them on to the ranks,
    # which save a checkpoint and exit 130 / 143. SIGHUP (the terminal closed) becomes SIGTERM:
    # the ranks stop the same way instead of dying without a checkpoint.
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
