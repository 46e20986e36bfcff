"""run.json: what a run records about itself. `RunRecord` is its schema; `read_record` and
`parse_record` are its only readers, `write_record` (through `update_record`) its only writer.

    status          running | completed | interrupted | failed
    pid, pid_started, host       the process training it (run/processes.py tells if it lives)
    launcher        under torchrun: the agent that started it (host, pid, pid_started); an
                    elastic restart of that launch (--max_restarts) resumes the run
    created_at_unix, created_at, updated_at, name, num_processes, recipe_path, versions, allocator
    model           the base as trained: name, source, quantization, dtype, compute_dtype,
                    local_path (absolute, for a local base: eval / merge / generate use it)
    working_dir     what the recipe's relative data paths meant
    data            fingerprint (of the training files) and the data report
    final           global_step, train_loss, eval_loss, skipped_steps, best_step, best_eval_loss,
                    stopped_early
    params, timings, memory, error

A key this version does not know (written by a newer one) is kept as it is; a field of the wrong
type reads as absent. A record is written with its absent (None) fields left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lora_cli import __version__
from lora_cli.errors import RunDirError
from lora_cli.fsutil import atomic_write_json
from lora_cli.run.paths import RunPaths


@dataclass(frozen=True)
class ModelRecord:
    """The base model a run trained on, with the dtypes it was trained in."""

    name: str | None = None  # model.name as the recipe gave it
    source: str | None = None  # where it was loaded from, in words
    quantization: str | None = None
    dtype: str | None = None  # concrete (never "auto"): what `auto` resolved to when the run started
    compute_dtype: str | None = None
    local_path: str | None = None  # absolute path of a local directory or .gguf file
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataRecord:
    fingerprint: str | None = None  # of the training files' bytes: a resume refuses changed data
    report: dict | None = None  # the data report (data/report.py DataReport) as JSON
    extra: dict = field(default_factory=dict)

    @property
    def format(self) -> str | None:
        return (self.report or {}).get("format")

    @property
    def tokens_fingerprint(self) -> str | None:
        """Of every token id and label: eval rebuilds the split and compares."""
        return (self.report or {}).get("fingerprint")


@dataclass(frozen=True)
class FinalMetrics:
    global_step: int | None = None
    train_loss: float | None = None  # mean over the whole run's finite steps, across --resume
    eval_loss: float | None = None
    skipped_steps: int | None = None  # steps whose loss was non-finite
    best_step: int | None = None  # train.keep_best: the step whose adapter was saved (lowest eval loss)
    best_eval_loss: float | None = None
    stopped_early: bool | None = None  # train.early_stopping_patience stopped the run before its end
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    status: str | None = None
    pid: int | None = None
    pid_started: int | None = None
    host: str | None = None
    launcher: dict | None = None  # the torchrun agent of rank 0 (run/processes.py launcher_identity)
    created_at_unix: float | None = None
    name: str | None = None
    created_at: str | None = None
    num_processes: int | None = None
    updated_at: str | None = None
    recipe_path: str | None = None
    versions: dict | None = None
    allocator: str | None = None
    model: ModelRecord | None = None
    working_dir: str | None = None
    data: DataRecord | None = None
    memory: dict | None = None  # peaks reached beside the estimate (training/peaks.py)
    final: FinalMetrics | None = None
    params: dict | None = None  # trainable, total
    timings: dict | None = None  # total_seconds, train_seconds, supervised_tokens, tokens_per_second
    error: str | None = None  # why a failed run failed
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return to_json(self)


# --------------------------------------------------------------------------- reading


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


def parse_record(data: dict) -> RunRecord:
    """A RunRecord from run.json's content; a field of the wrong type is left out."""
    return _from_json(RunRecord, data)


def read_record(paths: RunPaths) -> RunRecord:
    """The run's record (an empty one where there is no run.json yet). A run.json that is not
    JSON, or not of our shape, is a RunDirError naming it: its readers would fail less clearly."""
    try:
        data = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RunRecord()
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise RunDirError(f"{paths.run_json} is not valid JSON", "Restore it or start a new run.") from None
    problem = run_json_problem(data)
    if problem:
        raise RunDirError(f"{paths.run_json} is not a lora run.json: {problem}", "Restore it or start a new run.")
    return parse_record(data)


def read_record_leniently(paths: RunPaths) -> tuple[RunRecord, str | None]:
    """What can be read of run.json, and what is wrong with it (None: nothing); never raises.
    `lora runs` lists a broken run with what is known."""
    try:
        data = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RunRecord(), None
    except (OSError, ValueError):
        return RunRecord(), "run.json is not valid JSON"
    problem = run_json_problem(data)
    return (parse_record(data) if isinstance(data, dict) else RunRecord()), problem


def our_record(paths: RunPaths) -> RunRecord | None:
    """The record when run.json is recognisably one `lora train` wrote (of our shape, with a
    status or a start time), else None: the directory is not a run of ours."""
    try:
        data = json.loads(paths.run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if run_json_problem(data) or not ({"status", "created_at_unix"} & data.keys()):
        return None
    return parse_record(data)


# --------------------------------------------------------------------------- writing


def write_record(paths: RunPaths, record: RunRecord) -> None:
    atomic_write_json(paths.run_json, record.to_json())


def update_record(paths: RunPaths, **changes: Any) -> RunRecord:
    """Set these fields of run.json (atomically), stamp updated_at, and return the record."""
    record = dataclasses.replace(read_record(paths), **changes, updated_at=timestamp())
    write_record(paths, record)
    return record


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def library_versions() -> dict:
    out = {"lora": __version__}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def report_json(report) -> dict:
    """The data report (a dataclass) as JSON: its plain values, no NaN."""
    plain = (int, float, str, bool, type(None), list, dict)
    return {k: v for k, v in dataclasses.asdict(report).items()
            if isinstance(v, plain) and not (isinstance(v, float) and math.isnan(v))}


# --------------------------------------------------------------------------- JSON <-> dataclasses


def to_json(record) -> dict:
    """A record (or a part of one: ModelRecord, FinalMetrics, ...) as run.json holds it."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name != "extra" and value is not None:
            out[f.name] = to_json(value) if dataclasses.is_dataclass(value) else value
    out.update({k: v for k, v in record.extra.items() if k not in out})
    return out


def _from_json(cls, data: dict):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    values, extra = {}, {}
    for key, value in data.items():
        if key not in names:
            extra[key] = value
            continue
        kind = next(a for a in typing.get_args(hints[key]) if a is not type(None))
        if dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                values[key] = _from_json(kind, value)
        elif _is_a(value, kind):
            values[key] = value
    return cls(**values, extra=extra)


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # JSON's true is not a number
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
