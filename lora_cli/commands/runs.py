"""`lora runs`: one line per run directory, read from run.json, metrics.jsonl and eval.json.

Only reads files; a run that is broken or still being written is listed with what is known.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lora_cli.errors import RunDirError
from lora_cli.run.checkpoints import complete_checkpoints
from lora_cli.run.lookup import run_dirs, run_started
from lora_cli.run.paths import RunPaths
from lora_cli.run.processes import run_process_alive
from lora_cli.run.record import FinalMetrics, read_record_leniently

HEADERS = ("name", "status", "base model", "steps", "train loss", "eval loss", "eval change (base -> adapter)",
           "created")


def run(directory: Path, *, as_json: bool = False) -> list[dict]:
    runs = list_runs(directory)
    if as_json:
        print(json.dumps(runs, indent=2))
        return runs
    if not runs:
        print(f"no runs under {directory}")
        return runs
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in HEADERS:
        table.add_column(column, no_wrap=True)
    for r in runs:
        change = r["eval_change"]
        change_text = "-" if not change else (
            f"{change['base_loss']:.4f} -> {change['adapter_loss']:.4f} ({change['change']:+.4f})")
        status = "interrupted (process gone)" if r["process_gone"] else r["status"]
        table.add_row(r["name"], status, _fmt(r["base_model"]), _fmt(r["steps"]), _fmt(r["train_loss"]),
                      _fmt(r["eval_loss"]), change_text, _fmt(r["created_at"]))
    console = Console(highlight=False)
    if not console.is_terminal:  # piped: full lines rather than the 80-column default
        console = Console(highlight=False, width=250)
    console.print(table)
    for r in runs:
        if r["problem"]:
            console.print(f"{r['name']}: broken run.json ({r['problem']})", markup=False)
    return runs


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}


def _newest_checkpoint_step(root: Path) -> int | None:
    complete = complete_checkpoints(root / "checkpoints")
    return complete[-1][0] if complete else None


def _last_logged(metrics: Path) -> dict:
    """The last step and training loss in metrics.jsonl (for runs that did not finish)."""
    last: dict = {}
    with contextlib.suppress(OSError):
        for line in metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if not isinstance(row, dict):
                    continue
                if "step" in row:
                    last["steps"] = row["step"]
                if "loss" in row:
                    last["train_loss"] = row["loss"]
    return last


def run_summary(root: Path) -> dict:
    record, problem = read_record_leniently(RunPaths(root))
    final = record.final or FinalMetrics()
    logged = _last_logged(root / "metrics.jsonl")
    # An interrupted run saved a checkpoint at the step it reached, often after the last log line.
    saved_step = _newest_checkpoint_step(root)
    last = logged.get("steps")
    if saved_step is not None and not (isinstance(last, (int, float)) and last >= saved_step):
        logged["steps"] = saved_step
    evaluated = _read_json(root / "eval.json")
    change = None
    if isinstance(evaluated.get("base"), dict) and isinstance(evaluated.get("adapter"), dict):
        base, adapter = evaluated["base"].get("loss"), evaluated["adapter"].get("loss")
        if isinstance(base, (int, float)) and isinstance(adapter, (int, float)):
            change = {"base_loss": base, "adapter_loss": adapter, "change": adapter - base}
    status = "broken" if problem else record.status or "unknown"
    # "running" in run.json, but its process is gone (kill -9, a crash, a reboot): interrupted.
    process_gone = status == "running" and run_process_alive(record) is False
    return {
        "name": root.name,
        "path": str(root),
        "status": "interrupted" if process_gone else status,
        "process_gone": process_gone,
        "problem": problem,
        "base_model": record.model.name if record.model is not None else None,
        "steps": final.global_step if final.global_step is not None else logged.get("steps"),
        "train_loss": final.train_loss if final.train_loss is not None else logged.get("train_loss"),
        "eval_loss": final.eval_loss,
        "eval_change": change,
        "created_at": record.created_at,
        "created_at_unix": run_started(root),  # the order find_latest_run picks the latest by
    }


def list_runs(directory: Path) -> list[dict]:
    """Runs under `directory` (any subdirectory with a run.json or recipe.yaml), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RunDirError(f"no run directory {directory}", "Train a run with `lora train RECIPE`, or pass --dir.")
    return sorted((run_summary(r) for r in run_dirs(directory)), key=lambda r: (r["created_at_unix"], r["name"]))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
