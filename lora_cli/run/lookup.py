"""Finding runs: the run directories under ./runs, the latest of them (what a command acts on
when no RUN is given), and a named run checked before any work is done with it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from lora_cli.errors import RunDirError
from lora_cli.run.paths import RUNS_ROOT, RunPaths
from lora_cli.run.record import our_record, read_record


def run_started(root: Path) -> float:
    """When a run started (run.json's created_at_unix); for a run.json that is missing, unreadable
    or of the wrong shape, when its directory last changed: such a run still counts as recent."""
    record = our_record(RunPaths(root))
    if record is not None and record.created_at_unix is not None:
        return float(record.created_at_unix)
    with contextlib.suppress(OSError):
        return root.stat().st_mtime
    return 0.0


def run_dirs(root: Path) -> list[Path]:
    """The run directories under `root`: those with a run.json or a recipe.yaml."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and ((p / "run.json").is_file() or (p / "recipe.yaml").is_file())]


def find_latest_run(root: Path = RUNS_ROOT) -> RunPaths | None:
    """The run under `root` that started most recently (the one `lora runs` lists last)."""
    candidates = [(run_started(p), p.name, p) for p in run_dirs(root)]
    if not candidates:
        return None
    return RunPaths(max(candidates)[2])


def resolve_run(run: str | Path | None, *, need_adapter: bool = True) -> RunPaths:
    """The run a command acts on: the one named, or the latest under ./runs (said on stderr)."""
    if run is None:
        paths = find_latest_run()
        if paths is None:
            raise RunDirError(
                f"no runs found under ./{RUNS_ROOT}",
                "Train one with `lora train RECIPE`, or name a run directory (e.g. runs/my-run).",
            )
        print(f"using the latest run: {paths.root}", file=sys.stderr)
        # A broken latest run is named, never silently passed over for an older one.
        try:
            if not paths.run_json.is_file():
                raise RunDirError(f"{paths.run_json} is missing")
            read_record(paths)
        except RunDirError as e:
            raise RunDirError(
                f"the latest run {paths.root} is broken: {e.message}",
                f"Name the run to use (`lora runs` lists them), or repair or remove {paths.root}.",
            ) from None
    else:
        paths = RunPaths(Path(run).expanduser())
        if not paths.root.is_dir():
            raise RunDirError(f"run directory {paths.root} does not exist", "Check the path (runs live under ./runs).")
        if not paths.recipe.is_file():
            raise RunDirError(
                f"{paths.root} is not a lora run directory (no recipe.yaml)", "Name a directory made by `lora train`."
            )
    if need_adapter and not (paths.adapter / "adapter_config.json").is_file():
        status = read_record(paths).status or "unknown"
        raise RunDirError(
            f"{paths.root} has no finished adapter (run status: {status})",
            f"Finish it with `lora train --resume {paths.root}` first.",
        )
    return paths
