"""Is the process training a run still alive? run.json records its pid, the pid's start time
(a reused pid is another process) and the host; a "running" run whose process is gone was
interrupted (killed, crashed, machine rebooted).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from lora_cli.run.record import RunRecord


def process_identity() -> dict:
    """run.json's record of the process training a run: pid, its start time (where the system
    tells it: a reused pid is another process) and host; run_process_alive reads it back."""
    pid = os.getpid()
    return {"pid": pid, "pid_started": pid_start_time(pid), "host": socket.gethostname()}


def launcher_identity() -> dict | None:
    """Under torchrun (`accelerate launch`, `lora train --num-processes`): the agent that started
    this process (its parent), as host, pid and start time; None outside torchrun. The agent lives
    for the whole launch, across the restarts it makes (--max_restarts)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = os.getppid()
    return {"host": socket.gethostname(), "pid": agent, "pid_started": pid_start_time(agent)}


def started_by_this_launcher(record: RunRecord) -> bool:
    """Whether the run in `record` was started by the torchrun agent that started this process."""
    mine = launcher_identity()
    return mine is not None and record.launcher is not None and all(
        record.launcher.get(key) == value for key, value in mine.items()
    )


def pid_start_time(pid: int) -> int | None:
    """When process `pid` started (Linux: field 22 of /proc/PID/stat, in clock ticks since boot);
    None where the system does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        # "PID (comm) state ...": comm may hold spaces and parentheses; fields after the last ")"
        # start at field 3, so field 22 is the 20th of them.
        return int(stat[stat.rindex(")") + 1:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, started: Any = None) -> bool:
    """Whether process `pid` exists and, where its start time `started` was recorded and the
    system tells it, is the same process (a pid is reused by an unrelated process after exit)."""
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except (OSError, OverflowError):
        return False
    if isinstance(started, int) and not isinstance(started, bool):
        now = pid_start_time(pid)
        if now is not None and now != started:
            return False
    return True


def run_process_alive(record: RunRecord) -> bool | None:
    """For a run.json whose status is "running": is the process training it alive? False when
    it is gone (killed, crashed, machine rebooted: an interrupted run), None when we cannot tell
    (no pid recorded, or another machine's process on a shared disk)."""
    if record.pid is None:
        return None
    if record.host not in (None, socket.gethostname()):
        return None
    if record.pid == os.getpid():
        return True
    return pid_alive(record.pid, record.pid_started)

