"""`lora runs`: one line per run directory, read from run.json, metrics.jsonl and eval.json.

Only reads files; a run that is broken or still being written is listed with what is known.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lora_cli.errors import RunDirError

COLUMNS = ("name", "status", "base_model", "steps", "train_loss", "eval_loss", "eval_change", "created_at")


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}


def _last_logged(metrics: Path) -> dict:
    """The last step and training loss in metrics.jsonl (for runs that did not finish)."""
    last: dict = {}
    with contextlib.suppress(OSError):
        for line in metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if "step" in row:
                    last["steps"] = row["step"]
                if "loss" in row:
                    last["train_loss"] = row["loss"]
    return last


def run_summary(root: Path) -> dict:
    info = _read_json(root / "run.json")
    final = info.get("final") or {}
    logged = _last_logged(root / "metrics.jsonl")
    evaluated = _read_json(root / "eval.json")
    change = None
    if "base" in evaluated and "adapter" in evaluated:
        base, adapter = evaluated["base"].get("loss"), evaluated["adapter"].get("loss")
        if isinstance(base, (int, float)) and isinstance(adapter, (int, float)):
            change = {"base_loss": base, "adapter_loss": adapter, "change": adapter - base}
    return {
        "name": root.name,
        "path": str(root),
        "status": info.get("status", "unknown"),
        "base_model": (info.get("model") or {}).get("name"),
        "steps": final.get("global_step", logged.get("steps")),
        "train_loss": final.get("train_loss", logged.get("train_loss")),
        "eval_loss": final.get("eval_loss"),
        "eval_change": change,
        "created_at": info.get("created_at"),
        "created_at_unix": info.get("created_at_unix", (root / "run.json").stat().st_mtime if (root / "run.json").exists() else 0),
    }


def list_runs(directory: Path) -> list[dict]:
    """Runs under `directory` (any subdirectory with a run.json or recipe.yaml), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RunDirError(f"no run directory {directory}", "Train a run with `lora train RECIPE`, or pass --dir.")
    roots = [p for p in directory.iterdir() if p.is_dir() and ((p / "run.json").is_file() or (p / "recipe.yaml").is_file())]
    return sorted((run_summary(r) for r in roots), key=lambda r: (r["created_at_unix"] or 0, r["name"]))


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_list(directory: Path, *, as_json: bool = False) -> list[dict]:
    runs = list_runs(directory)
    if as_json:
        print(json.dumps(runs, indent=2))
        return runs
    if not runs:
        print(f"no runs under {directory}")
        return runs
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("name", "status", "base model", "steps", "train loss", "eval loss", "eval change (base -> adapter)", "created"):
        table.add_column(column, no_wrap=True)
    for r in runs:
        change = r["eval_change"]
        change_text = (f"{change['base_loss']:.4f} -> {change['adapter_loss']:.4f} ({change['change']:+.4f})"
                       if change else "-")
        table.add_row(r["name"], r["status"], _fmt(r["base_model"]), _fmt(r["steps"]), _fmt(r["train_loss"]),
                      _fmt(r["eval_loss"]), change_text, _fmt(r["created_at"]))
    console = Console(highlight=False)
    if not console.is_terminal:  # piped: full lines rather than the 80-column default
        console = Console(highlight=False, width=250)
    console.print(table)
    return runs
