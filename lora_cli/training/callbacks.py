"""Trainer callbacks: metrics.jsonl, progress on the terminal, and stopping cleanly on a signal.

Only the main process (rank 0) writes or prints; every rank sees the same stop request.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from lora_cli import ranks
from lora_cli.fsutil import atomic_write_text
from lora_cli.training import distributed

# Keys of the Trainer's log dicts that we keep in metrics.jsonl.
# skipped_steps: steps of the window whose loss was NaN/inf (LoraTrainer.log); their gradients
# were dropped, and "loss" is the mean of the others (or the non-finite value when all were).
_TRAIN_KEYS = ("loss", "skipped_steps", "learning_rate", "grad_norm", "epoch")
_EVAL_PREFIX = "eval_"


def _clean(value):
    """JSON has no NaN/inf; write them as strings so a bad step is still visible."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per training log (step, loss, learning_rate, ...) or eval."""

    def __init__(self, path: Path, tokens, extra_keys: tuple[str, ...] = ()):
        self.path = Path(path)
        self.tokens = tokens  # TokenCounter: throughput figures added to each training line
        self.keys = _TRAIN_KEYS + tuple(extra_keys)  # extra: a method's own metrics (dpo: rewards/...)

    def on_train_begin(self, args, state, control, **kwargs):
        """Training starts at state.global_step (a --resume's checkpoint, or 0): drop the lines of
        later steps, which an earlier attempt logged and this one is about to redo (else they
        appear twice and loss.png doubles back). Lines that do not parse (a write cut off by a
        kill) go too."""
        if not state.is_world_process_zero or not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        kept = []
        for line in text.splitlines():
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(step, int) and step <= state.global_step:
                kept.append(line + "\n")
        if "".join(kept) != text:
            atomic_write_text(self.path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            line = {"step": state.global_step, **{k: logs[k] for k in self.keys if k in logs}}
            line.update(self.tokens.snapshot())
            line["time"] = round(time.time(), 3)  # wall clock: step timings (scripts/bench) need it
        elif any(k.startswith(_EVAL_PREFIX) for k in logs):
            line = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith(_EVAL_PREFIX)}}
        else:
            return  # the end-of-training summary goes to run.json instead
        line = {k: _clean(v) for k, v in line.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


class TokenCounter:
    """Counts the supervised and input tokens of training steps (fed by LoraTrainer).

    The rate is over the window since the previous snapshot, so a slow first step (warm-up,
    lazy initialisation) does not drag the figure down for the rest of the run.
    """

    def __init__(self):
        self.supervised = 0
        self.tokens = 0  # non-pad tokens (inputs the model really reads)
        self.positions = 0  # tokens + padding: what the model computes on
        self._window = None  # (time, tokens) at the previous snapshot
        self.rate = None  # tokens/s over the last window

    def add(self, supervised: int, tokens: int, positions: int | None = None) -> None:
        if self._window is None:
            self._window = (time.perf_counter(), 0)
        self.supervised += supervised
        self.tokens += tokens
        self.positions += tokens if positions is None else positions

    def snapshot(self) -> dict:
        if self._window is None:
            return {}
        now = time.perf_counter()
        since, tokens_then = self._window
        self._window = (now, self.tokens)
        self.rate = round((self.tokens - tokens_then) / max(now - since, 1e-9), 1)
        return {
            "supervised_tokens": self.supervised,
            "tokens": self.tokens,
            "padding": round(1 - self.tokens / max(self.positions, 1), 4),  # share of computed positions
            "tokens_per_second": self.rate,
        }


class ProgressCallback(TrainerCallback):
    """A rich progress bar on a terminal; plain log lines when piped or in CI."""

    def __init__(self, tokens: TokenCounter, console=None):
        self.tokens = tokens
        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None
        self.last = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.last["loss"] = logs["loss"]
            self.last["skipped"] = logs.get("skipped_steps", 0)
            self.last["lr"] = logs.get("learning_rate")
            self.last["rate"] = self.tokens.rate
        if "eval_loss" in logs:
            self.last["eval_loss"] = logs["eval_loss"]
        if "rewards/accuracies" in logs:  # dpo / orpo: how often the chosen answer wins
            self.last["accuracy"] = logs["rewards/accuracies"]
        if self.progress is not None:
            self.progress.update(self.task, info=self._info())
        elif "loss" in logs or "eval_loss" in logs:
            print(f"step {state.global_step}/{state.max_steps} {self._info()}", file=sys.stderr, flush=True)

    def _info(self) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
            skipped = self.last.get("skipped")
            if skipped:  # e.g. "loss nan (step skipped)": a bad step must be visible, never a 0.0000
                steps = "step" if skipped == 1 else f"{skipped} steps"
                if math.isfinite(self.last["loss"]):  # the mean of the window's other steps
                    steps = f"{skipped} step{'s' if skipped > 1 else ''} with non-finite loss"
                parts[-1] += f" ({steps} skipped)"
        if "eval_loss" in self.last:
            parts.append(f"eval {self.last['eval_loss']:.4f}")
        if "accuracy" in self.last:
            parts.append(f"pref acc {self.last['accuracy']:.2f}")
        if self.last.get("lr") is not None:
            parts.append(f"lr {self.last['lr']:.2e}")
        rate = self.last.get("rate")
        if rate:
            parts.append(f"{rate:.0f} tok/s")
        return "  ".join(parts)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StopOnSignalCallback(TrainerCallback):
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, stop.

    A second Ctrl-C aborts at once (KeyboardInterrupt); the last complete checkpoint stays.
    """

    def __init__(self):
        self.received: int | None = None  # the signal this rank got (or, once agreed, another rank's)
        self.stopped = False  # training stopped early because of it (all ranks at the same step)
        self._received_at = 0.0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some launchers): no handler
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None:
            # Under a launcher one Ctrl-C arrives twice: from the terminal and passed on by torchrun.
            if ranks.is_distributed() and signum == self.received and now - self._received_at < 2.0:
                return
            raise KeyboardInterrupt
        self.received, self._received_at = signum, now
        name = signal.Signals(signum).name
        print(f"\n{ranks.rank_prefix()}{name} received: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        # With several processes all must stop at the same step (else the others wait forever in
        # the next gradient all-reduce): a signal seen by any rank stops every rank. Only the
        # agreed value decides. A signal that arrives while this rank waits in the collective is
        # handled right after it returns: the other ranks agreed without it, so this step does not
        # stop (checking self.received here once let one rank stop alone and hang the others);
        # the next step's agreement includes it.
        agreed = distributed.agree_max(self.received or 0)
        if agreed:
            self.received = self.received or agreed
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control
