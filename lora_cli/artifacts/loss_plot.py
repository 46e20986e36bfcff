"""loss.png: training and evaluation loss against the step, drawn from metrics.jsonl.

A picture is a convenience, never a reason to fail a run: any problem (matplotlib missing, no
loss logged, an unwritable directory) becomes one line of output and no file.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.fsutil import atomic_file


def read_losses(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) pairs for training and for evaluation; bad lines and non-finite values skipped."""
    train, evals = [], []
    for line in Path(metrics).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = row.get("step")
        for key, out in (("loss", train), ("eval_loss", evals)):
            value = row.get(key)
            if (
                isinstance(step, int)
                and isinstance(value, (int, float))
                and value == value
                and abs(value) != float("inf")
            ):
                out.append((step, float(value)))
    return train, evals


def write_loss_plot(metrics: Path, target: Path, title: str = "") -> str:
    """Draw `target` (PNG) atomically; returns a one-line note of what happened."""
    try:
        train, evals = read_losses(metrics)
    except OSError as e:
        return f"loss plot skipped: cannot read {metrics} ({e.strerror})"
    if not train and not evals:
        return "loss plot skipped: no loss was logged"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, works on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", color="tab:blue")
        if evals:
            ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_file(target, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png")
    except Exception as e:  # never fail a finished run for a picture
        return f"loss plot skipped: {type(e).__name__}: {e}"
    finally:
        plt.close(fig)
    return f"loss plot: {target}"
