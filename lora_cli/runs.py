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
        data = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise RunDirError(f"{paths.run_json} is not valid JSON", "Restore it or start a new run.") from None
    problem = run_json_problem(data)
    if problem:  # its readers index into it: a clear error now rather than an AttributeError later
        raise RunDirError(f"{paths.run_json} is not a lora run.json: {problem}", "Restore it or start a new run.")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def run_json_problem(data: Any) -> str | None:
    """Why parsed run.json content does not have the shape we write (None when it does)."""
    if not isinstance(data, dict):
        return f"it holds {_json_type(data)}, not an object"
    for key in ("model", "data", "final"):
        if key in data and not isinstance(data[key], dict):
            return f"its {key!r} is {_json_type(data[key])}, not an object"
    created = data.get("created_at_unix")
    if "created_at_unix" in data and (isinstance(created, bool) or not isinstance(created, (int, float))):
        return f"its 'created_at_unix' is {_json_type(created)}, not a number"
    return None


def load_run_recipe(paths: RunPaths):
    """The recipe a run was trained with, its dtypes pinned (with_run_dtypes): the base loads as
    the adapter was trained on it."""
    from lora_cli.config import load_recipe

    return with_run_dtypes(with_run_paths(load_recipe(paths.recipe), paths), paths)


def with_run_paths(recipe, paths: RunPaths):
    """`recipe` with the paths it names as they were when the run trained: the base model at the
    absolute path recorded then (an error if it is gone, not a hub lookup of a relative path), and
    relative data paths against the directory training ran in, where they still exist there."""
    import dataclasses

    record = read_run_json(paths)
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    if model.get("local_path") and not Path(recipe.model.name).expanduser().is_absolute():
        if not Path(model["local_path"]).exists():
            raise RunDirError(
                f"the base model of run {paths.root} is gone: {model['local_path']} no longer exists",
                "Restore it there (the adapter only works on the base it was trained on).",
            )
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=model["local_path"]))
    working_dir = record.get("working_dir")
    if not isinstance(working_dir, str):
        return recipe

    def anchored(spec):
        if isinstance(spec, list):
            return [anchored(item) for item in spec]
        if not isinstance(spec, str) or Path(spec).expanduser().is_absolute():
            return spec
        there = Path(working_dir) / spec
        # A data file is the one training read, even when it is gone (its error then names that
        # path, and another file of the same name here is never used instead); a hub dataset id
        # (no file suffix, not a file there) stays as it is.
        return str(there) if there.exists() or Path(spec).suffix else spec

    data = dataclasses.replace(recipe.data, train=anchored(recipe.data.train), validation=anchored(recipe.data.validation))
    return dataclasses.replace(recipe, data=data)


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


# What `lora` itself writes into a run directory (train, eval, merge); hidden temporaries of these
# (".run.json.x.tmp", ".adapter.old-1") too. Anything else was put there by someone else.
RUN_ENTRIES = ("recipe.yaml", "run.json", "metrics.jsonl", "adapter", "checkpoints", "merged", "eval.json",
               "loss.png", "tensorboard")


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
        if _our_run_json(paths) is None:  # e.g. the user's project folder: never trained into
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
            if _our_run_json(paths) is None:
                raise RunDirError(
                    f"output_dir {paths.root} already exists and is not a lora run directory (no run.json written by `lora train`)",
                    "Set output_dir to a new directory (e.g. output_dir=runs/NAME).",
                )
            raise RunDirError(
                f"the run directory {paths.root} already exists",
                "Use --resume to continue it, --overwrite to replace it, "
                "or set output_dir (e.g. output_dir=runs/other) for a new run.",
            )
        _check_deletable(paths, keep)
        if empty_handed and not overwrite:
            status = (_our_run_json(paths) or {}).get("status", "unknown")
            print(f"{paths.root}: the earlier run stopped before its first step (status {status}, nothing saved); starting again")
        try:
            shutil.rmtree(paths.root)
        except OSError as e:
            raise RunDirError(f"cannot delete {paths.root}: {e.strerror or e}", "Check its permissions, or choose another output_dir.") from None
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output_dir {paths.root}: {e.strerror or e}", "Choose another output_dir.") from None
    _claim(paths)
    return paths


def process_identity() -> dict:
    """run.json's record of the process training a run: pid, its start time (where the system
    tells it: a reused pid is another process) and host. runs.py sees from it whether the run
    is still alive."""
    import socket

    pid = os.getpid()
    return {"pid": pid, "pid_started": _pid_start_time(pid), "host": socket.gethostname()}


def _claim(paths: RunPaths) -> None:
    """Claim a fresh run directory in one step: run.json appears whole, already "running" with
    this process's pid, or not at all. Two `lora train` started together on one output_dir: the
    second finds the first's live claim and stops; it never takes it for a dead run."""
    data = {"status": "running", **process_identity(), "created_at_unix": time.time()}
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
        other = _our_run_json(paths) or {}
        raise RunDirError(
            f"cannot start a run in {paths.root}: another `lora train` (process {other.get('pid', '?')}) started there at the same moment",
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
                raise RunDirError(f"output_dir {root} {where}, not a directory",
                                  "Set output_dir to a directory (created if missing), e.g. output_dir=runs/NAME.")
            return


def _our_run_json(paths: RunPaths) -> dict | None:
    """run.json's content when it is recognisably one `lora train` wrote, else None."""
    try:
        data = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if run_json_problem(data) or not ({"status", "created_at_unix"} & data.keys()):
        return None
    return data


def _pid_start_time(pid: int) -> int | None:
    """When process `pid` started (Linux: field 22 of /proc/PID/stat, in clock ticks since boot);
    None where the system does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        # "PID (comm) state ...": comm may hold spaces and parentheses; fields after the last ")"
        # start at field 3, so field 22 is the 20th of them.
        return int(stat[stat.rindex(")") + 1:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, started: Any = None) -> bool:
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
        now = _pid_start_time(pid)
        if now is not None and now != started:
            return False
    return True


def run_process_alive(data: dict) -> bool | None:
    """For a run.json whose status is "running": is the process training it alive? False when
    it is gone (killed, crashed, machine rebooted: an interrupted run), None when we cannot tell
    (no pid recorded, or another machine's process on a shared disk)."""
    import socket

    pid = data.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    if data.get("host") not in (None, socket.gethostname()):
        return None
    if pid == os.getpid():
        return True
    return _pid_alive(pid, data.get("pid_started"))


def _refuse_if_training(paths: RunPaths, action: str) -> None:
    """A run whose process is still alive on this host is never resumed or replaced under it:
    both processes would write the same checkpoints, metrics and run.json. A stale "running"
    (the process is gone: killed, crashed, machine rebooted) is an interrupted run."""
    data = _our_run_json(paths) or {}
    pid = data.get("pid")
    if data.get("status") != "running" or pid == os.getpid():
        return
    # None: no pid, or another machine's process (shared disk): we cannot tell whether it is alive
    if run_process_alive(data):
        raise RunDirError(
            f"cannot {action} {paths.root}: it is still training (process {pid}, run.json status running)",
            f"Wait for it to finish, or stop it first (`kill -INT {pid}` saves a checkpoint), then use --resume or --overwrite.",
        )


def _stopped_before_first_step(paths: RunPaths) -> bool:
    """A run of ours that ended before its first optimizer step (bad data or model found after
    the directory was made): run.json, recipe.yaml and empty leftovers, nothing worth keeping."""
    data = _our_run_json(paths)
    if data is None or data.get("status") in (None, "completed"):
        return False  # no status yet: a run just starting (another `lora train` at the same moment)
    if data.get("status") == "running" and run_process_alive(data) is not False:
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
        raise RunDirError(f"output_dir {root} is a symbolic link; refusing to delete through it",
                          "Set output_dir to the directory itself, or choose another output_dir.")
    real = root.resolve()
    if Path.cwd().resolve().is_relative_to(real):
        raise RunDirError(f"output_dir {root} is the current directory or holds it; refusing to delete it",
                          "Set output_dir to a directory of its own, e.g. output_dir=runs/NAME.")
    if _our_run_json(paths) is None:
        raise RunDirError(f"output_dir {root} is not empty and is not a lora run directory (no run.json of ours); refusing to delete it",
                          "Choose another output_dir, or move its contents away yourself.")
    for item in keep:
        if item and Path(item).expanduser().exists() and Path(item).expanduser().resolve().is_relative_to(real):
            raise RunDirError(f"output_dir {root} holds {item}, which this run reads; refusing to delete it",
                              f"Move {item} out of {root}, or set output_dir to another directory.")
    foreign = sorted(e.name for e in root.iterdir()
                     if e.name not in RUN_ENTRIES and not any(e.name.startswith(f".{name}.") for name in RUN_ENTRIES))
    foreign += _foreign_inside(paths)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"output_dir {root} holds files that `lora` did not write ({listed}); refusing to delete them",
                          f"Move them out of {root}, or choose another output_dir.")


# What the adapter save writes into adapter/: PEFT's adapter files and model card, and the
# tokenizer's files (vocabulary files differ by tokenizer type).
ADAPTER_SAVE_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json", "additional_chat_templates", "vocab.json",
                 "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"}


def _foreign_inside(paths: RunPaths) -> list[str]:
    """Files inside the run's own folders that `lora` did not write there (shown as adapter/x)."""
    from lora_cli.checkpoints import STAGING_PREFIX, checkpoint_step

    foreign = []
    if paths.adapter.is_dir() and not paths.adapter.is_symlink():
        foreign += [f"adapter/{e.name}" for e in paths.adapter.iterdir() if e.name not in ADAPTER_SAVE_FILES]
    if paths.checkpoints.is_dir() and not paths.checkpoints.is_symlink():
        foreign += [f"checkpoints/{e.name}" for e in paths.checkpoints.iterdir()
                    if not (e.name.startswith(STAGING_PREFIX) or (checkpoint_step(e) is not None and e.is_dir()))]
    if paths.merged.is_dir() and not paths.merged.is_symlink() and any(paths.merged.iterdir()):
        from lora_cli.merge import MARKER, files_merge_did_not_write

        unlisted = files_merge_did_not_write(paths.merged)
        if unlisted is None:  # not written by `lora merge` (no lora_merge.json)
            foreign.append(f"merged/ (no {MARKER}: not written by `lora merge`)")
        else:
            foreign += [f"merged/{name}" for name in unlisted]
    return sorted(foreign)


def run_started(root: Path) -> float:
    """When a run started (run.json's created_at_unix); for a run.json that is missing, unreadable
    or of the wrong shape, when its directory last changed: such a run still counts as recent."""
    data = _our_run_json(RunPaths(root))
    if data is not None and data.get("created_at_unix") is not None:
        return float(data["created_at_unix"])
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
            read_run_json(paths)
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
            raise RunDirError(f"{paths.root} is not a lora run directory (no recipe.yaml)", "Name a directory made by `lora train`.")
    if need_adapter and not (paths.adapter / "adapter_config.json").is_file():
        status = read_run_json(paths).get("status", "unknown")
        raise RunDirError(
            f"{paths.root} has no finished adapter (run status: {status})",
            f"Finish it with `lora train --resume {paths.root}` first.",
        )
    return paths
