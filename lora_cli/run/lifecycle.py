"""Opening a run directory for `lora train`, and never losing what is in one.

A non-empty directory is never reused silently: --resume continues a run, --overwrite replaces
one. Only a run of ours is ever deleted: never one still training, never the current directory,
never one holding the recipe, data or model this run reads, nor anything `lora` did not write.
A fresh directory is claimed in one step (run.json appears whole, already "running").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lora_cli.errors import RunDirError
from lora_cli.fsutil import atomic_write_json
from lora_cli.run.checkpoints import STAGING_PREFIX, checkpoint_step
from lora_cli.run.merged import MARKER, files_merge_did_not_write
from lora_cli.run.paths import ADAPTER_SAVE_FILES, RUN_ENTRIES, RunPaths, exported_by_lora
from lora_cli.run.processes import process_identity, run_process_alive
from lora_cli.run.record import RunRecord, our_record


def prepare_run_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, keep=()) -> RunPaths:
    """Check the output directory against --resume / --overwrite and create it.

    A non-empty directory is never reused silently: --resume continues it, --overwrite replaces it.
    Only a run of ours is ever deleted, never one still training, never the current directory, and
    never one holding a file in `keep` (the recipe, data and model this run reads) or anything else
    `lora` did not write. A run that stopped before its first step holds nothing and is started again.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite cannot be used together", "Pick one.")
    # `~/x` as a shell means it (the Trainer expands it too: without this the checkpoints would go
    # to $HOME/x and everything else to a literal ./~/x).
    paths = RunPaths(Path(output_dir).expanduser())
    _refuse_a_file(paths.root)
    exists = paths.root.is_dir() and any(paths.root.iterdir())
    if resume:
        if not exists:
            raise RunDirError(
                f"nothing to resume: {paths.root} does not exist or is empty",
                "Drop --resume to start the run.",
            )
        if our_record(paths) is None:  # e.g. the user's project folder: never trained into
            raise RunDirError(
                f"cannot resume {paths.root}: it is not a lora run directory (no run.json written by `lora train`)",
                "Name a run directory that `lora train` made (e.g. runs/NAME), or drop --resume and "
                "set output_dir to a new directory (e.g. output_dir=runs/NAME) to start a run.",
            )
        _refuse_if_training(paths, "resume")
        return paths
    if exists:
        _refuse_if_training(paths, "replace")
        empty_handed = _stopped_before_first_step(paths)
        if not overwrite and not empty_handed:
            if our_record(paths) is None:
                raise RunDirError(
                    f"output_dir {paths.root} already exists and is not a lora run directory "
                    "(no run.json written by `lora train`)",
                    "Set output_dir to a new directory (e.g. output_dir=runs/NAME).",
                )
            raise RunDirError(
                f"the run directory {paths.root} already exists",
                "Use --resume to continue it, --overwrite to replace it, "
                "or set output_dir (e.g. output_dir=runs/other) for a new run.",
            )
        _check_deletable(paths, keep)
        if empty_handed and not overwrite:
            status = (our_record(paths) or RunRecord()).status or "unknown"
            print(
                f"{paths.root}: the earlier run stopped before its first step (status {status}, nothing saved); "
                "starting again"
            )
        try:
            shutil.rmtree(paths.root)
        except OSError as e:
            raise RunDirError(
                f"cannot delete {paths.root}: {e.strerror or e}", "Check its permissions, or choose another output_dir."
            ) from None
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot create output_dir {paths.root}: {e.strerror or e}", "Choose another output_dir."
        ) from None
    _claim(paths)
    return paths


def _claim(paths: RunPaths) -> None:
    """Claim a fresh run directory in one step: run.json appears whole, already "running" with
    this process's pid, or not at all. Two `lora train` started together on one output_dir: the
    second finds the first's live claim and stops; it never takes it for a dead run."""
    data = RunRecord(status="running", **process_identity(), created_at_unix=time.time()).to_json()
    tmp = None
    try:
        # Written beside the directory, not in it: another `lora train` looking in now sees an
        # empty directory or the whole claim, never a stray file.
        fd, tmp = tempfile.mkstemp(prefix=f".{paths.root.name}.run.json.", suffix=".tmp", dir=paths.root.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, paths.run_json)  # fails if run.json exists: the claim is atomic
    except FileExistsError:
        other = our_record(paths) or RunRecord()
        raise RunDirError(
            f"cannot start a run in {paths.root}: another `lora train` (process {other.pid or '?'}) "
            "started there at the same moment",
            "Wait for it to finish, or set output_dir to another directory (e.g. output_dir=runs/other).",
        ) from None
    except OSError:  # an unwritable parent, no hard links here: claim it without the atomic check
        atomic_write_json(paths.run_json, data)
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _refuse_a_file(root: Path) -> None:
    """output_dir, or the nearest part of it that exists, must be a directory."""
    for part in (root, *root.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == root else f"is under {part}, which is a file"
                raise RunDirError(
                    f"output_dir {root} {where}, not a directory",
                    "Set output_dir to a directory (created if missing), e.g. output_dir=runs/NAME.",
                )
            return


def _refuse_if_training(paths: RunPaths, action: str) -> None:
    """A run whose process is still alive on this host is never resumed or replaced under it:
    both processes would write the same checkpoints, metrics and run.json. A stale "running"
    (the process is gone: killed, crashed, machine rebooted) is an interrupted run."""
    record = our_record(paths) or RunRecord()
    pid = record.pid
    if record.status != "running" or pid == os.getpid():
        return
    # None: no pid, or another machine's process (shared disk): we cannot tell whether it is alive
    if run_process_alive(record):
        raise RunDirError(
            f"cannot {action} {paths.root}: it is still training (process {pid}, run.json status running)",
            f"Wait for it to finish, or stop it first (`kill -INT {pid}` saves a checkpoint), "
            "then use --resume or --overwrite.",
        )


def _stopped_before_first_step(paths: RunPaths) -> bool:
    """A run of ours that ended before its first optimizer step (bad data or model found after
    the directory was made): run.json, recipe.yaml and empty leftovers, nothing worth keeping."""
    record = our_record(paths)
    if record is None or record.status in (None, "completed"):
        return False  # no status yet: a run just starting (another `lora train` at the same moment)
    if record.status == "running" and run_process_alive(record) is not False:
        return False  # still alive, or we cannot tell
    for entry in paths.root.iterdir():
        if entry.is_symlink():
            return False
        if entry.name in ("run.json", "recipe.yaml"):
            continue
        if not (entry.is_dir() and not any(entry.iterdir())) and not (entry.is_file() and entry.stat().st_size == 0):
            return False
    return True


def _check_deletable(paths: RunPaths, keep) -> None:
    """Raise unless deleting `paths.root` loses nothing but a run of ours."""
    root = paths.root
    if root.is_symlink():
        raise RunDirError(
            f"output_dir {root} is a symbolic link; refusing to delete through it",
            "Set output_dir to the directory itself, or choose another output_dir.",
        )
    real = root.resolve()
    if Path.cwd().resolve().is_relative_to(real):
        raise RunDirError(
            f"output_dir {root} is the current directory or holds it; refusing to delete it",
            "Set output_dir to a directory of its own, e.g. output_dir=runs/NAME.",
        )
    if our_record(paths) is None:
        raise RunDirError(
            f"output_dir {root} is not empty and is not a lora run directory (no run.json of ours); "
            "refusing to delete it",
            "Choose another output_dir, or move its contents away yourself.",
        )
    for item in keep:
        if item and Path(item).expanduser().exists() and Path(item).expanduser().resolve().is_relative_to(real):
            raise RunDirError(
                f"output_dir {root} holds {item}, which this run reads; refusing to delete it",
                f"Move {item} out of {root}, or set output_dir to another directory.",
            )
    foreign = sorted(
        e.name
        for e in root.iterdir()
        if e.name not in RUN_ENTRIES and not any(e.name.startswith(f".{name}.") for name in RUN_ENTRIES)
    )
    foreign += _foreign_inside(paths)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(
            f"output_dir {root} holds files that `lora` did not write ({listed}); refusing to delete them",
            f"Move them out of {root}, or choose another output_dir.",
        )


def _foreign_inside(paths: RunPaths) -> list[str]:
    """Files inside the run's own folders that `lora` did not write there (shown as adapter/x)."""
    foreign = []
    if paths.adapter.is_dir() and not paths.adapter.is_symlink():
        foreign += [f"adapter/{e.name}" for e in paths.adapter.iterdir() if e.name not in ADAPTER_SAVE_FILES]
    if paths.checkpoints.is_dir() and not paths.checkpoints.is_symlink():
        foreign += [
            f"checkpoints/{e.name}"
            for e in paths.checkpoints.iterdir()
            if not (e.name.startswith(STAGING_PREFIX) or (checkpoint_step(e) is not None and e.is_dir()))
        ]
    if paths.merged.is_dir() and not paths.merged.is_symlink() and any(paths.merged.iterdir()):
        unlisted = files_merge_did_not_write(paths.merged)
        if unlisted is None:  # not written by `lora merge` (no lora_merge.json)
            foreign.append(f"merged/ (no {MARKER}: not written by `lora merge`)")
        else:
            foreign += [f"merged/{name}" for name in unlisted]
    if paths.export.is_dir() and not paths.export.is_symlink():
        foreign += [f"export/{e.name}" for e in paths.export.iterdir()
                    if not (exported_by_lora(e) or e.name.startswith("."))]
    return sorted(foreign)
