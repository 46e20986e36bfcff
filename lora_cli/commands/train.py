"""`lora train`: recipe -> run directory -> data + model -> HF Trainer -> runs/<name>/adapter.

Read in the order it runs:
  run()        the run's lifecycle: open it, read and check what it trains on (training/inputs.py:
               model source, tokenizer, data), print the resolved recipe, train
               (training/session.py: model, the Trainer, the loop, the adapter saved), and record
               how it ended (completed, interrupted, failed), whatever stops it
  _open_run()  create or check the run directory, decide where a --resume continues, record the
               start (main process only)

The recipe is printed only once the inputs are checked: an error (a data path's typo, a missing
model directory, a bad row) is the whole output, on one screen.

Under `accelerate launch` every rank runs this; only the main one touches the run directory: it
goes first, the others wait and share its result or its failure (training/distributed.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import ranks
from lora_cli.allocator import INSTALL_HINT, active_allocator
from lora_cli.data.mixing import source_paths
from lora_cli.errors import Interrupted, RecipeError, RunDirError
from lora_cli.fsutil import atomic_write_text
from lora_cli.recipe.schema import Recipe
from lora_cli.recipe.show import dump_recipe, marked_recipe_lines
from lora_cli.run.lifecycle import prepare_run_dir
from lora_cli.run.paths import RunPaths
from lora_cli.run.processes import launcher_identity, process_identity, started_by_this_launcher
from lora_cli.run.record import library_versions, our_record, read_record, timestamp, to_json, update_record
from lora_cli.training import distributed
from lora_cli.training.inputs import read_inputs
from lora_cli.training.optimizers import check_optimizer
from lora_cli.training.preflight import check_trackers
from lora_cli.training.resume import check_resumable, resume_checkpoint


@dataclass
class TrainResult:
    paths: RunPaths
    model: Any  # the trained PeftModel, still in memory (tests compare it with the saved adapter)
    final: dict


def run(recipe: Recipe, *, recipe_path: str | None, resume: bool, overwrite: bool,
        overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Train and save the adapter. Raises LoraError subclasses on failure.

    `recipe_path` and `overrides` (the command line's key=value) mark where each value of the
    resolved recipe printed at the start came from, as `lora validate` does.
    """
    check_trackers(recipe)  # a missing tracker package fails now, not after loading the model
    check_optimizer(recipe)  # so does an optimizer this machine cannot run
    distributed.init()
    paths, checkpoint, finished, recipe_lines = distributed.main_first(
        lambda: _open_run(recipe, recipe_path, resume=resume, overwrite=overwrite, overrides=overrides)
    )
    if finished is not None:  # --resume of a completed run: nothing to train (_open_run said so)
        return TrainResult(paths, None, finished)
    distributed.check_shared_run_dir(paths, checkpoint)  # every node sees the run (and the checkpoint)
    main = ranks.is_main()

    def completed() -> bool:
        # The adapter is saved and run.json says so: whatever stops us afterwards (a late Ctrl-C
        # while plotting) leaves a complete run, not an "interrupted" or "failed" one.
        try:
            return read_record(paths).status == "completed"
        except (RunDirError, OSError):
            return False

    try:
        inputs = read_inputs(recipe)  # model source, tokenizer, data: every cheap check, nothing printed
        if main:  # valid recipe, inputs checked, run directory open: show what this run trains with
            print(f"recipe (resolved; lora validate {recipe_path or 'RECIPE'} shows the data preview):")
            for line in recipe_lines:
                print(line)
        # The training stack (transformers' Trainer: ~6 s to import) loads only now, once the run
        # directory is open and its inputs checked: a run that cannot start says so at once. The one
        # import of our own modules inside a function outside cli.py (tests/test_architecture.py lists it).
        from lora_cli.training import session

        model, final = session.train(recipe, paths, checkpoint, inputs)
        return TrainResult(paths, model, final)
    except Interrupted:
        if main and not completed():
            update_record(paths, status="interrupted")
        raise
    except KeyboardInterrupt:
        if main and completed():
            raise Interrupted(f"interrupted after the run completed; the adapter is saved in {paths.adapter}",
                              "Nothing to resume: the run is complete.") from None
        # Ctrl-C outside the training loop (loading the model, the final save): every save is
        # atomic, so the last complete checkpoint stands.
        if main:
            update_record(paths, status="interrupted")
        raise Interrupted(
            "interrupted; the last complete checkpoint is kept", f"Continue with `lora train --resume {paths.root}`."
        ) from None
    except BaseException as e:
        lost = distributed.peer_lost(e)  # another rank died: say so instead of a gloo/NCCL traceback
        if main and not completed():
            update_record(paths, status="failed", error=f"{type(e).__name__}: {getattr(lost or e, 'message', e)}")
        if lost is not None:
            raise lost from None
        raise


# --------------------------------------------------------------------------- the run directory


def _open_run(recipe: Recipe, recipe_path: str | None, *, resume: bool, overwrite: bool,
              overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunPaths, Path | None, dict | None, list[str]]:
    """Create or check the run directory and record the start (main process only). The third
    value is the final metrics of a completed run that --resume found with nothing left to do
    (None: train); the fourth the resolved recipe's lines, each value marked with where it came
    from, which run() prints once the run's inputs are checked."""
    if ranks.engine() not in ("single", "ddp"):  # FSDP / DeepSpeed refuse some quantizations
        # (torch only here and only then: a plain run whose inputs are wrong says so without it)
        import torch

        distributed.check_engine_supports(recipe.model.quantization, cuda=torch.cuda.is_available())
        if recipe.train.keep_best:  # (loading the best weights back is written for whole, unsharded adapters)
            raise RecipeError("train.keep_best", [f"not supported with {ranks.engine()}: the adapter is sharded"],
                              "Train with DDP (lora train RECIPE --num-processes N), or drop train.keep_best.")
    # Files this run reads: a directory holding one is never deleted to make room for the run.
    data = recipe.data
    keep = [recipe_path, recipe.model.name, *source_paths(data.train), *source_paths(data.validation or [])]
    if not resume and ranks.restart_count() > 0:
        # torchrun restarted the processes after one failed (--max_restarts): they run this same
        # command again. The run this launch started continues from its last complete checkpoint
        # (also under --overwrite, which would throw it away); any other run is left alone.
        earlier = our_record(RunPaths(Path(recipe.output_dir).expanduser()))
        if earlier is not None and started_by_this_launcher(earlier):
            print(f"restart {ranks.restart_count()} of this launch (--max_restarts): resuming the run it started")
            resume, overwrite = True, False
    paths = prepare_run_dir(recipe.output_dir, resume=resume, overwrite=overwrite, keep=keep)
    checkpoint = None
    if resume:
        check_resumable(paths, recipe)
        record = read_record(paths)
        if record.status == "completed" and (paths.adapter / "adapter_config.json").is_file():
            # Training on would run past max_steps (the schedule's end) and replace the adapter.
            final = to_json(record.final) if record.final is not None else {}
            print(f"{paths.root} is already complete (step {final.get('global_step', '?')}): nothing to do; "
                  f"the adapter is in {paths.adapter}")
            return paths, None, final, []
        checkpoint = resume_checkpoint(paths, record)
        print(
            f"resuming {paths.root} from {checkpoint.name}"
            if checkpoint
            else f"no complete checkpoint in {paths.root}: starting from step 0"
        )
    else:
        update_record(
            paths,
            name=paths.root.name,
            created_at=timestamp(),
            created_at_unix=time.time(),
            num_processes=ranks.world_size(),
        )
    # Where each value came from, read before recipe.yaml is rewritten below (a resumed run
    # directory's recipe is that file).
    recipe_lines = marked_recipe_lines(recipe, recipe_path, overrides)
    atomic_write_text(paths.recipe, dump_recipe(recipe))
    allocator = active_allocator()
    if allocator == "system" and os.environ.get("LORA_ALLOCATOR") != "system":
        print(f"tip: tcmalloc makes CPU training steps faster and leaner (make bench): {INSTALL_HINT}")
    update_record(
        paths,
        status="running",
        recipe_path=recipe_path,
        versions=library_versions(),
        **process_identity(),
        launcher=launcher_identity(),
        allocator=allocator,  # pid, start time, host: whether the run is still alive
    )
    return paths, checkpoint, None, recipe_lines


