"""Saving resumable checkpoints so that they are either complete or absent, and loading them
only as plain tensors.

The HF Trainer writes `checkpoint-N/` file by file in place: a kill (or a full disk) mid-save would
leave a half-written directory that looks like the newest checkpoint. Each save is staged under
`.tmp-checkpoint-N` (a name the Trainer's glob never matches) and renamed into place in one step;
run/checkpoints.py tells which checkpoints are complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
from pathlib import Path

from lora_cli.console import first_line
from lora_cli.errors import RunDirError, TrainingError
from lora_cli.run.checkpoints import STAGING_PREFIX, checkpoint_step, complete_checkpoints, incomplete_reason

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def check_loads_safely(ckpt: Path) -> None:
    """Every pickle-format file of a checkpoint must load as plain tensors (weights_only=True).

    The Trainer also loads them with weights_only=True; checking first lets us name the file and
    refuse before anything of the run changes. A file that needs arbitrary code (a pickle gadget)
    is never unpickled by the unsafe path.
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("*.pth")) + sorted(ckpt.glob("*.bin")):
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no second copy in RAM
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise RunDirError(
                f"refusing to resume from {ckpt}: {path.name} does not load as plain tensors "
                f"({first_line(e, 200)})",
                "Checkpoints are only loaded with torch.load(weights_only=True). Delete this "
                "checkpoint directory to resume from an older one, or start again with --overwrite.",
            ) from None


def disk_full_error(error: OSError, what: str, kept: Path | None) -> TrainingError:
    keep = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
    return TrainingError(
        f"disk full while saving {what} ({os.strerror(error.errno)}); {keep}",
        "Free disk space (or lower train.save_total_limit) and continue with `lora train --resume`.",
    )


def _remove(path: Path) -> None:
    """Rename first, then delete: a kill mid-delete leaves a staging name, never a broken checkpoint-N."""
    doomed = path.with_name(f"{STAGING_PREFIX}deleting-{path.name}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(folder: Path, keep: int, newest: Path, spare: Path | None = None) -> None:
    """Keep the `keep` newest complete checkpoints (always `newest`, and `spare`: train.keep_best's
    best one); drop incomplete ones and leftovers of killed saves (called once the current save is
    in place)."""
    for path in folder.iterdir():
        if path.name.startswith(STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif checkpoint_step(path) is not None and path != newest and incomplete_reason(path):
            _remove(path)
    complete = [p for _, p in complete_checkpoints(folder) if p not in (newest, spare)]
    for path in complete[: max(0, len(complete) - (keep - 1))]:
        _remove(path)


def save_checkpoint_atomically(trainer, save, model, trial) -> None:
    """Run the Trainer's own `save(model, trial)` into a staging directory, then rename it into place.

    Every rank writes its part (RNG state per process) into the same staging directory; only the
    main process renames, after all ranks are done.
    """
    run_dir = Path(trainer._get_output_dir(trial=trial))
    step = trainer.state.global_step
    final = run_dir / f"checkpoint-{step}"
    staging = run_dir / f"{STAGING_PREFIX}{step}"
    main = trainer.args.should_save
    previous = complete_checkpoints(run_dir)
    kept = previous[-1][1] if previous else None
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of an earlier, killed save
        staging.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    # The Trainer derives its checkpoint path (and its rotation) from _get_output_dir: point it at
    # the staging directory for the length of this save.
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        save(model, trial)
        trainer.accelerator.wait_for_everyone()
        if main:
            if final.exists():  # e.g. a stray checkpoint of the same step from an earlier attempt
                _remove(final)
            # The Trainer pickles its arguments "for reference"; resuming never reads them, and we
            # keep no file that only unsafe unpickling could load.
            (staging / final.name / "training_args.bin").unlink(missing_ok=True)
            os.replace(staging / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = trainer.state.best_global_step if getattr(trainer, "keep_best", False) else None
            rotate(run_dir, trainer.args.save_total_limit or 1 << 30, final,
                   spare=run_dir / f"checkpoint-{best}" if best else None)
        trainer.accelerator.wait_for_everyone()
        if not main and staging.exists():
            # This node has a disk of its own (output_dir not shared): its part of the checkpoint
            # never reaches node 0's copy; keep no staging leftovers piling up here.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException as e:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise disk_full_error(e, f"checkpoint-{step}", kept) from None
        raise
    finally:
        del trainer._get_output_dir  # back to the class's method
        # (The Trainer points best_model_checkpoint at the staging path; it uses it only for
        # load_best_model_at_end, which lora never sets, and to delete every other checkpoint at the
        # end when save_total_limit is 1, which fails on a path that is gone. keep_best goes by
        # state.best_global_step: training/early_stopping.py.)
        trainer.state.best_model_checkpoint = None

