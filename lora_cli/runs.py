"""The run-directory contract (DESIGN.md §4): paths, run.json, latest-run lookup, atomic writes.

    runs/<name>/
      recipe.yaml     resolved recipe          adapter/      final PEFT adapter + tokenizer
      run.json        status, versions, ...    checkpoints/  resumable Trainer checkpoints
      metrics.jsonl   one JSON line per log    merged/       `lora merge`   eval.json  `lora eval`

Everything here is written atomically: to a temporary name beside the target, then renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_cli.errors import RunDirError

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"


# --------------------------------------------------------------------------- atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` whole.

    On an exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    # Without an atomic exchange there is a moment with no `target`: the old one is kept under a
    # hidden name until the new one is in place.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE): a kill at any moment
    leaves either the old `b` or the new one. False where the system cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# --------------------------------------------------------------------------- run.json


def read_run_json(paths: RunPaths) -> dict:
    try:
        return json.loads(paths.run_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise RunDirError(f"{paths.run_json} is not valid JSON", "Restore it or start a new run.") from None


def load_run_recipe(paths: RunPaths):
    """The recipe a run was trained with, its dtypes pinned (with_run_dtypes): the base loads as
    the adapter was trained on it."""
    from lora_cli.config import load_recipe

    return with_run_dtypes(load_recipe(paths.recipe), paths)


def with_run_dtypes(recipe, paths: RunPaths):
    """`recipe` with its `auto` dtypes pinned to the ones the run recorded when it started, else
    (a new run) to this machine's (lora_cli.model.pin_dtypes)."""
    import dataclasses

    from lora_cli.model import pin_dtypes

    return dataclasses.replace(recipe, model=pin_dtypes(recipe.model, read_run_json(paths).get("model")))


def update_run_json(paths: RunPaths, **fields: Any) -> dict:
    """Merge `fields` into run.json (atomically) and return the result."""
    data = read_run_json(paths)
    data.update(fields)
    data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(paths.run_json, data)
    return data


# --------------------------------------------------------------------------- creating and finding runs


def prepare_run_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> RunPaths:
    """Check the output directory against --resume / --overwrite and create it.

    A non-empty directory is never reused silently: --resume continues it, --overwrite replaces it.
    """
    paths = RunPaths(Path(output_dir))
    exists = paths.root.exists() and any(paths.root.iterdir())
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite cannot be used together", "Pick one.")
    if resume:
        if not exists:
            raise RunDirError(
                f"nothing to resume: {paths.root} does not exist or is empty",
                "Drop --resume to start the run.",
            )
        return paths
    if exists:
        if not overwrite:
            raise RunDirError(
                f"the run directory {paths.root} already exists",
                "Use --resume to continue it, --overwrite to replace it, "
                "or set output_dir (e.g. output_dir=runs/other) for a new run.",
            )
        if not paths.run_json.exists() and not paths.recipe.exists():
            raise RunDirError(
                f"{paths.root} is not empty and is not a lora run directory; refusing to delete it",
                "Choose another output_dir.",
            )
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    return paths


def find_latest_run(root: Path = RUNS_ROOT) -> RunPaths | None:
    """The run under `root` whose run.json was created most recently."""
    if not root.is_dir():
        return None
    candidates = []
    for run_json in root.glob("*/run.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            data = json.loads(run_json.read_text(encoding="utf-8"))
            candidates.append((data.get("created_at_unix", run_json.stat().st_mtime), run_json.parent))
    if not candidates:
        return None
    return RunPaths(max(candidates)[1])


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
    else:
        paths = RunPaths(Path(run))
        if not paths.root.is_dir():
            raise RunDirError(f"run directory {paths.root} does not exist", "Check the path (runs live under ./runs).")
        if not paths.recipe.is_file():
            raise RunDirError(f"{paths.root} is not a lora run directory (no recipe.yaml)", "Name a directory made by `lora train`.")
    if need_adapter and not (paths.adapter / "adapter_config.json").is_file():
        status = read_run_json(paths).get("status", "unknown")
        raise RunDirError(
            f"{paths.root} has no finished adapter (run status: {status})",
            f"Finish it with `lora train --resume {paths.root}` first.",
        )
    return paths
